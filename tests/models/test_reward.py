"""Scalar-head (reward/value) models: HF sequence-classification parity at TP=2, and a
reward model initialised from a causal-LM checkpoint."""

import torch

from tests.conftest import hf_reference, launch

WORKER = "tests/models/llama_worker.py"


def test_reward_values_match_transformers_at_tp2(hf_reward, mg_reward, tokens, tmp_path):
    out = tmp_path / "values.pt"
    launch(WORKER, 2, "--ckpt", mg_reward, "--tp", 2, "--inputs", tokens, "--out", out)
    got = torch.load(out)
    ref = hf_reference(hf_reward, torch.load(tokens))
    assert got["values"].shape == ref["values"].shape == (4, 32)
    assert (got["values"] - ref["values"]).abs().max() < 1e-5


def test_reward_model_from_causal_checkpoint(hf_causal, mg_causal, tokens, tmp_path):
    """The head replaces the LM output layer; everything else comes from the SFT model."""
    out = tmp_path / "rm.pt"
    launch(WORKER, 4, "--ckpt", mg_causal, "--tp", 2, "--pp", 2, "--reward-from-causal",
             "--inputs", tokens, "--out", out)
    got = torch.load(out)
    assert got["not_loaded"] == ["output_layer.weight"]
    ref = hf_reference(hf_causal, torch.load(tokens))
    head = got["head"]  # [1, hidden], gathered over TP
    assert head.shape == (1, 64) and head.abs().sum() > 0
    expected = (ref["hidden"] @ head.T)[..., 0]
    assert (got["values"] - expected).abs().max() < 1e-5
