"""``megarlhf ARGS`` (and ``python -m megarlhf.launch``, the converters) for tests, in a
process forked from a server that has imported the commands once.

A fresh ``python -m megarlhf.cli`` spends ~3-4 s importing torch, megatron-core, datasets
and the recipe before it does anything; the suite runs about 150 commands. Here a
``multiprocessing`` fork server (a fresh interpreter, started once per test session) loads
those modules, and every command runs in a child forked from it: its own process (own
environment, working directory, process group, file descriptors), the same
``megarlhf.cli.main`` as the console script, its exit code and output returned as
``subprocess.run`` returns them. Tests that signal or kill a command, or that test the
console script itself, start real ``python -m megarlhf.cli`` processes instead.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from typing import Dict, List

PRELOAD = ["megarlhf.cli", "megarlhf.recipes.sft", "megarlhf.recipes.reward_model", "megarlhf.recipes.dpo",
           "megarlhf.recipes.ppo", "megarlhf.rollout.commands", "megarlhf.eval.run", "megarlhf.demo",
           "megarlhf.compare", "megarlhf.smoke", "megarlhf.launch", "megarlhf.convert.hf_to_megatron",
           "megarlhf.convert.megatron_to_hf", "datasets"]

_ctx = None


def _context():
    global _ctx
    if _ctx is None:
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def _command(entry: str, argv: List[str], env: Dict[str, str], cwd: str, out_path: str,
             err_path: str) -> None:
    """In the forked child: become ``python ENTRY ARGV`` started with ``env`` in ``cwd``
    (``ENTRY``: ``-m megarlhf.cli``, ``-m megarlhf.launch`` or a script's path)."""
    import torch

    os.setpgrp()  # a timeout stops the command and every rank it started
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    # a fresh interpreter's thread count: $OMP_NUM_THREADS, else every core
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    if entry.startswith("-m "):
        import importlib

        code = importlib.import_module(entry[3:]).main(argv)
    else:
        from megarlhf.launch import script_entry

        sys.path.insert(0, os.path.dirname(os.path.abspath(entry)))
        code = script_entry(entry, argv)()
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(code)


def run_cli(argv: List[str], env: Dict[str, str], cwd: str, timeout: float = 600,
            entry: str = "-m megarlhf.cli") -> subprocess.CompletedProcess:
    """``python ENTRY *argv`` (by default ``megarlhf *argv``) with ``env`` in ``cwd``: a
    CompletedProcess (returncode, stdout, stderr); raises ``subprocess.TimeoutExpired`` after
    ``timeout`` seconds (the command's process group is killed first)."""
    argv = [str(a) for a in argv]
    with tempfile.TemporaryDirectory(prefix="megarlhf-cli-") as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        for path in (out_path, err_path):
            open(path, "w").close()
        proc = _context().Process(target=_command, args=(entry, argv, dict(env), str(cwd), out_path, err_path))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.join()
            raise subprocess.TimeoutExpired([entry, *argv], timeout)
        with open(out_path) as f_out, open(err_path) as f_err:
            return subprocess.CompletedProcess([entry, *argv], proc.exitcode, f_out.read(), f_err.read())
