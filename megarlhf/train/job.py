"""What every recipe does around its loop, written once: start the process's part of the
job (signal handlers, process groups, metrics log), make a model trainable (megatron DDP,
optimizer, LR schedule, skipped-step guard), take one optimizer step, resume, save."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megarlhf.parallel import ModelParallel

__all__ = ["Run", "start_run", "Trainable", "make_trainable", "total_steps_of", "resume", "save_state"]


@dataclass
class Run:
    """This process's part of a training job."""

    env: Any
    """The launch (:class:`~megarlhf.parallel.DistEnv`)."""
    mp: ModelParallel
    """The job-wide layout (PPO: the trivial one; its roles have their own)."""
    log: Any
    """The metrics log (:class:`~megarlhf.train.metrics.MetricsLog`)."""
    preempt: Any
    """Signal handling and requeueing (:class:`~megarlhf.train.preemption.Preemption`)."""
    device: Any


def start_run(name: str, cfg, parallel=None, detail: str = "") -> Run:
    """Install the signal handlers (first: a signal only sets a flag), join the job,
    build megatron's layout (``parallel``, or the trivial one that only seeds the RNG
    tracker when each model brings its own), open the metrics log and say what runs where."""
    from megarlhf import platform
    from megarlhf.config import ParallelConfig
    from megarlhf.parallel import DistEnv, init_distributed, initialize_model_parallel
    from megarlhf.train.metrics import MetricsLog
    from megarlhf.train.preemption import Preemption

    t = cfg.train
    preempt = Preemption(t.preemption)
    env = DistEnv.from_environ()
    init_distributed(env)
    plat = platform.current()
    mp = initialize_model_parallel(parallel or ParallelConfig(), seed=t.seed)
    log = MetricsLog(t.out_dir, cfg.log, dataclasses.asdict(cfg))
    log.say(f"megarlhf {name}: {env.world_size} process(es) on {plat.describe()}{detail}")
    return Run(env, mp, log, preempt, plat.device)


def total_steps_of(t, steps_per_epoch: int) -> int:
    """``train.max_steps``, else ``train.epochs`` passes (at least one step)."""
    return t.max_steps or max(1, int(t.epochs * steps_per_epoch))


@dataclass
class Trainable:
    """A model with what trains it: DDP-wrapped chunks, optimizer, LR schedule and the
    guard that counts skipped updates."""

    ddp: List[torch.nn.Module]
    optimizer: Any
    scheduler: Any
    guard: Any

    def step(self, mp: ModelParallel, forward_step: Callable, micro: Sequence[Any], seq: int,
             micro_batch_size: int, step: int, preempt, advance_schedule: bool = True) -> Dict[str, Any]:
        """One optimizer step (:func:`~megarlhf.train.step.train_step`) of the recipe's step
        ``step`` (1-based); the schedule advances only when the update was applied (PPO,
        with several updates per step, advances it itself), and a skipped one is counted
        (too many in a row halt the run through ``preempt``)."""
        from megarlhf.train.step import train_step

        t0 = time.time()
        res = train_step(self.ddp, self.optimizer, mp, forward_step, micro, seq, micro_batch_size)
        if res["applied"] and advance_schedule:
            self.scheduler.step(1)
        self.guard.record(res["skipped"], step, preempt)
        res["seconds"] = time.time() - t0
        return res

    def record(self, res: Dict[str, Any], tokens: int) -> Dict[str, float]:
        """The metrics every recipe logs for a step: learning rate, skipped updates so far,
        gradient norm, tokens/s and seconds."""
        dt = res["seconds"]
        return {"lr": self.optimizer.param_groups[0]["lr"],
                **({"skipped_steps": self.guard.total} if self.guard.total else {}),
                "grad_norm": float(res["grad_norm"] or 0.0), "tokens_per_s": round(tokens / max(dt, 1e-9)),
                "step_s": round(dt, 3)}


def make_trainable(chunks: List[torch.nn.Module], mp: ModelParallel, t, lr: float, min_lr: float,
                   total_steps: int, distributed_optimizer: bool = False, name: str = "") -> Trainable:
    """Per-token losses (megatron divides each step's loss sum by its global count), DDP,
    megatron's optimizer (sharded over DP when ``distributed_optimizer`` and DP > 1) and
    the LR schedule of loop config ``t``."""
    from megarlhf.train.guard import BadSteps
    from megarlhf.train.optim import OptimConfig, build_optimizer, wrap_ddp
    from megarlhf.train.schedule import build_scheduler

    for c in chunks:
        c.config.calculate_per_token_loss = True
    dist_opt = distributed_optimizer and mp.dp_size > 1
    ddp = wrap_ddp(chunks, mp, dist_opt)
    opt = build_optimizer(ddp, OptimConfig(lr=lr, min_lr=min_lr, weight_decay=t.weight_decay, adam_beta2=t.adam_beta2,
                                           clip_grad=t.clip_grad, use_distributed_optimizer=dist_opt), mp)
    sched = build_scheduler(opt, t.schedule, lr, min_lr, total_steps, t.weight_decay)
    return Trainable(ddp, opt, sched, BadSteps(t.max_bad_steps, name=name))


def resume(run: Run, t, chunks: List[torch.nn.Module], tr: Trainable, unit: str) -> Tuple[int, int]:
    """(step, items consumed) from the training checkpoint ``train.resume`` names (``auto``:
    the newest complete one in ``out_dir``), or (0, 0)."""
    from megarlhf.train.checkpoint import find_checkpoint, load_train_state

    ckpt = find_checkpoint(t.out_dir, t.resume)
    if not ckpt:
        return 0, 0
    state = load_train_state(ckpt, chunks, tr.optimizer, tr.scheduler)
    run.log.say(f"resumed from {ckpt} at step {state['step']} ({state['consumed_samples']} {unit} consumed)")
    return state["step"], state["consumed_samples"]


def save_state(t, step: int, consumed: int, chunks: List[torch.nn.Module], tr: Trainable, meta,
               extra: Optional[Dict[str, Any]] = None) -> str:
    """A resumable training checkpoint in ``out_dir`` (collective)."""
    from megarlhf.train.checkpoint import save_train_state

    return save_train_state(t.out_dir, step, chunks, tr.optimizer, tr.scheduler,
                            {"consumed_samples": consumed, **(extra or {})}, meta, keep=t.keep_checkpoints)
