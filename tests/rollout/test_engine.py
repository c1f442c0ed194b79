"""The KV-cached engine: greedy equals transformers' generate; samples are identical at
every layout for the same seed; stop ids, finish reasons and log-probs."""

import math

import pytest
import torch

from tests.conftest import torchrun


def generate(ckpt, tmp_path, tp, pp):
    out = tmp_path / f"gen_{tp}_{pp}.pt"
    torchrun("tests/rollout/engine_worker.py", tp * pp, ckpt, tp, pp, out)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def tp1(mg_causal, tmp_path_factory):
    return generate(mg_causal, tmp_path_factory.mktemp("gen"), 1, 1)


def test_greedy_matches_transformers_generate(hf_causal, tp1):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(hf_causal, dtype=torch.float32).eval()
    for p, got in zip(tp1["prompts"], tp1["greedy"].response_ids):
        ref = m.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                         pad_token_id=0)[0, len(p):].tolist()
        assert got == ref
    assert tp1["greedy"].finish_reason == ["length"] * 5


def test_layouts_give_identical_samples(mg_causal, tmp_path, tp1):
    other = generate(mg_causal, tmp_path, 2, 2)
    for key in ("greedy", "sample", "stopped"):
        assert other[key].response_ids == tp1[key].response_ids
    for a, b in zip(other["sample"].policy_logprobs, tp1["sample"].policy_logprobs):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4


def test_samples_logprobs_and_stops(tp1):
    s = tp1["sample"]
    assert s.response_ids != tp1["greedy"].response_ids
    for ids, samp, pol in zip(s.response_ids, s.sample_logprobs, s.policy_logprobs):
        assert len(ids) == len(samp) == len(pol) == 10
        assert all(x <= 0 for x in pol) and all(math.isfinite(x) for x in samp)
        # truncation (top-p/k) and temperature 0.7 make sampled tokens likelier than under
        # the raw policy: the two log-prob kinds really differ
    assert sum(sum(a) for a in s.sample_logprobs) > sum(sum(b) for b in s.policy_logprobs)
    st = tp1["stopped"]
    assert st.finish_reason[1] == "stop" and st.response_ids[1][-1] == tp1["stop"]
    assert len(st.response_ids[1]) <= 4
    assert all(len(r) <= 10 for r in st.response_ids)
