"""Data order (DP sharding, resume), padded/packed batches, and the built-in task."""

import random

import pytest
import torch

from megarlhf.data.batch import pack_examples, pad_examples, segments_to_attention_mask
from megarlhf.data.sampler import ShardedSampler
from megarlhf.data.task import (TaskConfig, extract_answer, generate_problem, is_correct,
                                wrong_solution, write_task_files)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_each_example_once_per_epoch_at_dp2():
    n, gbs = 103, 10
    ranks = [ShardedSampler(n, gbs, r, 2, seed=4) for r in range(2)]
    steps = ranks[0].steps_per_epoch
    assert steps == 10 and ranks[0].dropped_per_epoch == 3
    seen = [i for s in ranks for b in take(s.batches(), steps) for i in b]
    assert len(seen) == len(set(seen)) == 100
    # the second epoch is a different permutation, again without repeats
    epoch2 = [i for s in ranks for b in take(s.batches(), 2 * steps)[steps:] for i in b]
    assert len(set(epoch2)) == 100 and epoch2 != seen


def test_resume_sees_the_same_order_as_an_uninterrupted_run():
    s = ShardedSampler(50, 8, 1, 2, seed=9)
    full = take(s.batches(0), 20)  # crosses two epoch boundaries
    for stop in (3, 6, 7, 13):
        resumed = take(s.batches(consumed_samples=stop * 8), 20 - stop)
        assert resumed == full[stop:]
    with pytest.raises(ValueError, match="not a multiple"):
        next(s.batches(5))


def test_sampler_errors():
    with pytest.raises(ValueError, match="not divisible by the data-parallel size"):
        ShardedSampler(100, 10, 0, 3, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedSampler(5, 10, 0, 1, seed=0)


EXAMPLES = [([1, 5, 6, 7, 2], [False, False, True, True, True]),
            ([1, 8, 9, 2], [False, True, True, True]),
            ([1, 3, 4, 4, 4, 4, 2], [False, False, False, True, True, True, True])]


def test_padding_shifts_labels_and_masks():
    b = pad_examples(EXAMPLES, 8, pad_id=0, rows=4)
    assert b.tokens.shape == (4, 8) and b.attention_mask is None
    assert b.labels[0, :4].tolist() == [5, 6, 7, 2]
    assert b.loss_mask[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert b.num_loss_tokens == sum(sum(m[1:]) for _, m in EXAMPLES)
    assert b.loss_mask[3].sum() == 0  # filler row


def test_packing_keeps_examples_apart():
    b = pack_examples(EXAMPLES, 10, pad_id=0, row_multiple=2)
    assert b.tokens.shape == (2, 10)
    assert b.tokens[0].tolist() == [1, 5, 6, 7, 2, 1, 8, 9, 2, 0]
    assert b.num_loss_tokens == sum(sum(m[1:]) for _, m in EXAMPLES)
    m = b.attention_mask[0, 0]
    assert not m[6, 5] and m[6, 4]  # the 2nd example sees its own BOS, not the 1st example
    assert m[3, 4]  # causal
    assert not m[9, 9] and m[9, 8]  # padding attends only itself
    seg = torch.tensor([[0, 0, 1, 1]])
    assert segments_to_attention_mask(seg)[0, 0].tolist() == [
        [False, True, True, True], [False, False, True, True],
        [True, True, False, True], [True, True, False, False]]


def test_too_long_example_is_an_error():
    with pytest.raises(ValueError, match="exceeds seq_length"):
        pack_examples(EXAMPLES, 6, 0)


def test_task_is_deterministic_and_correct(tmp_path):
    cfg = TaskConfig(seed=3, num_sft=50, num_preference=30, num_prompts=20, num_eval=40)
    a = write_task_files(str(tmp_path / "a"), cfg)
    b = write_task_files(str(tmp_path / "b"), cfg)
    for k in a:
        assert open(a[k]).read() == open(b[k]).read()
    import json
    eval_q = {json.loads(l)["prompt"] for l in open(a["eval"])}
    sft_q = {json.loads(l)["messages"][0]["content"] for l in open(a["sft"])}
    assert len(eval_q) == 40 and not eval_q & sft_q  # the held-out set is disjoint
    rng = random.Random(0)
    for _ in range(200):
        p = generate_problem(rng, cfg)
        assert is_correct(p.solution(), str(p.answer))
        assert not is_correct(wrong_solution(p, rng), str(p.answer))


# The files of TaskConfig(seed=3, num_sft=50, num_preference=30, num_prompts=20, num_eval=40)
# as written before the validation split existed: adding it changed none of them.
_TOY_SHA256 = {
    "eval": "d47f094cd0b08627da4da85690f583d4070d994de61c93d5c9d3bc1db156b02f",
    "preference": "2103ad18a555a681229dd74e0cc2b77f8dc5d04b5be051b0cc8657daeac4b6a1",
    "prompts": "497ec1bc0677c2e50d72f52dc6429fe9821130500952c9e58e8fcc8fe583444f",
    "sft": "f56d23aab79d62ec930ab23c71358ac7c6080e03f9956e87e3570085474e2f5b",
    "ultrafeedback": "b27601d330d4291d2468c166ede4553d0de7a87b8d5e91f8f36e35df25439b5f",
}


def _questions(path):
    import json

    rows = [json.loads(l) for l in open(path)]
    return [r["messages"][0]["content"] if "messages" in r else r.get("prompt", r.get("instruction"))
            for r in rows]


@pytest.mark.parametrize("num_validation", [1, 40, 500])
def test_validation_split_leaves_the_other_files_as_they_were(tmp_path, num_validation):
    import hashlib

    cfg = TaskConfig(seed=3, num_sft=50, num_preference=30, num_prompts=20, num_eval=40,
                     num_validation=num_validation)
    files = write_task_files(str(tmp_path), cfg)
    for name, digest in _TOY_SHA256.items():
        assert hashlib.sha256(open(files[name], "rb").read()).hexdigest() == digest, name


def test_validation_split_shares_no_question_with_any_other_file(tmp_path):
    import json

    # few distinct questions (one step, values up to 4): the streams collide often
    cfg = TaskConfig(seed=1, max_steps=1, max_value=4, num_sft=3000, num_preference=300, num_prompts=300,
                     num_eval=200, num_validation=300)
    files = write_task_files(str(tmp_path), cfg)
    rows = [json.loads(l) for l in open(files["validation"])]
    assert len(rows) == 300 and all(set(r) == {"prompt", "reference"} for r in rows)
    val = [r["prompt"] for r in rows]
    assert len(set(val)) == 300
    for name in ("eval", "sft", "preference", "ultrafeedback", "prompts"):
        assert not set(val) & set(_questions(files[name])), name
    eval_q = set(_questions(files["eval"]))
    assert all(not eval_q & set(_questions(files[n])) for n in ("sft", "preference", "prompts"))


def test_too_few_distinct_questions_is_an_error_not_a_hang(tmp_path):
    # one step from values up to 2: 3600 distinct questions in all
    cfg = TaskConfig(max_steps=1, max_value=2, num_sft=1, num_preference=1, num_prompts=1, num_eval=3000,
                     num_validation=1000)
    with pytest.raises(ValueError, match="too few distinct questions for 1000 validation problems"):
        write_task_files(str(tmp_path), cfg)


def test_answer_extraction():
    assert extract_answer("3 + 4 = 7.\n#### 7") == "7"
    assert extract_answer("#### 1,234") == "1234"
    assert extract_answer("no answer") is None
    assert is_correct("x #### 12", "12") and not is_correct("x #### 13", "12")
