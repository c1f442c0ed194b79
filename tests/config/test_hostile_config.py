"""Hostile config files and overrides: unknown keys, wrong types, impossible sizes, Python
tags, non-mapping documents, broken or huge YAML, unresolvable interpolations. Each is a
ConfigLoadError or a ConfigError naming the file or key, found before any process group
exists; nothing in a config is ever executed."""

import dataclasses
import os
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megarlhf.cli import main
from megarlhf.config import ConfigError, ConfigLoadError, load_config
from megarlhf.recipes.dpo import DPOConfig
from megarlhf.recipes.ppo import PPOConfig
from megarlhf.recipes.reward_model import RMConfig
from megarlhf.recipes.sft import SFTConfig

RECIPES = {"rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig, "sft": SFTConfig}
SOURCES = "data.sources=[{path: pairs.jsonl}]"


def base(cmd: str):
    """Overrides that make a recipe's defaults a valid config (sources to read)."""
    return [] if cmd == "sft" else [SOURCES]


def yaml_file(tmp_path, text, name="cfg.yaml") -> str:
    path = tmp_path / name
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return str(path)


def load_error(schema, path=None, overrides=()) -> str:
    with pytest.raises(ConfigLoadError) as e:
        load_config(schema, path, list(overrides))
    return str(e.value)


def validation_error(schema, overrides) -> str:
    cfg = load_config(schema, None, list(overrides))
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    return str(e.value)


@pytest.mark.parametrize("cmd", sorted(RECIPES))
def test_defaults_are_valid(cmd):
    load_config(RECIPES[cmd], None, base(cmd)).validate()


# --------------------------------------------------------------------------- unknown keys

UNKNOWN = [
    ("rm", "bogus: 1\n", "bogus"),
    ("rm", "train:\n  bogus: 1\n", "train.bogus"),
    ("dpo", "train:\n  schedule:\n    bogus: 1\n", "train.schedule.bogus"),
    ("dpo", "data:\n  sources:\n    - {path: a.jsonl}\n    - {path: b.jsonl, bogus: 1}\n",
     "data.sources[1].bogus"),
    ("ppo", "actor:\n  parallel:\n    bogus: 1\n", "actor.parallel.bogus"),
    ("ppo", "reward:\n  model:\n    num_layers: 2\n", "reward.model.num_layers"),  # runtime, not shape
    ("sft", "model:\n  preset: tiny\n  bogus: 1\n", "model.bogus"),
    ("sft", "model:\n  rope_scaling:\n    bogus: 1\n", "model.rope_scaling.bogus"),
]


@pytest.mark.parametrize("cmd,text,key", UNKNOWN, ids=[u[2] for u in UNKNOWN])
def test_unknown_keys_name_the_key(tmp_path, cmd, text, key):
    msg = load_error(RECIPES[cmd], yaml_file(tmp_path, text))
    assert f"key {key!r}: unknown key" in msg and "cfg.yaml" in msg
    dotted = key.replace("[1]", "")
    if "[" not in key:  # the same key as an override
        assert f"key {dotted!r}: unknown key" in load_error(RECIPES[cmd], None, [f"{dotted}=1"])


# --------------------------------------------------------------------------- wrong types

WRONG_TYPES = [
    ("rm", "world: abc\n", "world"),                       # string for int
    ("rm", "world: 1.5\n", "world"),                       # float for int
    ("rm", "world: true\n", "world"),                      # bool for int
    ("rm", "margin: [1, 2]\n", "margin"),                  # list for float
    ("rm", "pooling: {a: 1}\n", "pooling"),                # dict for a scalar
    ("rm", "train: 5\n", "train"),                         # scalar for a section
    ("rm", "train: [1, 2]\n", "train"),                    # list for a section
    ("dpo", "dpo:\n  beta: high\n", "dpo.beta"),
    ("dpo", "data:\n  sources: 5\n", "data.sources"),      # scalar for a list
    ("dpo", "data:\n  sources: {path: a.jsonl}\n", "data.sources"),  # dict for a list
    ("dpo", "data:\n  sources: [5]\n", "data.sources[0]"),
    ("dpo", "data:\n  sources: [{path: a.jsonl, aspects: {a: 1}}]\n", "data.sources[0].aspects"),
    ("ppo", "rollout:\n  top_k: {x: 1}\n", "rollout.top_k"),
    ("ppo", "actor:\n  parallel:\n    tensor_model_parallel_size: '2x'\n", "actor.parallel.tensor_model_parallel_size"),
    ("sft", "model:\n  num_layers: [4]\n", "model.num_layers"),
    ("sft", "train:\n  packing: maybe\n", "train.packing"),
    ("sft", "world: null\n", "world"),
]


@pytest.mark.parametrize("cmd,text,key", WRONG_TYPES, ids=[f"{w[2]}-{i}" for i, w in enumerate(WRONG_TYPES)])
def test_wrong_types_name_the_key(tmp_path, cmd, text, key):
    msg = load_error(RECIPES[cmd], yaml_file(tmp_path, text))
    assert f"key {key!r}" in msg and "cfg.yaml" in msg, msg


def test_model_preset_of_the_wrong_type(tmp_path):
    msg = load_error(SFTConfig, yaml_file(tmp_path, "model:\n  preset: [tiny]\n"))
    assert "model.preset: unknown preset ['tiny']" in msg


# --------------------------------------------------------------------------- impossible values

COMMON = [("world", 0), ("world", -1), ("log.interval", 0), ("data.max_length", 0),
          ("data.max_prompt_length", -1), ("data.eval_size", -1), ("data.seed", -1),
          ("data.pair_rule.min_margin", ".nan"), ("train.micro_batch_size", 0),
          ("train.micro_batch_size", -8), ("train.epochs", -1), ("train.epochs", ".inf"),
          ("train.max_steps", -1), ("train.weight_decay", -0.1), ("train.adam_beta2", 1.0),
          ("train.clip_grad", ".nan"), ("train.save_interval", -1), ("train.keep_checkpoints", -1),
          ("train.seed", -1), ("train.schedule.warmup_ratio", 1.5), ("train.schedule.warmup_steps", -1),
          ("train.preemption.max_requeues", -1)]
PAIRS = [("parallel.tensor_model_parallel_size", 0), ("parallel.tensor_model_parallel_size", -2),
         ("parallel.pipeline_model_parallel_size", 0), ("parallel.virtual_pipeline_model_parallel_size", 0),
         ("train.global_batch_size", 0), ("train.global_batch_size", -32), ("train.seq_length", 0),
         ("train.lr", 0), ("train.lr", -1e-5), ("train.lr", ".nan"), ("train.min_lr", -1)]
BAD_VALUES = {
    "rm": COMMON + PAIRS + [("margin", ".inf"), ("train.eval_interval", -1)],
    "dpo": COMMON + PAIRS + [("train.eval_interval", -1), ("dpo.beta", 0), ("dpo.beta", ".nan"),
                             ("dpo.nll_weight", ".nan"),
                             ("dpo.label_smoothing", ".nan"), ("eval.num_prompts", 0),
                             ("eval.max_new_tokens", -1), ("eval.batch_size", 0)],
    "ppo": COMMON + [
        ("actor.parallel.tensor_model_parallel_size", 0), ("critic.parallel.pipeline_model_parallel_size", 0),
        ("reward.parallel.tensor_model_parallel_size", -1), ("reference.parallel.pipeline_model_parallel_size", -4),
        ("reward_ranks", -1), ("train.actor_lr", 0), ("train.critic_lr", ".nan"), ("train.eval_interval", -1),
        ("rollout.prompts_per_step", 0), ("rollout.samples_per_prompt", -1), ("rollout.max_new_tokens", 0),
        ("rollout.max_batch", 0), ("rollout.temperature", ".nan"), ("rollout.top_p", 0), ("rollout.top_p", 1.5),
        ("rollout.top_k", -1), ("ppo.minibatch_size", 0), ("ppo.ppo_epochs", 0), ("ppo.clip", ".nan"),
        ("ppo.kl_coef", -0.1), ("ppo.kl_target", ".nan"), ("ppo.kl_horizon", 0), ("ppo.gamma", 1.5),
        ("ppo.lam", -0.5), ("ppo.value_clip", 0), ("ppo.value_loss_coef", -1), ("ppo.missing_eos_penalty", ".nan"),
        ("ppo.critic_warmup_steps", -1), ("ppo.kl_clamp_min", ".inf"), ("eval.batch_size", 0)],
    "sft": COMMON + PAIRS + [
        ("model.num_layers", 0), ("model.hidden_size", -256), ("model.num_attention_heads", 0),
        ("model.max_position_embeddings", 0), ("model.norm_eps", 0), ("model.rope_theta", ".nan"),
        ("model.init_method_std", -1), ("task.max_value", 1), ("task.min_steps", 0), ("task.num_eval", 0),
        ("task.num_validation", 0), ("eval.num_prompts", 0)],
}
BAD_CASES = [(cmd, key, value) for cmd, cases in BAD_VALUES.items() for key, value in cases]


@pytest.mark.parametrize("cmd,key,value", BAD_CASES, ids=[f"{c}-{k}={v}" for c, k, v in BAD_CASES])
def test_impossible_values_are_refused_naming_the_key(cmd, key, value):
    msg = validation_error(RECIPES[cmd], base(cmd) + [f"{key}={value}"])
    assert f"{key}=" in msg, msg


def test_cross_field_bounds():
    assert "train.min_lr=0.1 is above train.lr=0.01" in validation_error(
        RMConfig, [SOURCES, "train.lr=0.01", "train.min_lr=0.1"])
    assert "train.epochs=0 and train.max_steps=0: nothing to train" in validation_error(
        DPOConfig, [SOURCES, "train.epochs=0"])
    load_config(DPOConfig, None, [SOURCES, "train.epochs=0", "train.max_steps=10"]).validate()
    assert "ppo.kl_clamp_min=1.0 is above ppo.kl_clamp_max=0.0" in validation_error(
        PPOConfig, [SOURCES, "ppo.kl_clamp_min=1", "ppo.kl_clamp_max=0"])
    assert "task.max_steps=1 is below task.min_steps=3" in validation_error(
        SFTConfig, ["task.min_steps=3", "task.max_steps=1"])
    assert "data.sources[0].max_samples=-1" in validation_error(
        RMConfig, ["data.sources=[{path: a.jsonl, max_samples: -1}]"])
    assert "data.sources[0].schema='dpo'" in validation_error(
        RMConfig, ["data.sources=[{path: a.jsonl, schema: dpo}]"])


@pytest.mark.parametrize("cmd,override,needle", [
    ("rm", "train.micro_batch_size=0", "train.micro_batch_size=0 must be > 0"),
    ("dpo", "parallel.tensor_model_parallel_size=0", "parallel.tensor_model_parallel_size=0 must be >= 1"),
    ("ppo", "ppo.minibatch_size=0", "ppo.minibatch_size=0 must be > 0"),
    ("sft", "log.interval=0", "log.interval=0 must be > 0"),
    ("rm", "train.lr=.nan", "train.lr=nan must be a finite number"),
])
def test_cli_refuses_before_starting_anything(capsys, monkeypatch, cmd, override, needle):
    import megarlhf.cli as cli

    def no(*a, **k):  # nothing may start: neither processes nor the recipe
        raise AssertionError("started despite an invalid config")

    monkeypatch.setattr(cli, "_relaunch", no)
    assert main([cmd, override, *base(cmd)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megarlhf {cmd}: invalid configuration") and needle in err


# --------------------------------------------------------------------------- code in YAML

MARK = "hostile-config-marker"

PYTHON_TAGS = [
    '!!python/object/apply:os.system ["touch {m}"]\n',
    'world: !!python/object/apply:os.system ["touch {m}"]\n',
    'train:\n  out_dir: !!python/object/new:subprocess.Popen [["touch", "{m}"]]\n',
    'train:\n  out_dir: !!python/object/apply:builtins.exec ["open(\'{m}\', \'w\')"]\n',
    'log: !!python/name:os.system\n',
    'log: !!python/module:os\n',
    'x: &a !!python/object/apply:os.system ["touch {m}"]\nworld: *a\n',
    'data:\n  sources: [!!python/object/apply:os.system ["touch {m}"]]\n',
    '? !!python/object/apply:os.system ["touch {m}"]\n: 1\n',
]


@pytest.mark.parametrize("text", PYTHON_TAGS, ids=range(len(PYTHON_TAGS)))
def test_python_tags_are_refused_and_never_run(tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    mark = str(tmp_path / MARK)
    msg = load_error(RMConfig, yaml_file(tmp_path, text.format(m=mark)))
    assert "cfg.yaml: line" in msg and "!!python/" in msg and "is not allowed" in msg
    assert not os.path.exists(mark)


@pytest.mark.parametrize("override", [
    'world=!!python/object/apply:os.system ["touch {m}"]',
    'train.out_dir=!!python/object/apply:os.system ["touch {m}"]',
    'train.out_dir=${{oc.decode:"!!python/object/apply:os.system [touch {m}]"}}',
    "train.out_dir=${{eval:__import__('os').system('touch {m}')}}",
])
def test_overrides_cannot_run_code_either(tmp_path, monkeypatch, override):
    monkeypatch.chdir(tmp_path)
    mark = str(tmp_path / MARK)
    with pytest.raises(ConfigLoadError):
        load_config(RMConfig, None, [override.format(m=mark)])
    assert not os.path.exists(mark)


@pytest.mark.parametrize("cmd,items,needle", [
    ("rm", ["world=[1"], "override 'world=[1'"),                                  # YAML error in a value
    ("rm", ["train.out_dir={"], "override 'train.out_dir={'"),
    ("rm", ["world=\x00"], "override 'world=\\x00'"),
    ("rm", ["=="], "override '=='"),
    ("rm", ["[=0"], "override '[=0': not a valid dotted key"),                  # OmegaConf's key parser
    ("ppo", ["actor=[1, 2]", "actor.init_from=x"], "override 'actor.init_from=x'"),  # list, then a key in it
    ("rm", ["data.sources[0].path=a.jsonl"], "key 'data.sources': expected a list, got a mapping"),
    ("rm", ["world"], "override 'world': expected key=value"),
])
def test_malformed_overrides_name_the_override(cmd, items, needle):
    assert needle in load_error(RECIPES[cmd], None, items)


# --------------------------------------------------------------------------- broken documents

@pytest.mark.parametrize("text,got", [
    ("- 1\n- 2\n", "a list"),
    ("[world, 2]\n", "a list"),
    ("42\n", "the scalar '42'"),
    ("just some words\n", "the scalar 'just some words'"),
    ("'world: 2'\n", "the scalar 'world: 2'"),  # a quoted string, not a mapping in disguise
    ("!!binary aGVsbG8=\n", "the scalar"),
])
def test_documents_that_are_not_mappings(tmp_path, text, got):
    msg = load_error(RMConfig, yaml_file(tmp_path, text))
    assert "cfg.yaml: expected a mapping of config keys at the top level, got " + got in msg


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "null\n", "~\n", "---\n"])
def test_empty_documents_are_the_defaults(tmp_path, text):
    assert load_config(RMConfig, yaml_file(tmp_path, text)) == load_config(RMConfig)


@pytest.mark.parametrize("text,line", [
    ("train:\n\tlr: 1\n", "line 2"),                       # a tab for indentation
    ('world: "1\n', "line"),                                # unclosed quote
    ("train:\n  lr: 1\n bogus: 2\n", "line 3"),            # bad indentation
    ("world: 1\nworld: 2\n", "line 2"),                     # duplicate key
    ("world: 1\n---\nworld: 2\n", "line"),                  # two documents
    ("train: {lr: 1\n", "line"),                            # unclosed flow mapping
    ("world: *nope\n", "line 1"),                           # undefined alias
    ("world: !custom 1\n", "line 1"),                       # unknown tag
])
def test_invalid_yaml_names_the_file_and_line(tmp_path, text, line):
    msg = load_error(RMConfig, yaml_file(tmp_path, text))
    assert "cfg.yaml" in msg and line in msg, msg


def test_files_that_are_not_utf8_or_not_files(tmp_path):
    msg = load_error(RMConfig, yaml_file(tmp_path, "train:\n  out_dir: caf\xe9\n".encode("latin-1")))
    assert "cfg.yaml: cannot read YAML" in msg and "utf-8" in msg
    msg = load_error(RMConfig, yaml_file(tmp_path, b"\x00\x01\x02\xff"))
    assert "cfg.yaml" in msg
    assert "not found" in load_error(RMConfig, str(tmp_path))  # a folder
    assert "not found" in load_error(RMConfig, str(tmp_path / "missing.yaml"))


def test_huge_yaml(tmp_path):
    big = "x" * (2 * 2**20)
    cfg = load_config(RMConfig, yaml_file(tmp_path, f"train:\n  out_dir: {big}\n"))
    assert cfg.train.out_dir == big
    many = "".join(f"    - {{path: f{i}.jsonl}}\n" for i in range(300))
    cfg = load_config(RMConfig, yaml_file(tmp_path, "data:\n  sources:\n" + many))
    assert len(cfg.data.sources) == 300
    # more values than any config has: refused, naming the file
    keys = "".join(f"k{i}: {i}\n" for i in range(12000))
    assert "cfg.yaml" in load_error(RMConfig, yaml_file(tmp_path, keys))
    # an alias bomb expands to ~10^9 values: refused at once rather than exhausting memory
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    assert "cfg.yaml" in load_error(RMConfig, yaml_file(tmp_path, bomb))
    deep = "world: " + "[" * 5000 + "]" * 5000 + "\n"
    assert "cfg.yaml" in load_error(RMConfig, yaml_file(tmp_path, deep))


# --------------------------------------------------------------------------- interpolations

def test_interpolations(tmp_path, monkeypatch):
    monkeypatch.delenv("MEGARLHF_SURELY_UNSET", raising=False)
    msg = load_error(RMConfig, yaml_file(tmp_path, "train:\n  out_dir: ${oc.env:MEGARLHF_SURELY_UNSET}\n"))
    assert "cfg.yaml" in msg and "key 'train.out_dir'" in msg and "MEGARLHF_SURELY_UNSET" in msg
    msg = load_error(RMConfig, None, ["train.out_dir=${oc.env:MEGARLHF_SURELY_UNSET}"])
    assert "key 'train.out_dir'" in msg and "MEGARLHF_SURELY_UNSET" in msg
    assert "key 'world'" in load_error(RMConfig, None, ["world=${no.such.key}"])
    assert "key 'world'" in load_error(RMConfig, None, ["world=${world}"])  # a cycle
    assert "Unsupported interpolation type eval" in load_error(RMConfig, None, ["train.out_dir=${eval:1}"])
    monkeypatch.setenv("MEGARLHF_SET", "abc")
    assert "key 'world'" in load_error(RMConfig, None, ["world=${oc.env:MEGARLHF_SET}"])  # then the type
    # what does resolve is plain data
    monkeypatch.setenv("MEGARLHF_SET", "runs/x")
    cfg = load_config(RMConfig, yaml_file(tmp_path, "train:\n  out_dir: ${oc.env:MEGARLHF_SET}\n"
                                                    "log:\n  wandb_project: ${train.out_dir}\n"))
    assert cfg.train.out_dir == cfg.log.wandb_project == "runs/x"


# --------------------------------------------------------------------------- properties

def key_paths(schema, prefix=""):
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp
        path = prefix + f.name
        yield path
        if dataclasses.is_dataclass(tp):
            yield from key_paths(tp, path + ".")


ALL_KEYS = sorted({k for schema in RECIPES.values() for k in key_paths(schema)})
TOKENS = ["0", "-1", "1", "2", "1.5", ".nan", ".inf", "-.inf", "1e309", "0x10", "true", "null", "~", "",
          "[", "]", "{", "}", "[1, 2]", "{a: 1}", "[{path: a.jsonl}]", "'quoted'", '"x', "*alias",
          "&anchor 1", "!!python/object/apply:os.system ['touch " + MARK + "']", "!!python/name:os.system",
          "${oc.env:MEGARLHF_SURELY_UNSET}", "${world}", "${oc.decode:'[1'}", "${eval:1}", "${", "\x00",
          "a: b", "- 1", "tiny", "llama2-7b", "sigmoid", "partitioned", "random", "auto"]
keys = st.one_of(st.sampled_from(ALL_KEYS), st.sampled_from(ALL_KEYS).map(lambda k: k + ".x"),
                 st.text(alphabet="abc._[]0=${}:\\ ", max_size=12))
values = st.one_of(st.sampled_from(TOKENS), st.text(max_size=12), st.integers().map(str),
                   st.floats().map(repr))
overrides = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", keys, values), st.text(max_size=10)),
                     max_size=4)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(RECIPES)), overrides)
def test_random_overrides_load_or_fail_cleanly(tmp_path, monkeypatch, cmd, items):
    monkeypatch.chdir(tmp_path)
    try:
        cfg = load_config(RECIPES[cmd], None, base(cmd) + items)
    except ConfigLoadError as e:
        assert str(e)
    else:
        try:
            cfg.validate()
        except ConfigError as e:
            assert e.problems and all(p for p in e.problems)
    assert not os.path.exists(MARK)


yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8),
              st.sampled_from(TOKENS)),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["path", "lr", "bogus", "preset"]), c,
                                                        max_size=3), max_leaves=6)


@st.composite
def yaml_docs(draw):
    doc = {}
    for key in draw(st.lists(st.sampled_from(ALL_KEYS), max_size=4)):
        node = doc
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[parts[-1]] = draw(yaml_values)
    return yaml.safe_dump(doc, allow_unicode=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(RECIPES)), st.one_of(yaml_docs(), st.text(max_size=60)))
def test_random_yaml_files_load_or_fail_cleanly(tmp_path, monkeypatch, cmd, text):
    monkeypatch.chdir(tmp_path)
    path = yaml_file(tmp_path, text)
    try:
        cfg = load_config(RECIPES[cmd], path)
    except ConfigLoadError as e:
        assert "cfg.yaml" in str(e)
    else:
        try:
            cfg.validate()
        except ConfigError as e:
            assert e.problems
    assert not os.path.exists(MARK)
