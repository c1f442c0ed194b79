"""How a model runs, for every model of every recipe: the runtime fields (precision,
layers, attention, FP8, recomputation, compiled kernels), set per model and checked, with
the hardware they need, before any process starts."""

import dataclasses

import pytest

from megarlhf import platform
from megarlhf.config import (RUNTIME_FIELDS, ConfigError, ModelConfig, ParallelConfig, RuntimeConfig,
                             check_layout, load_config, preset, runtime_problems, shared_process_problems)
from megarlhf.config.validate import fp8_shape_problems
from megarlhf.models.checkpoint import CheckpointMeta, write_meta
from megarlhf.platform import Hardware

SHAPE_FIELDS = {"preset", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling",
                "norm_eps", "init_method_std", "make_vocab_size_divisible_by", "tie_word_embeddings"}
SETTINGS = dict(params_dtype="bfloat16", transformer_impl="transformer_engine", attention_backend="fused",
                fp8="hybrid", fp8_amax_history_len=16, fp8_amax_compute_algo="most_recent", fp8_margin=1,
                recompute_granularity="full", recompute_method="block", recompute_num_layers=2,
                bias_activation_fusion=True)
H100 = Hardware(gpu="NVIDIA H100 80GB HBM3", capability=(9, 0), transformer_engine="ok",
                c_compiler="/usr/bin/cc", triton=True)


def test_every_model_field_is_shape_or_runtime_and_a_role_can_set_each_runtime_one():
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert names == SHAPE_FIELDS | set(RUNTIME_FIELDS)
    assert {f.name for f in dataclasses.fields(RuntimeConfig)} == set(RUNTIME_FIELDS) == set(SETTINGS)
    m = RuntimeConfig(**SETTINGS).apply(preset("tiny"))
    assert {name: getattr(m, name) for name in RUNTIME_FIELDS} == SETTINGS
    assert RuntimeConfig(fp8="none", recompute_granularity="none").apply(m).fp8 is None
    assert RuntimeConfig().apply(m) == m  # unset: the checkpoint's


@pytest.mark.parametrize("recipe", ["rm", "dpo", "ppo"])
def test_each_recipe_takes_the_full_runtime_set_from_the_command_line(recipe):
    from megarlhf.cli import COMMANDS

    schema = COMMANDS[recipe][0]()[0]
    prefixes = ["actor.model", "reference.model", "critic.model", "reward.model"] if recipe == "ppo" else ["model"]
    overrides = [f"{p}.{k}={str(v).lower() if isinstance(v, bool) else v}" for p in prefixes for k, v in SETTINGS.items()]
    cfg = load_config(schema, None, overrides)
    for p in prefixes:
        node = cfg
        for part in p.split("."):
            node = getattr(node, part)
        assert node == RuntimeConfig(**SETTINGS), p


def test_sft_from_a_checkpoint_takes_its_shape_and_the_configs_runtime(tmp_path):
    from megarlhf.recipes.sft import SFTConfig

    write_meta(str(tmp_path), CheckpointMeta(model=preset("llama2-7b", num_layers=2)))
    cfg = load_config(SFTConfig, None, [f"train.init_from={tmp_path}", "model.attention_backend=sdpa",
                                        "model.params_dtype=float32", "model.recompute_granularity=selective"])
    m = cfg.resolved_models()["model"]
    assert (m.hidden_size, m.num_layers) == (4096, 2)  # the checkpoint's shape
    assert (m.attention_backend, m.params_dtype, m.recompute_granularity) == ("sdpa", "float32", "selective")


def test_runtime_values_are_checked_by_key():
    p = runtime_problems(RuntimeConfig(transformer_impl="local", attention_backend="fused", fp8_margin=-1,
                                       recompute_method="sideways", fp8_amax_history_len=0), "critic.model")
    assert "critic.model.attention_backend='fused' is not one of critic.model.transformer_impl='local''s: " \
           "auto, unfused, sdpa" in p
    assert "critic.model.fp8_margin=-1 must be >= 0" in p
    assert any(x.startswith("critic.model.recompute_method='sideways'") for x in p)
    assert "critic.model.fp8_amax_history_len=0 must be > 0" in p
    with pytest.raises(ConfigError, match=r"model.attention_backend='sdpa' is not one of "
                                          r"model.transformer_impl='transformer_engine''s"):
        check_layout(preset("tiny", transformer_impl="transformer_engine", attention_backend="sdpa"),
                     ParallelConfig())


def test_te_models_sharing_processes_agree_on_attention():
    te = preset("tiny", transformer_impl="transformer_engine")
    models = {"actor.model": dataclasses.replace(te, attention_backend="fused"),
              "critic.model": dataclasses.replace(te, attention_backend="flash"),
              "reward.model": preset("tiny", attention_backend="sdpa")}
    assert shared_process_problems(models) == [
        "Transformer Engine models sharing processes must use one attention backend: "
        "actor.model.attention_backend='fused', critic.model.attention_backend='flash'"]
    models["critic.model"] = models["actor.model"]
    assert shared_process_problems(models) == []  # local layers read no TE switch


def test_fp8_needs_gemm_dimensions_transformer_engine_accepts():
    """Mirrors transformer_engine/pytorch/utils.py ``assert_dim_for_fp8_exec`` on each
    per-rank weight: input dimension a multiple of 16, output of 8."""
    tiny = preset("tiny", transformer_impl="transformer_engine", fp8="hybrid")  # ffn 688
    assert fp8_shape_problems(tiny, 1) == []  # 688 = 43 x 16
    assert fp8_shape_problems(tiny, 2) == ["model.fp8='hybrid': model.ffn_hidden_size / "
                                           "parallel.tensor_model_parallel_size = 344 is not a multiple of 16 "
                                           "(FP8 GEMMs need it)"]
    assert fp8_shape_problems(dataclasses.replace(tiny, ffn_hidden_size=704), 2) == []
    assert fp8_shape_problems(preset("llama2-13b", fp8="hybrid", transformer_impl="transformer_engine"), 8) == []
    assert fp8_shape_problems(dataclasses.replace(tiny, fp8=None), 2) == []


def test_kernels_compiled_at_run_time_need_a_gpu_triton_and_a_c_compiler():
    assert platform.kernel_problems("transformer_engine", "hybrid", H100, "actor.model", True) == []
    no_cc = dataclasses.replace(H100, c_compiler=None)
    (msg,) = platform.kernel_problems("local", None, no_cc, "actor.model", bias_activation_fusion=True)
    assert msg == ("actor.model.bias_activation_fusion=true compiles its kernel at run time (torch.compile "
                   "with Triton) and this node lacks a C compiler ($CC, cc, gcc or clang on the PATH): set "
                   "actor.model.bias_activation_fusion=false")
    (cpu_msg,) = platform.kernel_problems("local", None, Hardware(), "model", bias_activation_fusion=True)
    assert "a CUDA GPU" in cpu_msg and "Triton" in cpu_msg
    assert platform.kernel_problems("local", None, no_cc, "model") == []  # off: nothing compiled


def test_c_compiler_is_found_from_cc_or_the_path(tmp_path):
    cc = tmp_path / "mycc"
    cc.write_text("#!/bin/sh\n")
    cc.chmod(0o755)
    assert platform.find_c_compiler({"CC": "mycc", "PATH": str(tmp_path)}) == str(cc)
    assert platform.find_c_compiler({"CC": "absent-cc", "PATH": str(tmp_path)}) is None
    assert platform.find_c_compiler({"PATH": str(tmp_path / "empty")}) is None


def test_megatron_fuses_the_activation_only_when_asked(monkeypatch):
    """Before: every GPU model compiled SwiGLU at run time (``bias_activation_fusion`` on
    whenever a GPU was present), which needs a C compiler on the compute node."""
    from megarlhf.models import llama
    from megarlhf.parallel import ModelParallel

    gpu = platform.Platform(device=platform.current().device, backend="nccl", is_gpu=True)
    monkeypatch.setattr(llama.platform, "current", lambda *a: gpu)
    mp = ModelParallel(config=ParallelConfig(), pg_collection=None, tp_rank=0, pp_rank=0, dp_rank=0, dp_size=1)
    assert llama.transformer_config(preset("tiny"), mp).bias_activation_fusion is False
    assert llama.transformer_config(preset("tiny", bias_activation_fusion=True), mp).bias_activation_fusion is True


def test_attention_backend_reaches_megatron():
    from megatron.core.transformer.enums import AttnBackend

    from megarlhf.models import llama

    te = preset("tiny", transformer_impl="transformer_engine")
    assert llama._megatron_attention_backend(dataclasses.replace(te, attention_backend="fused")) == AttnBackend.fused
    assert llama._megatron_attention_backend(dataclasses.replace(te, attention_backend="auto")) == AttnBackend.auto
    assert llama._megatron_attention_backend(preset("tiny", attention_backend="sdpa")) == AttnBackend.local


def test_local_builds_leave_transformer_engines_switches_alone(monkeypatch):
    from megarlhf.models import llama

    monkeypatch.setenv("NVTE_FUSED_ATTN", "1")
    monkeypatch.setenv("NVTE_FLASH_ATTN", "0")
    monkeypatch.delenv("NVTE_UNFUSED_ATTN", raising=False)
    import os

    with llama._te_switches_kept(True):
        assert "NVTE_FUSED_ATTN" not in os.environ  # megatron may set them as it likes here
        os.environ["NVTE_FUSED_ATTN"] = os.environ["NVTE_UNFUSED_ATTN"] = "0"
    assert (os.environ["NVTE_FUSED_ATTN"], os.environ["NVTE_FLASH_ATTN"]) == ("1", "0")
    assert "NVTE_UNFUSED_ATTN" not in os.environ
