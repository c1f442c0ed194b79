"""Reward model and DPO: the same pairs packed and padded give the same losses, statistics
and gradients, on one process and at TP=2 and PP=2."""

import pytest

from tests.conftest import launch


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_packed_pairs_equal_padded(tp, pp):
    out = launch("tests/recipes/pair_packing_worker.py", tp * pp, str(tp), str(pp))
    assert all(f"rank {r} ok" in out for r in range(tp * pp))
