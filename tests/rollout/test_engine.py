"""The KV-cached engine: greedy equals transformers' generate; the same seed gives the same
tokens at every layout and chunking; log-probs equal the training forward's; EOS, stop
and length endings on ragged prompts; padded ids never produced."""

import pytest
import torch

from tests.conftest import launch


def generate(ckpt, tmp_path, tp, pp):
    out = tmp_path / f"gen_{tp}_{pp}.pt"
    launch("tests/rollout/engine_worker.py", tp * pp, ckpt, tp, pp, out)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def tp1(mg_causal, tmp_path_factory):
    return generate(mg_causal, tmp_path_factory.mktemp("gen"), 1, 1)


@pytest.fixture(scope="module")
def tp2pp2(mg_causal, tmp_path_factory):
    return generate(mg_causal, tmp_path_factory.mktemp("gen"), 2, 2)


def test_greedy_matches_transformers_generate(hf_causal, tp1):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(hf_causal, dtype=torch.float32).eval()
    for p, got in zip(tp1["prompts"], tp1["greedy"].response_ids):
        ref = m.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                         pad_token_id=0)[0, len(p):].tolist()
        assert got == ref
    assert tp1["greedy"].finish_reason == ["length"] * 5


@pytest.mark.parametrize("key", ["greedy", "sample", "stopped"])
def test_tp2_pp2_gives_the_same_tokens(tp1, tp2pp2, key):
    assert tp2pp2[key].response_ids == tp1[key].response_ids


def test_pp2_alone_gives_the_same_tokens(mg_causal, tmp_path, tp1):
    pp2 = generate(mg_causal, tmp_path, 1, 2)
    for key in ("greedy", "sample"):
        assert pp2[key].response_ids == tp1[key].response_ids
    assert pp2["policy_logprob_err"] < 1e-5


def test_chunking_gives_the_same_outputs(tp1):
    a, b = tp1["sample"], tp1["sample_one_chunk"]
    assert a.response_ids == b.response_ids and a.finish_reason == b.finish_reason
    flat = lambda rows: [x for r in rows for x in r]  # noqa: E731
    assert flat(a.policy_logprobs) == pytest.approx(flat(b.policy_logprobs), abs=1e-6)


@pytest.mark.parametrize("layout", ["tp1", "tp2pp2"])
def test_logprobs_equal_the_training_forward(tp1, tp2pp2, layout):
    r = {"tp1": tp1, "tp2pp2": tp2pp2}[layout]
    assert r["policy_logprob_err"] < 1e-5   # temperature 1, no truncation
    assert r["sample_logprob_err"] < 1e-5   # temperature 0.7, top-k 50, top-p 0.9


def test_sampling_vs_policy_logprobs_differ(tp1):
    s = tp1["sample"]
    assert s.response_ids != tp1["greedy"].response_ids
    for ids, samp, pol in zip(s.response_ids, s.sample_logprobs, s.policy_logprobs):
        assert len(ids) == len(samp) == len(pol) == 10
        assert all(x <= 0 for x in pol)
    # truncation and temperature < 1 make the sampled tokens likelier under the sampler
    assert sum(map(sum, s.sample_logprobs)) > sum(map(sum, s.policy_logprobs))


def test_eos_stop_and_length_on_ragged_prompts(tp1):
    st, greedy = tp1["stopped"], tp1["greedy"]
    assert [len(p) for p in tp1["prompts"]] == [5, 9, 7, 12, 3]
    assert st.finish_reason[1] == "eos" and st.response_ids[1] == greedy.response_ids[1][:4]
    first_stop = greedy.response_ids[0].index(tp1["stop"])
    assert st.finish_reason[0] in ("stop", "eos")
    assert st.response_ids[0] == greedy.response_ids[0][:first_stop + 1]
    for r, reason, full in zip(st.response_ids, st.finish_reason, greedy.response_ids):
        if reason == "length":
            assert r == full and len(r) == 10
            assert tp1["eos"] not in r and tp1["stop"] not in r
        assert len(r) == len(st.policy_logprobs[st.response_ids.index(r)])


def test_padded_vocabulary_ids_are_never_produced(tp1):
    # temperature 5 makes every id likely; the checkpoint's vocabulary (1101) is padded
    assert tp1["max_hot_id"] < tp1["vocab"]


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2)], ids=["tp1", "pp2"])
def test_tied_checkpoint_greedy_matches_transformers_generate(hf_tied, mg_tied, tmp_path, tp, pp):
    """Tied embeddings: the decoder projects with megatron's shared weight (the embedding on
    one stage, its copy on the last of two)."""
    from transformers import LlamaForCausalLM

    got = generate(mg_tied, tmp_path, tp, pp)
    m = LlamaForCausalLM.from_pretrained(hf_tied, dtype=torch.float32).eval()
    for p, resp in zip(got["prompts"], got["greedy"].response_ids):
        ref = m.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                         pad_token_id=0)[0, len(p):].tolist()
        assert resp == ref
    assert got["policy_logprob_err"] < 1e-5  # against the training forward
