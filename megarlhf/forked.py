"""Run ``python -m MODULE ARGS`` (or ``python SCRIPT ARGS``) in a process forked from a
server that has imported the heavy modules once.

A fresh interpreter spends 3-5 s importing torch, megatron-core and datasets before a
command does anything. Tools that start many short commands in a row (the test suite, the
CPU rehearsal of ``tools/gpu_rehearsal.py``) instead start one ``multiprocessing``
fork server per session: a fresh interpreter with the caller's flags and ``sys.path``
that imports :data:`PRELOAD`; every command then runs in a child forked from it. The
child is a process of its own (own environment, working directory, process group and
file descriptors) and runs the same ``main`` as the console script; its exit status comes
back as ``subprocess.run`` gives it.

Not for CUDA: a forked child cannot use a device its parent initialised, and a GPU run
should be exactly what a user starts. Commands that are to be signalled or killed from
outside also need a real process of their own.

    res = run(["-m", "megarlhf.cli", "sft", "--config", "x.yaml"], env, cwd, "out.log", "out.log")
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

__all__ = ["PRELOAD", "run"]

PRELOAD = ["megarlhf.cli", "megarlhf.recipes.sft", "megarlhf.recipes.reward_model", "megarlhf.recipes.dpo",
           "megarlhf.recipes.ppo", "megarlhf.rollout.commands", "megarlhf.eval.run", "megarlhf.demo",
           "megarlhf.compare", "megarlhf.smoke", "megarlhf.launch", "megarlhf.convert.hf_to_megatron",
           "megarlhf.convert.megatron_to_hf", "datasets",
           # imported by the commands only when they run (a light command stays light)
           "megarlhf.parallel", "megarlhf.models.llama", "megarlhf.models.specs", "megarlhf.models.heads",
           "megarlhf.train.job", "megarlhf.train.step", "megarlhf.train.optim", "megarlhf.train.checkpoint",
           "megarlhf.data.batch", "megarlhf.data.sampler", "megatron.core.optimizer",
           "megatron.core.dist_checkpointing", "megatron.core.pipeline_parallel",
           "megatron.core.inference.communication_utils", "torch._dynamo", "sentencepiece", "psutil"]
"""What the server imports before the first command: the commands and what they import
when they run."""

_ctx = None


def _context():
    global _ctx
    if _ctx is None:
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def _open_output(path: str, fd: int, append: bool) -> None:
    target = os.open(path, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
    os.dup2(target, fd)
    os.close(target)


def _command(argv: List[str], env: Dict[str, str], cwd: str, out_path: str, err_path: str) -> None:
    """In the forked child: become ``python ARGV`` started with ``env`` in ``cwd``, its
    output appended to ``out_path`` and ``err_path`` (the same file for both is fine)."""
    import torch

    os.setpgrp()  # a timeout stops the command and every rank it started
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    _open_output(out_path, 1, append=True)
    _open_output(err_path, 2, append=True)
    # a fresh interpreter's thread count: $OMP_NUM_THREADS, else every core
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    if argv[0] == "-m":
        code = importlib.import_module(argv[1]).main(argv[2:])
    else:
        from megarlhf.launch import script_entry

        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        code = script_entry(argv[0], argv[1:])()
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(code)


def run(argv: Sequence[str], env: Dict[str, str], cwd: str, out_path: str, err_path: str,
        timeout: Optional[float] = None) -> int:
    """``python ARGV`` (``["-m", module, ...]`` or ``[script, ...]``) with ``env`` in
    ``cwd``, forked from the server; its stdout and stderr are appended to the two files
    (created if missing). Returns the exit status; after ``timeout`` seconds the command's
    process group is killed and ``subprocess.TimeoutExpired`` raised."""
    argv = [str(a) for a in argv]
    for path in (out_path, err_path):
        open(path, "a").close()
    proc = _context().Process(target=_command, args=(argv, dict(env), str(cwd), out_path, err_path))
    proc.start()
    try:
        proc.join(timeout)
    except BaseException:  # Ctrl-C reaches the caller only: stop what it started
        _kill(proc.pid)
        raise
    if proc.exitcode is None:
        _kill(proc.pid)
        proc.join()
        raise subprocess.TimeoutExpired(argv, timeout)
    return proc.exitcode


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
