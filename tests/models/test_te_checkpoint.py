"""Checkpoints move between the local layers and Transformer Engine's: a Hugging Face
conversion (local layers, no TE ``_extra_state``) loads into a model whose layers carry
TE's extra state (tests/models/te_like.py) and gives the same loss; that model's
checkpoint, FP8 metadata included, loads back into local layers and exports to Hugging
Face bit for bit."""

import json

import torch

from megarlhf.models.checkpoint import read_meta
from tests.conftest import convert, launch
from tests.tools.test_convert import assert_bit_identical, export

WORKER = "tests/models/te_like_worker.py"


def test_converted_checkpoint_loads_into_te_layers_and_back(hf_causal, mg_causal, tokens, tmp_path):
    saved, tp = tmp_path / "te_ckpt", 2  # TP=2: the extra state of tensor-parallel layers too
    launch(WORKER, tp, "--ckpt", mg_causal, "--tp", tp, "--inputs", tokens, "--save", saved,
             "--out", tmp_path / "r.pt")
    r = torch.load(tmp_path / "r_rank0.pt")
    assert r["carriers"] == r["restored"] > 0
    assert torch.equal(r["te"], r["local"])  # same weights, same loss
    assert torch.equal(r["local_from_te"], r["local"]) and torch.equal(r["te_from_te"], r["local"])
    assert read_meta(str(saved)).model.transformer_impl == "transformer_engine"
    assert_bit_identical(hf_causal, export(saved, tmp_path / "hf"))


def test_converter_records_the_layer_implementation(hf_causal, mg_causal, tmp_path):
    out = convert(hf_causal, tmp_path / "te", "--transformer-impl", "transformer_engine")
    assert json.loads((out / "megarlhf.json").read_text())["model"]["transformer_impl"] == "transformer_engine"
    assert read_meta(str(mg_causal)).model.transformer_impl == "local"  # the default
