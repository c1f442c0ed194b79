"""Packed and padded batches of the same examples give the same loss and gradients."""

from tests.conftest import launch


def test_packed_equals_padded_at_tp2():
    out = launch("tests/data/packing_worker.py", 2, "2")
    assert "rank 0 ok" in out and "rank 1 ok" in out


def test_thd_packed_equals_padded_at_tp2():
    """The same packed rows as megatron's thd layout (SDPA attention per example)."""
    out = launch("tests/data/packing_worker.py", 2, "2", "thd")
    assert "rank 0 ok thd" in out and "rank 1 ok thd" in out
