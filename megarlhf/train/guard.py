"""Non-finite steps: :func:`megarlhf.train.step.train_step` skips an update whose loss or
gradients hold NaN/Inf on any rank; :class:`BadSteps` counts the skips and, after
``max_in_row`` of them in a row, asks the run to halt (every rank agrees at the end of the
step, the recipe saves the last good state, then the run stops with an error).

    guard = BadSteps(t.max_bad_steps, "train.max_bad_steps")
    res = train_step(...)
    guard.record(res["skipped"], step, preempt)   # counts; after K in a row preempt.halt(...)
"""

from __future__ import annotations

from typing import Optional

__all__ = ["BadSteps", "TrainingHalted"]


class TrainingHalted(RuntimeError):
    """The run stopped itself (e.g. too many non-finite steps in a row) after saving."""


class BadSteps:
    """Skipped-step counter of one trainable model."""

    def __init__(self, max_in_row: int, key: str = "train.max_bad_steps", name: str = ""):
        self.max_in_row = max_in_row
        self.key = key
        self.name = name
        self.total = 0
        """Updates skipped since the run (this process) started."""
        self.in_row = 0
        self.first_of_row: Optional[int] = None

    def record(self, skipped: bool, step: int, preempt=None) -> None:
        """Count one update of the step numbered ``step`` (1-based); when ``max_in_row``
        updates in a row were skipped, ``preempt.halt`` with the reason."""
        if not skipped:
            self.in_row, self.first_of_row = 0, None
            return
        self.total += 1
        self.in_row += 1
        if self.first_of_row is None:
            self.first_of_row = step
        if self.max_in_row and self.in_row >= self.max_in_row and preempt is not None:
            who = f"{self.name} " if self.name else ""
            preempt.halt(f"{self.in_row} {who}updates in a row had a non-finite loss or gradient "
                         f"(steps {self.first_of_row}-{step}; {self.key}={self.max_in_row}); the "
                         "weights and optimizer state are those before the first of them")
