"""Several ranks on this machine, forked from one process that has imported everything.

``megarlhf <command>`` starts the processes a config asks for itself when it is not already
running under ``torchrun`` or ``srun`` (laptop, workstation, one node without SLURM). The
parent loads the command's modules (torch, megatron-core, the recipe: ~3-5 s of CPU),
then forks one process per rank with ``torch.multiprocessing.start_processes`` and the
environment torchrun would give them (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``). No rank pays for those imports again, and there is no
launcher agent to start (with this and megatron's lighter CPU import, the test suite, which
starts a few hundred multi-process jobs, went from 41 to 17 minutes on a 2-core machine).

What a launcher must do, it does:

- **fail fast:** when one rank fails (an exception, an exit code, a signal: the OOM killer,
  a node-failure drill), the others get ``GRACE_S`` seconds to notice on their own (their
  collectives fail at once when a peer's connections close), then SIGTERM, then SIGKILL
  after as long again. The exit code is the failing rank's (75 for a preempted job that
  saved and stopped, see :mod:`megarlhf.train.preemption`), or 1 for a rank killed by a
  signal;
- **signals:** SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 sent to the launcher reach every
  rank (a preemption notice or Ctrl-C stops the job the way it stops one under SLURM);
- **orphans:** a rank dies with its launcher (``PR_SET_PDEATHSIG``, set by torch).

On clusters ``srun`` starts the ranks (``slurm/*.sh``) and this module is not used; under
``torchrun`` neither. The parent only loads modules and checks the config before it forks;
each rank sets its own thread count. On a machine with a GPU the ranks are
started by torchrun instead (:func:`torchrun`): CUDA cannot be used in a process forked
from one that has touched it, and checking a job's kernels before launch does
(:func:`forking_is_safe`).

``python -m megarlhf.launch --nproc-per-node N script.py ARGS`` runs any script the same way
(its top-level imports run once in the parent; each rank runs it as ``__main__``).
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import socket
import sys
from typing import Callable, List, Optional

import torch.multiprocessing as tmp

__all__ = ["run", "torchrun", "forking_is_safe", "script_entry", "main", "GRACE_S", "FORWARDED_SIGNALS",
           "LAUNCHER_ENV"]

LAUNCHER_ENV = "MEGARLHF_LAUNCHER"
"""``local`` in the ranks this module starts (:class:`megarlhf.parallel.DistEnv` reports it);
otherwise their environment is torchrun's."""

GRACE_S = 5.0
"""Seconds the other ranks get to exit on their own after one fails (and again between
SIGTERM and SIGKILL)."""

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, threads: int,
               entry: Callable[[], Optional[int]]) -> None:
    import torch

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    os.environ[LAUNCHER_ENV] = "local"
    for sig in FORWARDED_SIGNALS:  # the parent's forwarding is the parent's
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)  # blocked by the parent to fork
    torch.set_num_threads(threads)  # the parent loaded torch before this rank's share was known
    code = entry()
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        raise SystemExit(code)


def default_threads(world_size: int) -> int:
    """``$OMP_NUM_THREADS`` if set, else this machine's cores shared between the ranks."""
    raw = os.environ.get("OMP_NUM_THREADS")
    if raw and raw.isdigit() and int(raw) > 0:
        return int(raw)
    return max(1, (os.cpu_count() or 1) // world_size)


def run(world_size: int, entry: Callable[[], Optional[int]], threads: Optional[int] = None) -> int:
    """Run ``entry`` (returning an exit code, or None for 0) as ranks 0..world_size-1 of one
    torch.distributed job on this machine; returns the job's exit code. Load what the ranks
    need before calling: the forks share it."""
    threads = threads or default_threads(world_size)
    pids: List[int] = []

    def forward(signum, _frame):
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    # A signal that arrives while the ranks are being forked waits (blocked) until their
    # pids are known, then is forwarded; each rank unblocks its own copy of the mask. Once
    # forked, the launcher receives what it forwards even if it was started with those
    # signals blocked (a mask is inherited from whatever started it).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS) - set(FORWARDED_SIGNALS)
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        ctx = tmp.start_processes(_rank_main, args=(world_size, _free_port(), threads, entry),
                                  nprocs=world_size, join=False, start_method="fork")
        pids += [p.pid for p in ctx.processes]
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        while not ctx.join(timeout=0.2, grace_period=GRACE_S):
            pass
        return 0
    except tmp.ProcessExitedException as e:
        if e.signal_name:
            print(f"megarlhf: rank {e.error_index} (pid {e.error_pid}) was killed by "
                  f"{e.signal_name}; the job's other ranks were stopped", file=sys.stderr, flush=True)
            return 1
        return e.exit_code
    except tmp.ProcessRaisedException as e:
        print(f"megarlhf: rank {e.error_index} failed:\n{e}", file=sys.stderr, flush=True)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def forking_is_safe() -> bool:
    """Ranks may be forked from this process: no GPU here (a forked child cannot use CUDA
    once its parent has initialised it)."""
    from megarlhf import platform

    return not platform.has_gpu()


def torchrun(world_size: int, python_args: List[str]) -> int:
    """``python -m torch.distributed.run --standalone`` with ``world_size`` local ranks
    running ``python_args`` (e.g. ``["-m", "megarlhf.cli", "ppo", ...]``); returns its exit
    code. Each rank imports everything itself."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(default_threads(world_size)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world_size}", *python_args]
    return subprocess.call(cmd, env=env)


def script_entry(script: str, args: List[str]) -> Callable[[], Optional[int]]:
    """``python SCRIPT ARGS`` as a function returning the exit code (a non-numeric
    ``sys.exit`` message is printed to stderr and gives 1, as the interpreter does)."""
    def entry() -> Optional[int]:
        sys.argv = [script, *args]
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                return e.code
            print(e.code, file=sys.stderr)
            return 1
        return 0
    return entry


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megarlhf.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc-per-node", type=int, required=True, help="ranks to start")
    ap.add_argument("script", help="a Python script (run as __main__ in every rank)")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    a = ap.parse_args(argv)
    if a.nproc_per_node < 1:
        ap.error("--nproc-per-node must be at least 1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(a.script)))
    runpy.run_path(a.script, run_name="__megarlhf_preload__")  # its imports, once, in the parent
    return run(a.nproc_per_node, script_entry(a.script, a.args))


if __name__ == "__main__":
    sys.exit(main())
