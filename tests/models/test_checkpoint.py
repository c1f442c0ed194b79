"""Checkpoint metadata: written with every checkpoint, read without flags, clear errors."""

import json

import pytest

from megarlhf.config import preset
from megarlhf.models.checkpoint import (META_FILE, CheckpointError, CheckpointMeta, read_meta,
                                        write_meta)


def test_meta_round_trip(tmp_path):
    meta = CheckpointMeta(model=preset("llama3-8b", rope_scaling={"factor": 8.0}), kind="reward",
                          tokenizer="tokenizer.json", chat_template="llama3",
                          extra={"step": 10})
    write_meta(str(tmp_path), meta)
    back = read_meta(str(tmp_path))
    assert back == meta and back.model.rope_scaling.factor == 8.0
    assert json.loads((tmp_path / META_FILE).read_text())["megarlhf_version"]


def test_converted_checkpoint_carries_its_metadata(mg_causal, mg_reward):
    m = read_meta(str(mg_causal))
    assert m.kind == "causal" and m.model.vocab_size == 1101 and m.model.num_query_groups == 2
    assert m.model.rope_scaling is not None and m.model.rope_theta == 500000.0
    assert m.extra["source_architecture"] == "LlamaForCausalLM"
    assert read_meta(str(mg_reward)).kind == "reward"


def test_meta_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_meta(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="megarlhf.json is missing"):
        read_meta(str(tmp_path))
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read checkpoint metadata"):
        read_meta(str(tmp_path))
    (tmp_path / META_FILE).write_text(json.dumps({"model": {"num_layers": 2, "warp_drive": 1}}))
    with pytest.raises(CheckpointError, match="unknown model fields"):
        read_meta(str(tmp_path))
    (tmp_path / META_FILE).write_text(json.dumps({"kind": "causal"}))
    with pytest.raises(CheckpointError, match="malformed"):
        read_meta(str(tmp_path))
