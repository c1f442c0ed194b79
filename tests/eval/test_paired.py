"""Paired comparison of two policies on the same problems: bootstrap interval and McNemar."""

import random

import pytest

from megarlhf.eval.paired import mcnemar_exact, paired_bootstrap, paired_difference


def test_identical_outcomes_give_zero_and_p_one():
    a = [True, False, True, True, False] * 20
    r = paired_difference(a, list(a))
    assert r["difference"] == 0 and r["low"] == 0 and r["high"] == 0 and r["p_mcnemar"] == 1.0
    assert (r["won"], r["lost"], r["n"]) == (0, 0, 100)


def test_mcnemar_exact_values():
    # b = 0, c = 10: 2 * 0.5^10
    assert mcnemar_exact([False] * 10 + [True] * 5, [True] * 15) == pytest.approx(2 / 1024)
    # b = 2, c = 8: 2 * (1 + 10 + 45) / 1024
    base = [True] * 2 + [False] * 8
    cand = [False] * 2 + [True] * 8
    assert mcnemar_exact(base, cand) == pytest.approx(2 * 56 / 1024)
    assert mcnemar_exact(cand, base) == mcnemar_exact(base, cand)  # two-sided


def test_bootstrap_matches_resampling_problems_one_by_one():
    """The count-based resamples have the law of resampling the problems themselves."""
    rng = random.Random(1)
    base = [rng.random() < 0.6 for _ in range(300)]
    cand = [b if rng.random() < 0.8 else rng.random() < 0.75 for b in base]
    fast = paired_bootstrap(base, cand, resamples=40000, seed=3)
    pairs = list(zip(base, cand))
    slow = []
    for _ in range(4000):
        sample = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        slow.append(sum(c - b for b, c in sample) / len(sample))
    slow.sort()
    assert fast["difference"] == pytest.approx(sum(c - b for b, c in pairs) / len(pairs))
    assert fast["low"] == pytest.approx(slow[int(0.025 * len(slow))], abs=0.006)
    assert fast["high"] == pytest.approx(slow[int(0.975 * len(slow))], abs=0.006)


def test_a_clear_gain_has_an_interval_above_zero_and_a_small_p():
    base = [True] * 300 + [False] * 200
    cand = [True] * 300 + [True] * 60 + [False] * 140   # 60 won, none lost
    r = paired_difference(base, cand)
    assert r["difference"] == pytest.approx(0.12) and r["low"] > 0 and r["p_mcnemar"] < 1e-10


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="same problems: 2 vs 3"):
        paired_bootstrap([True, False], [True, False, True])
    with pytest.raises(ValueError, match="no problems"):
        mcnemar_exact([], [])
    with pytest.raises(ValueError, match=r"level=1.5"):
        paired_bootstrap([True], [False], level=1.5)
