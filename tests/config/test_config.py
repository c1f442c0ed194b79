"""YAML + overrides -> typed configs; presets; model validation."""

from dataclasses import dataclass, field

import pytest

from megarlhf.config import (PRESETS, ConfigError, ConfigLoadError, ModelConfig, ParallelConfig,
                             check_model, load_config, padded_vocab_size, preset, to_yaml)


@dataclass(frozen=True)
class Job:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1
    name: str = "job"


def test_defaults_and_overrides():
    cfg = load_config(Job, None, ["seed=7", "parallel.tensor_model_parallel_size=2"])
    assert cfg.seed == 7 and cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.model == ModelConfig()


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  preset: llama2-70b\n  num_layers: 8\nparallel:\n"
                    "  tensor_model_parallel_size: 8\nname: big\n")
    cfg = load_config(Job, str(path), ["model.params_dtype=float32"])
    assert cfg.model.hidden_size == 8192 and cfg.model.num_query_groups == 8
    assert cfg.model.num_layers == 8  # the file's field beats the preset's
    assert cfg.model.params_dtype == "float32"  # the override beats both
    assert cfg.name == "big" and cfg.model.preset == "llama2-70b"


def test_preset_by_override_only():
    cfg = load_config(Job, None, ["model.preset=llama3-8b"])
    assert cfg.model == preset("llama3-8b")


def test_configs_are_frozen():
    cfg = load_config(Job)
    with pytest.raises(Exception):
        cfg.seed = 3


@pytest.mark.parametrize("overrides,needle", [
    (["model.bogus=1"], "model.bogus"),
    (["seed=abc"], "seed"),
    (["model.preset=llama9"], "unknown preset 'llama9'"),
    (["seed"], "expected key=value"),
])
def test_bad_overrides_name_the_key(overrides, needle):
    with pytest.raises(ConfigLoadError, match=needle.replace(".", r"\.")):
        load_config(Job, None, overrides)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigLoadError, match="not found"):
        load_config(Job, str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigLoadError, match="bad.yaml"):
        load_config(Job, str(bad))


def test_rope_scaling_node():
    cfg = load_config(Job, None, ["model.rope_scaling.factor=32"])
    assert cfg.model.rope_scaling.factor == 32 and cfg.model.rope_scaling.high_freq_factor == 4


def test_yaml_round_trip():
    cfg = load_config(Job, None, ["model.preset=tiny", "seed=3"])
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "c.yaml")
        open(p, "w").write(to_yaml(cfg))
        assert load_config(Job, p) == cfg


def test_model_validation_lists_every_problem():
    bad = ModelConfig(hidden_size=250, num_attention_heads=8, num_query_groups=3,
                      params_dtype="float16", fp8="hybrid")
    with pytest.raises(ConfigError) as e:
        check_model(bad)
    text = str(e.value)
    assert "model.hidden_size=250 is not divisible by model.num_attention_heads=8" in text
    assert "model.num_attention_heads=8 is not divisible by model.num_query_groups=3" in text
    assert "model.params_dtype='float16'" in text
    assert "model.fp8='hybrid' needs model.transformer_impl='transformer_engine'" in text


def test_runtime_overrides_keep_unset_fields_and_switch_off_with_none():
    from megarlhf.config import RuntimeConfig, runtime_problems

    ckpt = ModelConfig(params_dtype="bfloat16", recompute_granularity="selective")
    assert RuntimeConfig().apply(ckpt) == ckpt
    got = RuntimeConfig(recompute_granularity="full", transformer_impl="transformer_engine",
                        fp8="hybrid").apply(ckpt)
    assert (got.recompute_granularity, got.transformer_impl, got.fp8, got.params_dtype) == (
        "full", "transformer_engine", "hybrid", "bfloat16")
    assert got.num_layers == ckpt.num_layers
    assert RuntimeConfig(recompute_granularity="none", fp8="none").apply(got).recompute_granularity is None
    assert RuntimeConfig(fp8="none").apply(got).fp8 is None
    problems = runtime_problems(RuntimeConfig(fp8="e5m2", recompute_granularity="some",
                                              params_dtype="fp16"), "critic.model")
    assert any("critic.model.fp8='e5m2'" in p for p in problems)
    assert any("critic.model.recompute_granularity='some'" in p for p in problems)
    assert any("critic.model.params_dtype='fp16'" in p for p in problems)
    assert runtime_problems(RuntimeConfig(fp8="hybrid", transformer_impl="local")) == [
        "model.fp8='hybrid' needs model.transformer_impl='transformer_engine' (got 'local')"]
    # an FP8 request on a checkpoint of local layers fails when the two are combined
    with pytest.raises(ConfigError, match="model.fp8='hybrid' needs model.transformer_impl"):
        check_model(RuntimeConfig(fp8="hybrid").apply(ckpt))


def test_presets_have_published_shapes():
    assert preset("llama2-13b").num_parameters() == pytest.approx(13.0e9, rel=0.01)
    assert preset("llama2-70b").num_parameters() == pytest.approx(69.0e9, rel=0.01)
    assert preset("llama3-8b").num_parameters() == pytest.approx(8.03e9, rel=0.01)
    assert preset("tiny").num_parameters() == pytest.approx(4.9e6, rel=0.02)
    for name in PRESETS:
        check_model(preset(name))


def test_padded_vocab():
    assert padded_vocab_size(32000, 128, 1) == 32000
    assert padded_vocab_size(32000, 128, 8) == 32768
    assert padded_vocab_size(1101, 128, 1) == 1152
    assert padded_vocab_size(1101, 128, 2) == 1280
