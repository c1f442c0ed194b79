"""tools/convert_hf_to_megatron.py and tools/convert_megatron_to_hf.py."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from megarlhf.config import preset
from megarlhf.convert.hf_config import hf_config_from_model, model_config_from_hf
from megarlhf.data.tokenizer import train_sentencepiece
from megarlhf.models.checkpoint import read_meta, write_meta
from tests.conftest import VOCAB, convert, hf_reference, launch, make_hf_llama, run_tool

WORKER = "tests/models/llama_worker.py"


def export(ckpt, out, *extra):
    res = run_tool("tools/convert_megatron_to_hf.py", "--ckpt", ckpt, "--out", out, *extra)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def all_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_bit_identical(a, b):
    ta, tb = all_tensors(a), all_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k], tb[k]), k


def test_round_trip_is_bit_identical(hf_causal, mg_causal, tokens, tmp_path):
    out = export(mg_causal, tmp_path / "hf")
    assert_bit_identical(hf_causal, out)
    src, dst = (json.loads((d / "config.json").read_text()) for d in (hf_causal, out))
    assert dst == src  # written back as it came in
    t = torch.load(tokens)
    assert torch.equal(hf_reference(out, t)["logits"], hf_reference(hf_causal, t)["logits"])


def test_reward_round_trip_is_bit_identical(hf_reward, mg_reward, tmp_path):
    out = export(mg_reward, tmp_path / "hf")
    assert_bit_identical(hf_reward, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == json.loads((hf_reward / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert AutoConfig.from_pretrained(out).num_labels == 1


def test_export_from_tp2_pp2_checkpoint_loads_in_transformers(mg_causal, tokens, tmp_path):
    trained = tmp_path / "trained"
    launch(WORKER, 4, "--ckpt", mg_causal, "--tp", 2, "--pp", 2, "--inputs", tokens,
             "--mode", "train", "--steps", 2, "--save", trained, "--out", tmp_path / "t.pt")
    assert len(list(trained.glob("__*.distcp"))) >= 4  # written by 4 ranks
    launch(WORKER, 4, "--ckpt", trained, "--tp", 2, "--pp", 2, "--inputs", tokens,
             "--out", tmp_path / "fwd.pt")
    megatron_logits = torch.load(tmp_path / "fwd.pt")["logits"][..., :VOCAB]
    out = export(trained, tmp_path / "hf", "--max-shard-size", "300KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    ref = hf_reference(out, torch.load(tokens))
    assert (ref["logits"] - megatron_logits).abs().max() < 1e-5


def test_bin_weights_llama2_rope_and_tied_embeddings(tmp_path, tokens):
    hf = make_hf_llama(tmp_path / "hf", llama3_rope=False, tied=True, safe=False, seed=3)
    assert list(hf.glob("*.bin")) and not list(hf.glob("*.safetensors"))
    mg = convert(hf, tmp_path / "mg")
    out = tmp_path / "fwd.pt"
    launch(WORKER, 2, "--ckpt", mg, "--tp", 2, "--inputs", tokens, "--out", out)
    ref = hf_reference(hf, torch.load(tokens))
    assert (torch.load(out)["logits"][..., :VOCAB] - ref["logits"]).abs().max() < 1e-5


def test_bfloat16_conversion(hf_causal, tmp_path):
    mg = convert(hf_causal, tmp_path / "mg", "--dtype", "bfloat16")
    out = export(mg, tmp_path / "hf")
    src, dst = all_tensors(hf_causal), all_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in dst.values())
    assert all(torch.equal(src[k].bfloat16(), dst[k]) for k in src)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and "torch_dtype" not in cfg  # the source's (transformers 5) key


def test_tied_round_trip_gives_back_the_source(hf_tied, mg_tied, tmp_path):
    """A tied transformers-5 source: one embedding matrix in megatron, and back in HF format
    the same tensors bit for bit (no lm_head.weight) and the same config.json (RoPE in
    rope_parameters, the special-token ids, tie_word_embeddings)."""
    src = json.loads((hf_tied / "config.json").read_text())
    meta = read_meta(str(mg_tied))
    assert meta.model.tie_word_embeddings and meta.extra["hf_config"] == src
    out = export(mg_tied, tmp_path / "hf")
    assert_bit_identical(hf_tied, out)
    assert "lm_head.weight" not in all_tensors(out)
    assert json.loads((out / "config.json").read_text()) == src
    bf16 = export(mg_tied, tmp_path / "bf16", "--dtype", "bfloat16")
    assert json.loads((bf16 / "config.json").read_text()) == {**src, "dtype": "bfloat16"}


_TRANSFORMERS_4 = {  # a Llama 3.1 config.json as transformers 4 wrote it
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 1101, "max_position_embeddings": 128, "rms_norm_eps": 1e-05, "rope_theta": 500000,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "transformers_version": "4.43.0",
}


def test_config_written_back_in_the_sources_layout():
    m, _ = model_config_from_hf(_TRANSFORMERS_4)
    assert m.tie_word_embeddings
    assert hf_config_from_model(m, "causal", "bfloat16", source=_TRANSFORMERS_4) == _TRANSFORMERS_4
    assert hf_config_from_model(m, "causal", "float32", source=_TRANSFORMERS_4)["torch_dtype"] == "float32"
    # A reward model trained from it: a sequence classifier, never tied.
    rm = hf_config_from_model(m, "reward", "bfloat16", source=_TRANSFORMERS_4)
    assert rm["architectures"] == ["LlamaForSequenceClassification"] and rm["num_labels"] == 1
    assert rm["tie_word_embeddings"] is False and rm["eos_token_id"] == [128001, 128008, 128009]
    assert model_config_from_hf(rm)[0].tie_word_embeddings is False


def test_config_of_a_model_trained_from_scratch():
    m = preset("tiny", tie_word_embeddings=True)
    cfg = hf_config_from_model(m, "causal", "float32", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float32"
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    assert model_config_from_hf(cfg, params_dtype="float32")[0] == dataclasses.replace(m, preset=None)


def test_export_without_a_recorded_source(hf_tied, mg_tied, tokens, tmp_path):
    """A checkpoint that records no source config.json (trained from scratch): a fresh one,
    tied, with its tokenizer's special-token ids, that transformers runs as the source."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(mg_tied, ckpt)
    words = ["".join("abcdefghij"[(i * 7 + j * 3) % 10] for j in range(2 + i % 5)) for i in range(60)]
    tok = train_sentencepiece([" ".join(words[i:i + 12]) for i in range(48)] * 4, 300,
                              str(tmp_path / "tok.model"))
    meta = read_meta(str(ckpt))
    write_meta(str(ckpt), dataclasses.replace(meta, tokenizer=tok.path, extra={}))
    out = export(ckpt, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in all_tensors(out)
    ids = (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"])
    assert ids == (tok.bos_id, tok.eos_id, tok.pad_id)
    t = torch.load(tokens)
    assert torch.equal(hf_reference(out, t)["logits"], hf_reference(hf_tied, t)["logits"])


# ----------------------------------------------------------------------------- errors

@pytest.fixture()
def hf_copy(hf_causal, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(hf_causal, dst)
    return dst


def failing(*args):
    res = run_tool("tools/convert_hf_to_megatron.py", *map(str, args))
    assert res.returncode == 2, res.stdout + res.stderr
    return res.stderr


def test_missing_tensor_is_named(hf_copy, tmp_path):
    sd = load_file(hf_copy / "model.safetensors")
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, hf_copy / "model.safetensors")
    err = failing("--hf-dir", hf_copy, "--out", tmp_path / "o")
    assert "'model.layers.2.mlp.up_proj.weight' is missing" in err


def test_extra_tensor_is_named(hf_copy, tmp_path):
    sd = load_file(hf_copy / "model.safetensors")
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(sd, hf_copy / "model.safetensors")
    err = failing("--hf-dir", hf_copy, "--out", tmp_path / "o")
    assert "no megatron destination" in err and "q_norm" in err


def test_shape_mismatch_is_named(hf_copy, tmp_path):
    sd = load_file(hf_copy / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 170)
    save_file(sd, hf_copy / "model.safetensors")
    err = failing("--hf-dir", hf_copy, "--out", tmp_path / "o")
    assert "model.layers.1.mlp.down_proj.weight" in err and "[64, 170]" in err and "[64, 172]" in err


@pytest.mark.parametrize("field,value,needle", [
    ("model_type", "mistral", "model_type 'mistral' is not supported"),
    ("architectures", ["LlamaForQuestionAnswering"], "architecture 'LlamaForQuestionAnswering'"),
    ("attention_bias", True, "attention_bias=true is not supported"),
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope type 'yarn'"),
])
def test_unsupported_architectures(hf_copy, tmp_path, field, value, needle):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg[field] = value
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    assert needle in failing("--hf-dir", hf_copy, "--out", tmp_path / "o")


def test_unreadable_files(hf_copy, tmp_path):
    data = (hf_copy / "model.safetensors").read_bytes()
    (hf_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = failing("--hf-dir", hf_copy, "--out", tmp_path / "o")
    assert "model.safetensors" in err and "past the end of the file" in err
    (hf_copy / "model.safetensors").write_bytes(b"garbage")
    assert "not a readable safetensors file" in failing("--hf-dir", hf_copy, "--out", tmp_path / "o2")
    (hf_copy / "config.json").write_text("{")
    assert "config.json: unreadable" in failing("--hf-dir", hf_copy, "--out", tmp_path / "o3")
    assert "not found" in failing("--hf-dir", tmp_path / "nowhere", "--out", tmp_path / "o4")


def test_refuses_non_empty_output_and_wrong_kind(hf_causal, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not empty" in failing("--hf-dir", hf_causal, "--out", tmp_path / "full")
    assert "megarlhf rm" in failing("--hf-dir", hf_causal, "--out", tmp_path / "o",
                                    "--model-type", "reward")


def test_export_errors(tmp_path):
    res = run_tool("tools/convert_megatron_to_hf.py", "--ckpt", tmp_path, "--out", tmp_path / "o")
    assert res.returncode == 2 and "megarlhf.json is missing" in res.stderr
