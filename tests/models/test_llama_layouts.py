"""A converted Hugging Face Llama gives transformers' logits and log-probs at every
layout, and trains identically at every layout (torchrun, gloo, fp32)."""

import pytest
import torch

from tests.conftest import VOCAB, hf_reference, launch

WORKER = "tests/models/llama_worker.py"
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def forward(ckpt, tokens, tmp_path, tp, pp, *extra):
    out = tmp_path / f"fwd_tp{tp}_pp{pp}.pt"
    launch(WORKER, tp * pp, "--ckpt", ckpt, "--tp", tp, "--pp", pp, "--inputs", tokens,
             "--out", out, *extra)
    return torch.load(out)


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}_pp{p}" for t, p in LAYOUTS])
def test_logits_and_logprobs_match_transformers(hf_causal, mg_causal, tokens, tmp_path, tp, pp):
    ref = hf_reference(hf_causal, torch.load(tokens))
    got = forward(mg_causal, tokens, tmp_path, tp, pp)
    logits = got["logits"]
    assert logits.shape[-1] > VOCAB  # the vocabulary really is padded
    assert (logits[..., :VOCAB] - ref["logits"]).abs().max() < 1e-5
    assert (got["logprobs"] - ref["logprobs"]).abs().max() < 1e-5
    # Padded ids can never be chosen: they sit at the dtype's minimum.
    assert (logits[..., VOCAB:] == torch.finfo(torch.float32).min).all()
    assert (logits.argmax(-1) < VOCAB).all()
    ref_entropy = -(torch.softmax(ref["logits"], -1) * torch.log_softmax(ref["logits"], -1)).sum(-1)
    assert (got["entropy"] - ref_entropy).abs().max() < 1e-4


def test_virtual_pipeline_matches(hf_causal, mg_causal, tokens, tmp_path):
    ref = hf_reference(hf_causal, torch.load(tokens))
    got = forward(mg_causal, tokens, tmp_path, 1, 2, "--vpp", "2")
    assert (got["logits"][..., :VOCAB] - ref["logits"]).abs().max() < 1e-5


def train(ckpt, tokens, tmp_path, tp, pp, *extra):
    out = tmp_path / f"train_tp{tp}_pp{pp}{'_'.join(extra)}.pt"
    launch(WORKER, tp * pp, "--ckpt", ckpt, "--tp", tp, "--pp", pp, "--inputs", tokens,
             "--mode", "train", "--steps", 5, "--out", out, *extra)
    return torch.load(out)


@pytest.fixture(scope="module")
def tp1_trajectory(mg_causal, tokens, tmp_path_factory):
    return train(mg_causal, tokens, tmp_path_factory.mktemp("train"), 1, 1)


@pytest.mark.parametrize("tp,pp,extra", [(2, 1, ()), (1, 2, ()), (2, 2, ()), (2, 1, ("--sp",))],
                         ids=["tp2", "pp2", "tp2_pp2", "tp2_sequence_parallel"])
def test_training_trajectory_is_layout_invariant(mg_causal, tokens, tmp_path, tp1_trajectory,
                                                 tp, pp, extra):
    ref = tp1_trajectory
    got = train(mg_causal, tokens, tmp_path, tp, pp, *extra)
    assert len(got["losses"]) == 5
    assert ref["losses"][-1] < ref["losses"][0]  # it actually trains
    assert (got["losses"] - ref["losses"]).abs().max() < 1e-5
    # Gradient norms too: a wrongly scaled TP gradient hides behind Adam in the loss.
    assert ((got["grad_norms"] - ref["grad_norms"]).abs() / ref["grad_norms"]).max() < 1e-5


# (A TP=1 model alone on the last rank runs in tests/recipes/test_ppo.py.)
@pytest.mark.parametrize("tp,pp,span,nproc", [(2, 1, "1:2", 3), (1, 2, "0:2", 3)],
                         ids=["tp2_on_ranks_1_2", "pp2_on_ranks_0_1"])
def test_layout_on_a_subset_of_ranks(hf_causal, mg_causal, tokens, tmp_path, tp, pp, span, nproc):
    """A model laid out on part of the job with its own groups (megatron's globals say
    something else) computes the same logits: how PPO roles share one job."""
    ref = hf_reference(hf_causal, torch.load(tokens))
    out = tmp_path / "fwd.pt"
    launch(WORKER, nproc, "--ckpt", mg_causal, "--tp", tp, "--pp", pp, "--inputs", tokens,
             "--out", out, "--span", span)
    got = torch.load(out)
    assert (got["logits"][..., :VOCAB] - ref["logits"]).abs().max() < 1e-5


def test_training_on_a_subset_of_ranks_matches(mg_causal, tokens, tmp_path, tp1_trajectory):
    """TP=2 x DP=... on ranks 1-2 of a 3-process job: the TP=1 trajectory (grad norms too,
    so the optimizer really uses the layout's model-parallel group)."""
    out = tmp_path / "train.pt"
    launch(WORKER, 3, "--ckpt", mg_causal, "--tp", 2, "--inputs", tokens, "--mode", "train",
             "--steps", 5, "--out", out, "--span", "1:2")
    got = torch.load(out)
    ref = tp1_trajectory
    assert (got["losses"] - ref["losses"]).abs().max() < 1e-5
    assert ((got["grad_norms"] - ref["grad_norms"]).abs() / ref["grad_norms"]).max() < 1e-5


@pytest.fixture(scope="module")
def mg_causal_sdpa(mg_causal, tmp_path_factory):
    """The same checkpoint, run with torch's fused attention (model.attention_backend=sdpa)."""
    import dataclasses
    import shutil

    from megarlhf.models.checkpoint import read_meta, write_meta

    ckpt = tmp_path_factory.mktemp("sdpa") / "ckpt"
    shutil.copytree(mg_causal, ckpt)
    meta = read_meta(str(ckpt))
    write_meta(str(ckpt), dataclasses.replace(meta, model=dataclasses.replace(meta.model, attention_backend="sdpa")))
    return ckpt


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1)], ids=["tp1", "tp2"])
def test_sdpa_attention_matches_transformers(hf_causal, mg_causal_sdpa, tokens, tmp_path, tp, pp):
    ref = hf_reference(hf_causal, torch.load(tokens))
    got = forward(mg_causal_sdpa, tokens, tmp_path, tp, pp)
    assert (got["logits"][..., :VOCAB] - ref["logits"]).abs().max() < 1e-5
    assert (got["logprobs"] - ref["logprobs"]).abs().max() < 1e-5


def test_sdpa_attention_trains_like_the_unfused_one(mg_causal_sdpa, tokens, tmp_path, tp1_trajectory):
    got = train(mg_causal_sdpa, tokens, tmp_path, 1, 1)
    assert (got["losses"] - tp1_trajectory["losses"]).abs().max() < 1e-5
    assert ((got["grad_norms"] - tp1_trajectory["grad_norms"]).abs() / tp1_trajectory["grad_norms"]).max() < 1e-5
