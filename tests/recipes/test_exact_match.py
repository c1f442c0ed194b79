"""Exact-match evaluation keeps each problem's outcome, in the prompt file's order, gathered
over the data-parallel replicas."""

import json

import pytest

from tests.conftest import launch, one_rank


def test_gather_outcomes_at_one_rank():
    from megarlhf.recipes.common import gather_outcomes

    with one_rank(seed=1) as mp:
        assert gather_outcomes([True, False, True], range(0, 3), 3, mp) == [True, False, True]
        assert gather_outcomes([], range(0, 0), 0, mp) == []
        with pytest.raises(ValueError, match="2 outcomes for a share of 3 problems"):
            gather_outcomes([True, False], range(0, 3), 3, mp)


def test_exact_match_outcomes_follow_the_prompt_file_at_one_rank(sft_like, monkeypatch):
    import megarlhf.data.task as task
    from megarlhf.recipes.common import checkpoint_exact_match

    ckpt, files = sft_like
    monkeypatch.setattr(task, "is_correct", lambda text, reference: int(reference) % 2 == 0)
    want = [int(json.loads(l)["reference"]) % 2 == 0 for l in open(files["eval"])][:10]
    with one_rank(seed=1) as mp:
        em = checkpoint_exact_match(str(ckpt), mp, files["eval"], 10, 4, 4)
    assert em.outcomes == want and em.n == 10 and em.accuracy == sum(want) / 10 and em.seconds > 0


def test_exact_match_outcomes_are_gathered_over_two_replicas(sft_like):
    ckpt, files = sft_like
    out = launch("tests/recipes/exact_match_worker.py", 2, ckpt, files["eval"])
    assert "rank 0 ok" in out and "rank 1 ok" in out
