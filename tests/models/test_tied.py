"""Tied input and output embeddings (HF ``tie_word_embeddings``): one matrix, megatron's
shared weight, at every layout; the last pipeline stage's copy stays equal to the first
stage's embedding while training; exported back, transformers computes the same logits."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from megarlhf.config import preset
from megarlhf.convert.hf_config import model_config_from_hf, read_hf_config
from megarlhf.models.checkpoint import CheckpointMeta, read_meta
from megarlhf.models.llama import padded_vocab
from tests.conftest import VOCAB, hf_reference, launch, run_tool

WORKER = "tests/models/llama_worker.py"


def hf_parameters(hf_dir) -> int:
    """transformers' count: a tied LM head is not counted again."""
    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).num_parameters()


def run(ckpt, tokens, out, tp=1, pp=1, *extra):
    launch(WORKER, tp * pp, "--ckpt", ckpt, "--tp", tp, "--pp", pp, "--inputs", tokens, "--out", out,
             *extra)
    return torch.load(out)


def test_parameter_count_counts_one_embedding(hf_tied, hf_causal):
    tied, _ = model_config_from_hf(read_hf_config(str(hf_tied)))
    untied, _ = model_config_from_hf(read_hf_config(str(hf_causal)))
    assert tied.tie_word_embeddings and not untied.tie_word_embeddings
    assert tied.num_parameters() == hf_parameters(hf_tied)
    assert untied.num_parameters() == hf_parameters(hf_causal)
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * 64


def test_metadata_without_the_field_loads_untied():
    meta = CheckpointMeta(model=preset("tiny", tie_word_embeddings=True))
    assert CheckpointMeta.from_json(meta.to_json()).model.tie_word_embeddings is True
    old = meta.to_json()
    del old["model"]["tie_word_embeddings"]  # written before the field existed
    assert CheckpointMeta.from_json(old).model.tie_word_embeddings is False


LAYOUTS = [(1, 1), (2, 1), (1, 2)]


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}_pp{p}" for t, p in LAYOUTS])
def test_tied_logits_match_transformers(hf_tied, mg_tied, tokens, tmp_path, tp, pp):
    ref = hf_reference(hf_tied, torch.load(tokens))
    got = run(mg_tied, tokens, tmp_path / "fwd.pt", tp, pp)
    logits = got["logits"]
    assert (logits[..., :VOCAB] - ref["logits"]).abs().max() < 1e-5
    assert (got["logprobs"] - ref["logprobs"]).abs().max() < 1e-5
    assert (logits[..., VOCAB:] == torch.finfo(torch.float32).min).all()  # padded ids masked
    # One matrix: transformers' parameters plus the padded vocabulary rows, no LM head.
    cfg = read_meta(str(mg_tied)).model
    assert got["num_parameters"] == hf_parameters(hf_tied) + (padded_vocab(cfg, tp) - VOCAB) * 64


TRAIN = ("--mode", "train", "--steps", 3)


@pytest.fixture(scope="module")
def trained_pp2(mg_tied, tokens, tmp_path_factory):
    """3 steps at PP=2 (embedding on rank 0, its copy on rank 1) on megatron's global
    groups, saved."""
    folder = tmp_path_factory.mktemp("tied_pp2")
    run(mg_tied, tokens, folder / "train.pt", 1, 2, *TRAIN, "--check-tied", "--save", folder / "ckpt")
    return folder


@pytest.fixture(scope="module")
def trained_pp1(mg_tied, tokens, tmp_path_factory):
    """The same 3 steps on one stage, where there is one tensor."""
    return run(mg_tied, tokens, tmp_path_factory.mktemp("tied_pp1") / "train.pt", 1, 1, *TRAIN)


@pytest.mark.parametrize("groups", ["global", "explicit"])
def test_training_at_pp2_keeps_the_copy_equal_to_the_embedding(mg_tied, tokens, tmp_path, trained_pp2,
                                                               trained_pp1, groups):
    """Megatron's global groups, and a layout's own groups on ranks 1-2 of a 3-process job
    (a PPO role): the embd group that syncs the copy at build and sums the gradients is the
    layout's."""
    if groups == "global":
        got = torch.load(trained_pp2 / "train.pt")
    else:
        out = tmp_path / "train.pt"
        launch(WORKER, 3, "--ckpt", mg_tied, "--pp", 2, "--inputs", tokens, *TRAIN, "--check-tied",
                 "--span", "1:2", "--out", out)
        got = torch.load(out)
    assert got["embedding_moved"] > 0  # it really trained the shared matrix
    assert got["tied_in_sync"]  # bit for bit, on every rank
    # The one-stage trajectory: the two stages' gradients are summed, and the copy is
    # counted once in the gradient norm.
    ref = trained_pp1
    assert ref["losses"][-1] < ref["losses"][0]
    assert (got["losses"] - ref["losses"]).abs().max() < 1e-5
    assert ((got["grad_norms"] - ref["grad_norms"]).abs() / ref["grad_norms"]).max() < 1e-5


def test_trained_tied_model_exports_to_transformers(tokens, tmp_path, trained_pp2):
    ckpt = trained_pp2 / "ckpt"
    hf = tmp_path / "hf"
    res = run_tool("tools/convert_megatron_to_hf.py", "--ckpt", ckpt, "--out", hf)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "lm_head.weight" not in load_file(hf / "model.safetensors")
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    mine = run(ckpt, tokens, tmp_path / "fwd.pt")
    ref = hf_reference(hf, torch.load(tokens))
    assert (ref["logits"] - mine["logits"][..., :VOCAB]).abs().max() < 1e-5


def test_reward_model_from_a_tied_checkpoint(hf_tied, mg_tied, tokens, tmp_path):
    """A scalar head is never tied: at PP=2 the last stage builds its fresh head, every
    other weight comes from the tied causal checkpoint."""
    got = run(mg_tied, tokens, tmp_path / "rm.pt", 1, 2, "--reward-from-causal")
    assert got["not_loaded"] == ["output_layer.weight"]
    ref = hf_reference(hf_tied, torch.load(tokens))
    assert (got["values"] - (ref["hidden"] @ got["head"].T)[..., 0]).abs().max() < 1e-5
