"""`megarlhf compare`: the summary and the ordering checks by hand, and the whole command at
toy sizes (every stage runs, the table, JSON and plot come out; numbers are not checked
at these sizes)."""

import json

import pytest

from megarlhf.compare import CompareConfig, ordering, summarize
from tests.conftest import megarlhf as cli
from tests.test_cli import TOY_PIPELINE


def test_summary_mean_spread_and_deviation():
    s = summarize({"sft": [0.5], "dpo": [0.6, 0.7, 0.65], "ppo_small_rm": [None, 0.4], "ppo_large_rm": []})
    assert s["sft"] == {"mean": 0.5, "spread": 0.0, "std": None, "n": 1}
    assert s["dpo"]["mean"] == pytest.approx(0.65) and s["dpo"]["spread"] == pytest.approx(0.1)
    assert s["dpo"]["std"] == pytest.approx(0.05)
    assert s["ppo_small_rm"]["n"] == 1 and s["ppo_large_rm"]["mean"] is None


def test_ordering_states_each_claim():
    s = summarize({"sft": [0.60], "dpo": [0.62], "ppo_small_rm": [0.61], "ppo_large_rm": [0.66]})
    lines = ordering(s)
    assert lines == ["PPO >= DPO: holds (best PPO 66.0% vs DPO 62.0%)", "DPO > SFT: holds (+2.0%)",
                     "PPO > SFT: holds (+6.0%)", "a larger RM helps PPO: holds (+5.0%)"]
    s = summarize({"sft": [0.60], "dpo": [0.58], "ppo_small_rm": [0.57], "ppo_large_rm": [0.55]})
    assert [l.split(":")[1].split("(")[0].strip() for l in ordering(s)] == ["does not hold"] * 4


def test_config_errors():
    from megarlhf.config import ConfigError

    with pytest.raises(ConfigError, match="seeds=\\[1, 1\\] repeats a seed"):
        CompareConfig(seeds=[1, 1]).validate()
    import dataclasses

    from megarlhf.config import preset

    bad = dataclasses.replace(preset("tiny"), hidden_size=100)
    with pytest.raises(ConfigError, match="large_rm.hidden_size=100"):
        CompareConfig(large_rm=bad).validate()


def test_compare_runs_every_stage(tmp_path):
    out = tmp_path / "cmp"
    res = cli("compare", f"out_dir={out}", "seeds=[5]", *TOY_PIPELINE,
              "large_rm.num_layers=2", "large_rm.hidden_size=128", "large_rm.ffn_hidden_size=344",
              "large_rm.num_attention_heads=4", "large_rm.num_query_groups=2", timeout=1200)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last == str(out / "comparison.json")
    r = json.loads(open(last).read())
    # every figure is the one its stage recorded with its own output
    from megarlhf.models.checkpoint import read_meta

    for method, ckpt in (("sft", "sft/checkpoint"), ("dpo", "dpo_s5/final"), ("ppo_small_rm", "ppo_small_rm_s5/final"),
                         ("ppo_large_rm", "ppo_large_rm_s5/final")):
        assert r["exact_match"][method] == [read_meta(str(out / ckpt)).extra["exact_match"]], method
    for size, rm in (("small", "rm"), ("large", "rm_large")):
        rows = [json.loads(l) for l in open(out / rm / "metrics.jsonl") if '"eval_accuracy"' in l]
        assert r["rm_pair_accuracy"][size] == rows[-1]["eval_accuracy"], size
    assert len(r["ordering"]) == 4
    assert "| PPO, large RM |" in res.stdout and (out / "comparison.md").exists()
    assert (out / "comparison.png").stat().st_size > 1000
    from megarlhf.models.checkpoint import read_meta

    assert read_meta(str(out / "rm_large" / "final")).model.hidden_size == 128
    assert read_meta(str(out / "ppo_large_rm_s5" / "final")).extra.get("steps") == 2
