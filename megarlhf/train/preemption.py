"""Stopping cleanly when the cluster asks: a signal sets a flag, every rank agrees at the
end of a step, the recipe saves its checkpoint, and under SLURM the job requeues itself
and resumes from that checkpoint (``train.resume=auto``).

    preempt = Preemption(cfg.train.preemption)  # first thing in run(): installs the handlers
    while step < total_steps:
        ...                                     # one training step
        preempt.end_of_step(step, total_steps, save_interval, lambda: save_train_state(...), log)
        # collective, every rank once per step: saves at the interval or on a signal; after
        # a signal, rank 0 requeues and every rank exits with status 75

Signals:
  ``preemption.signal`` (SIGUSR1)  checkpoint, requeue, stop. ``#SBATCH --signal=USR1@600``
                     makes SLURM send it to every task 600 s before the time limit.
  SIGTERM            checkpoint and stop, no requeue: whoever sent it (scancel, the time
                     limit, the scheduler preempting the job) decides what happens next.

A handler only sets a flag: nothing else is safe while a collective may be in flight.
:meth:`Preemption.should_stop` takes the maximum of the flags over the whole job once
per step, so every rank stops after the same step even when only some got the signal.

A job does not requeue in a loop: a requeue needs the signal, happens only after a step
completed and its checkpoint was written, never after an error (an exception or a
failed save ends the job with its own status), and not at all once SLURM's
``SLURM_RESTART_COUNT`` reaches ``max_requeues``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, NoReturn, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["PreemptionConfig", "Preemption", "requeue_decision", "STOPPED_EXIT"]

STOPPED_EXIT = 75
"""Exit status of a run stopped by a signal after saving its checkpoint (EX_TEMPFAIL:
resumable; SLURM sites may list it in ``RequeueExit``)."""

# Agreed stop reasons, reduced with MAX over the ranks: SIGTERM wins over a requeue
# request, so a job being cancelled is never put back in the queue; a halt (the run's own
# decision that it cannot go on, e.g. non-finite steps) wins over both.
_NONE, _REQUEUE, _TERM, _HALT = 0, 1, 2, 3


@dataclass(frozen=True)
class PreemptionConfig:
    """Checkpoint and stop on a signal; requeue the SLURM job after it."""

    signal: str = "SIGUSR1"
    """Signal that asks for checkpoint + requeue (``sbatch --signal=USR1@<seconds>``);
    ``none``: no handler."""
    on_sigterm: bool = True
    """SIGTERM also checkpoints at the end of the current step and stops (no requeue)."""
    requeue: bool = True
    """Under SLURM, requeue the job (``scontrol requeue``) once the checkpoint is saved."""
    max_requeues: int = 20
    """No requeue once the job has been restarted this many times (``SLURM_RESTART_COUNT``)."""


def _parse_signal(name: str, key: str) -> Optional[signal.Signals]:
    from megarlhf.config import ConfigError

    if name.lower() in ("", "none"):
        return None
    full = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    allowed = ("SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT", "SIGQUIT", "SIGCONT")
    if full not in allowed:
        raise ConfigError([f"{key}={name!r}: expected one of {', '.join(allowed)} or none "
                           "(SIGTERM is handled by on_sigterm; SIGKILL cannot be caught)"])
    return signal.Signals[full]


def requeue_decision(reason: str, cfg: PreemptionConfig,
                     environ: Optional[Mapping[str, str]] = None) -> Tuple[bool, str]:
    """Whether a run stopped for ``reason`` (``requeue`` or ``sigterm``) puts its SLURM job
    back in the queue, and why (one line for the log)."""
    env = os.environ if environ is None else environ
    if reason != "requeue":
        return False, "SIGTERM: stopping without requeue (the sender decides what comes next)"
    if not cfg.requeue:
        return False, "train.preemption.requeue=false: not requeueing; submit again to resume"
    job = env.get("SLURM_JOB_ID")
    if not job:
        return False, "not a SLURM job: run the same command again to resume"
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    if restarts >= cfg.max_requeues:
        return False, (f"job {job} has been restarted {restarts} times "
                       f"(train.preemption.max_requeues={cfg.max_requeues}): not requeueing; "
                       "submit again to resume")
    return True, f"requeueing SLURM job {job} (restart {restarts + 1} of at most {cfg.max_requeues})"


class Preemption:
    """Signal handlers for one run; :meth:`should_stop` once per step on every rank."""

    def __init__(self, cfg: PreemptionConfig, key: str = "train.preemption"):
        from megarlhf.config import ConfigError

        if cfg.max_requeues < 0:
            raise ConfigError([f"{key}.max_requeues={cfg.max_requeues} must be >= 0"])
        self.cfg = cfg
        self.received: Optional[str] = None
        """Name of the first signal this process received (for the log)."""
        self.reason: Optional[str] = None
        """The agreed reason once :meth:`should_stop` returned True: ``requeue``, ``sigterm``
        or ``halt``."""
        self.halt_message: Optional[str] = None
        self._flag = _NONE
        self._previous = {}
        sig = _parse_signal(cfg.signal, f"{key}.signal")
        if sig is not None:
            self._install(sig, _REQUEUE)
        if cfg.on_sigterm:
            self._install(signal.SIGTERM, _TERM)

    def _install(self, sig: signal.Signals, code: int) -> None:
        def handler(signum, frame):
            self._flag = max(self._flag, code)
            self.received = self.received or signal.Signals(signum).name

        self._previous[sig] = signal.signal(sig, handler)

    def uninstall(self) -> None:
        """Restore the handlers that were in place before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def halt(self, message: str) -> None:
        """This rank asks the run to stop with an error after saving its state at the end
        of this step (every rank agrees in :meth:`should_stop`)."""
        self._flag = _HALT
        self.halt_message = self.halt_message or message

    def should_stop(self) -> bool:
        """Whether any rank of the job received a stop signal. Collective over the default
        process group (one small all-reduce): call it on every rank, once per step."""
        flag = self._flag
        if dist.is_initialized() and dist.get_world_size() > 1:
            from megarlhf import platform

            t = torch.tensor([flag], dtype=torch.int32, device=platform.current().device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        if flag == _NONE:
            return False
        self.reason = {_TERM: "sigterm", _HALT: "halt"}.get(flag, "requeue")
        return True

    def end_of_step(self, step: int, total_steps: int, save_interval: int,
                    save: Callable[[], str], log=None) -> None:
        """Collective, once per step on every rank: ``save()`` (which returns the checkpoint
        folder) every ``save_interval`` steps before the last, or at once when a signal
        arrived, and after a signal :meth:`exit`."""
        stop = self.should_stop()
        if stop and self.reason == "halt":
            from megarlhf.train.guard import TrainingHalted

            saved = save()
            why = self.halt_message or "another rank halted the run"
            if log is not None:
                log.say(f"halted after step {step}: {why}; saved {saved}")
                log.close()
            raise TrainingHalted(f"halted after step {step}: {why}. Saved that state to {saved}; "
                                 "resume from it with train.resume=auto once the cause is fixed "
                                 "(lower the learning rate, check the data)")
        if (stop or save_interval and step % save_interval == 0) and step < total_steps:
            saved = save()
            if stop:
                self.exit(step, saved, log)  # requeue under SLURM; exit with status 75

    def exit(self, step: int, checkpoint: str, log=None) -> NoReturn:
        """Once ``checkpoint`` is saved: rank 0 requeues the SLURM job when
        :func:`requeue_decision` allows, then every rank leaves with :data:`STOPPED_EXIT`.
        Collective."""
        from megarlhf.parallel import destroy

        say = log.say if log is not None else print
        rank = dist.get_rank() if dist.is_initialized() else 0
        requeue, why = requeue_decision(self.reason or "requeue", self.cfg)
        got = self.received or "another rank's signal"
        say(f"stopped after step {step} ({got}); saved {checkpoint}; {why}")
        if requeue and rank == 0:
            job = os.environ["SLURM_JOB_ID"]
            try:
                res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                                     timeout=120)
                ok, detail = res.returncode == 0, (res.stderr or res.stdout).strip()
            except (OSError, subprocess.TimeoutExpired) as e:
                ok, detail = False, str(e)
            if not ok:
                print(f"megarlhf: scontrol requeue {job} failed ({detail}); submit the job again "
                      "to resume from the checkpoint", file=sys.stderr, flush=True)
        # Rank 0 has asked for the requeue before anyone leaves: srun --kill-on-bad-exit
        # ends the whole step as soon as one task exits.
        if dist.is_initialized():
            dist.barrier()
        if log is not None:
            log.close()
        destroy()
        sys.stdout.flush()
        raise SystemExit(STOPPED_EXIT)
