"""What every recipe's training loop is configured by, with one meaning everywhere.

Each recipe's ``train:`` section is a subclass of :class:`LoopConfig` that adds what only
it has (batch sizes, learning rates, the starting checkpoint) and may change a default;
``eval:`` is :class:`EvalConfig` in every recipe that evaluates generations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from megarlhf.train.preemption import PreemptionConfig
from megarlhf.train.schedule import ScheduleConfig

__all__ = ["LoopConfig", "OneModelLoopConfig", "EvalConfig", "SCHEDULES"]

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class LoopConfig:
    """The optimisation loop."""

    epochs: float = 1.0
    """Passes over the training data (sets the number of steps when ``max_steps`` is 0)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: from ``epochs``)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    out_dir: str = "runs/job"
    """Training checkpoints (``checkpoints/``), the final model, ``metrics.jsonl``."""
    save_interval: int = 0
    """Steps between training checkpoints (0: only at the end and when stopped by a signal)."""
    keep_checkpoints: int = 2
    """Training checkpoints kept (older ones are deleted once a newer one is complete)."""
    resume: str = "auto"
    """``auto``: continue from the newest complete training checkpoint in ``out_dir`` if
    any; ``never``; or a checkpoint folder."""
    eval_interval: int = 0
    """Steps between evaluations during training (0: none); every recipe evaluates at the
    end, and before the first step when ``eval.at_start`` is set."""
    max_bad_steps: int = 5
    """Stop (after saving) when this many updates in a row were skipped for a NaN/Inf loss
    or gradient (a skipped update changes nothing; 0: never stop)."""
    seed: int = 1234
    """Seeds the weights of fresh layers, the order of the training data and sampling."""
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    """Checkpoint and stop on a signal (SLURM's warning before the time limit); requeue."""

    def problems(self, prefix: str = "train") -> List[str]:
        """What cannot work, each naming its key (the subclass's own fields included:
        every positive size and learning rate a recipe adds is named in ``POSITIVE``)."""
        from megarlhf.config.validate import range_problems

        p = range_problems(self, prefix, positive=self.POSITIVE,
                           non_negative=("epochs", "max_steps", "weight_decay", "clip_grad", "save_interval",
                                         "keep_checkpoints", "eval_interval", "max_bad_steps") + self.NON_NEGATIVE)
        if self.epochs == 0 and self.max_steps == 0:
            p.append(f"{prefix}.epochs=0 and {prefix}.max_steps=0: nothing to train")
        if not 0 <= self.adam_beta2 < 1:
            p.append(f"{prefix}.adam_beta2={self.adam_beta2} must be in [0, 1)")
        if not 0 <= self.seed < 2**32:
            p.append(f"{prefix}.seed={self.seed} must be in [0, 2**32)")
        s = self.schedule
        if s.style not in SCHEDULES:
            p.append(f"{prefix}.schedule.style={s.style!r}: expected one of {', '.join(SCHEDULES)}")
        p += range_problems(s, f"{prefix}.schedule", fraction=("warmup_ratio",), non_negative=("warmup_steps",))
        p += range_problems(self.preemption, f"{prefix}.preemption", non_negative=("max_requeues",))
        return p + self.own_problems(prefix)

    POSITIVE: ClassVar[tuple] = ()
    NON_NEGATIVE: ClassVar[tuple] = ()

    def own_problems(self, prefix: str) -> List[str]:
        """A subclass's cross-field checks."""
        return []


@dataclass(frozen=True)
class OneModelLoopConfig(LoopConfig):
    """The loop of a recipe that trains one model at one learning rate (SFT, reward model,
    DPO). The recipe declares ``global_batch_size``, ``micro_batch_size``, ``seq_length``,
    ``lr`` and ``min_lr`` with its own defaults; they are checked here: sizes and peak
    positive, the floor not above the peak."""

    POSITIVE: ClassVar[tuple] = ("global_batch_size", "micro_batch_size", "seq_length", "lr")
    NON_NEGATIVE: ClassVar[tuple] = ("min_lr",)

    def own_problems(self, prefix: str) -> List[str]:
        return [f"{prefix}.min_lr={self.min_lr} is above {prefix}.lr={self.lr}"] if self.min_lr > self.lr else []


@dataclass(frozen=True)
class EvalConfig:
    """Exact-match evaluation of greedy answers on verifiable prompts (rows with a
    ``reference``), at the end of training, every ``train.eval_interval`` steps and, with
    ``at_start``, before the first."""

    prompts: Optional[str] = None
    """JSONL of ``{prompt, reference}``; none: no evaluation (SFT on the built-in task:
    the task's held-out set)."""
    num_prompts: int = 500
    """How many of them (at least 500 for a reported figure)."""
    max_new_tokens: int = 48
    batch_size: int = 128
    """Prompts generated at once per data-parallel replica."""
    at_start: bool = False
    """Also evaluate the starting model, before the first step (not on resume)."""

    def problems(self, prefix: str = "eval") -> List[str]:
        from megarlhf.config.validate import range_problems

        return range_problems(self, prefix, positive=("num_prompts", "max_new_tokens", "batch_size"))
