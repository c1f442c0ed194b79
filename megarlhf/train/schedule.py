"""Learning-rate schedules: megatron-core's ``OptimizerParamScheduler``, sized in steps."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ScheduleConfig", "build_scheduler"]


@dataclass(frozen=True)
class ScheduleConfig:
    """Warmup, then decay to a floor."""

    style: str = "cosine"
    """``cosine``, ``linear`` or ``constant`` after warmup."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of all steps (used when ``warmup_steps`` is 0)."""
    warmup_steps: int = 0
    """Warmup steps (overrides ``warmup_ratio`` when > 0)."""


def build_scheduler(optimizer, cfg: ScheduleConfig, lr: float, min_lr: float, total_steps: int,
                    weight_decay: float = 0.0):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if cfg.style not in ("cosine", "linear", "constant"):
        raise ValueError(f"schedule.style={cfg.style!r}: expected cosine, linear or constant")
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else lr, max_lr=lr, min_lr=min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=cfg.style, start_wd=weight_decay, end_wd=weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant")
