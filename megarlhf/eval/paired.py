"""Two policies scored on the same problems: the paired difference of their accuracies,
with a confidence interval and an exact test (pure functions, numbers in, numbers out).

Each problem gives a pair of outcomes (baseline right?, candidate right?). Only the
discordant problems move the difference ``acc(candidate) - acc(baseline)``:

* :func:`paired_bootstrap`: the percentile interval of the difference over resamples of
  the problems (with replacement). A resample of n problems is a multinomial draw of how
  many fall in each of the three per-problem differences (-1, 0, +1), so the resamples are
  drawn as counts, exactly as resampling the problems one by one would draw them.
* :func:`mcnemar_exact`: the two-sided exact McNemar test (a binomial test of the
  discordant problems against 1/2).
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np

__all__ = ["paired_bootstrap", "mcnemar_exact", "paired_difference"]


def _discordant(baseline: Sequence[bool], candidate: Sequence[bool]):
    if len(baseline) != len(candidate):
        raise ValueError(f"paired outcomes need the same problems: {len(baseline)} vs {len(candidate)}")
    if not baseline:
        raise ValueError("no problems to compare")
    worse = sum(1 for a, b in zip(baseline, candidate) if a and not b)   # the candidate lost it
    better = sum(1 for a, b in zip(baseline, candidate) if b and not a)  # the candidate won it
    return len(baseline), worse, better


def paired_bootstrap(baseline: Sequence[bool], candidate: Sequence[bool], level: float = 0.95,
                     resamples: int = 20000, seed: int = 0) -> Dict[str, float]:
    """``acc(candidate) - acc(baseline)`` over the same problems and its percentile
    bootstrap interval at ``level``: ``{"difference", "low", "high"}`` (accuracy units)."""
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    n, worse, better = _discordant(baseline, candidate)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [worse / n, better / n, (n - worse - better) / n], size=resamples)
    diffs = (counts[:, 1] - counts[:, 0]) / n
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return {"difference": (better - worse) / n, "low": float(low), "high": float(high)}


def mcnemar_exact(baseline: Sequence[bool], candidate: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: ``min(1, 2 P(X <= min(b, c)))`` for X ~ Bin(b + c,
    1/2), b and c the problems only one of the two got right (1.0 when there are none)."""
    _, worse, better = _discordant(baseline, candidate)
    m = worse + better
    if m == 0:
        return 1.0
    k = min(worse, better)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def paired_difference(baseline: Sequence[bool], candidate: Sequence[bool], level: float = 0.95,
                      resamples: int = 20000, seed: int = 0) -> Dict[str, float]:
    """Both: the difference, its bootstrap interval (``low``, ``high``), the McNemar
    p-value and the discordant counts (``won``: only the candidate right, ``lost``: only
    the baseline right), over ``n`` problems."""
    n, worse, better = _discordant(baseline, candidate)
    out = paired_bootstrap(baseline, candidate, level, resamples, seed)
    return {**out, "p_mcnemar": mcnemar_exact(baseline, candidate), "won": better, "lost": worse, "n": n,
            "level": level}
