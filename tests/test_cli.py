"""The `megarlhf` command: config errors, printing the config, and the smoke job end to end."""

import json
import os
import re
import subprocess
import sys

import pytest

from megarlhf.cli import main
from tests.conftest import REPO


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run([sys.executable, "-m", "megarlhf.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_override_is_reported(capsys):
    assert main(["smoke", "model.num_layerz=3"]) == 2
    assert "model.num_layerz" in capsys.readouterr().err


def test_invalid_layout_is_reported_before_any_process_starts(capsys):
    assert main(["smoke", "parallel.tensor_model_parallel_size=3"]) == 2
    err = capsys.readouterr().err
    assert "model.num_attention_heads=8 is not divisible by parallel.tensor_model_parallel_size=3" in err
    assert main(["smoke", "seq_length=4096"]) == 2
    assert "seq_length=4096 exceeds model.max_position_embeddings=512" in capsys.readouterr().err


def test_transformer_engine_without_it_is_reported(capsys):
    from megarlhf import platform

    if platform.transformer_engine_status()[0]:
        pytest.skip("Transformer Engine is usable on this machine")
    # ffn 704: FP8 GEMM shapes at TP=2 (the tiny preset's 688 / 2 = 344 is refused first)
    assert main(["smoke", "model.transformer_impl=transformer_engine", "model.fp8=hybrid",
                 "model.ffn_hidden_size=704"]) == 2
    assert "model.transformer_impl='transformer_engine' cannot be used" in capsys.readouterr().err


def test_print_config(capsys):
    assert main(["smoke", "--print-config", "steps=3"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "tensor_model_parallel_size: 2" in out


def test_smoke_runs_end_to_end(tmp_path):
    res = cli("smoke", "steps=4", f"out_dir={tmp_path}")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "starting 2 processes" in out and "TP2 PP1 DP1" in out
    losses = [float(x) for x in re.findall(r"step +\d+ +loss +([\d.]+)", out)]
    assert len(losses) == 4
    assert "max |logit difference| = 0.00e+00" in out
    assert (tmp_path / "checkpoint" / "megarlhf.json").exists()


# Every stage of the demo pipeline at toy sizes (also used by `megarlhf compare`'s test).
TOY_PIPELINE = [
    "sft.task.num_sft=96", "sft.task.num_preference=16", "sft.task.num_prompts=24", "sft.task.num_eval=16",
    "sft.task.num_validation=12",
    "sft.train.global_batch_size=32", "sft.eval.num_prompts=16", "sft.eval.max_new_tokens=16",
    "pairs.num_prompts=24", "pairs.samples_per_prompt=2", "pairs.max_new_tokens=16",
    "rm.data.eval_size=4", "rm.train.max_steps=2", "rm.train.global_batch_size=8", "rm.train.micro_batch_size=4",
    "dpo.train.max_steps=2", "dpo.train.global_batch_size=8", "dpo.train.micro_batch_size=4",
    "dpo.eval.num_prompts=16", "dpo.eval.max_new_tokens=16",
    "ppo.rollout.prompts_per_step=8", "ppo.rollout.max_new_tokens=16", "ppo.ppo.minibatch_size=4",
    "ppo.train.micro_batch_size=4", "ppo.train.max_steps=2", "ppo.eval.num_prompts=16",
    "ppo.eval.max_new_tokens=16", "sft.log.progress_bar=false", "rm.log.progress_bar=false",
    "dpo.log.progress_bar=false", "ppo.log.progress_bar=false",
]


def test_demo_pipeline_wires_every_stage(tmp_path):
    """The whole pipeline at toy sizes (numbers are not checked here; the README reports a
    real run): every stage runs and evaluates itself on the validation split, each final
    policy is scored on the test split with its paired difference to SFT, the table and
    results.json come out, the curve is drawn."""
    out = tmp_path / "demo"
    res = cli("demo", f"out_dir={out}", "seed=7", *TOY_PIPELINE, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    res = res.stdout
    last = res.strip().splitlines()[-1]
    assert last == str(out / "results.json")
    results = json.loads(open(last).read())
    # each validation figure is the one its stage recorded with its own output
    from megarlhf.models.checkpoint import read_meta

    for key, ckpt in (("sft", "sft/checkpoint"), ("dpo", "dpo/final"), ("ppo", "ppo/final")):
        meta = read_meta(str(out / ckpt))
        assert results[f"{key}_validation_accuracy"] == meta.extra["exact_match"], key
    for stage in ("sft", "dpo", "ppo"):
        rows = [json.loads(l) for l in open(out / stage / "metrics.jsonl") if '"exact_match"' in l]
        assert rows and all(r["eval_prompts"] == 12 for r in rows), stage
    stage_evals = [l for l in res.splitlines() if "exact match on" in l and "held-out prompts" in l]
    assert len(stage_evals) == 4 and all("validation.jsonl" in l for l in stage_evals)  # PPO's at start too
    assert results["validation_problems"] == 12 and results["eval_problems"] == 16 and results["seed"] == 7
    # the test figures come from the demo's own evaluation of each final policy
    for key in ("sft", "dpo", "ppo"):
        acc = results[f"{key}_accuracy"]
        assert 0 <= acc <= 1 and (acc * 16).is_integer(), key
    for key in ("dpo", "ppo"):
        d = results[f"{key}_minus_sft"]
        assert d["n"] == results["eval_problems"] and d["level"] == 0.95
        assert d["difference"] == pytest.approx(results[f"{key}_accuracy"] - results["sft_accuracy"])
        assert d["low"] <= d["difference"] <= d["high"] and results[f"{key}_minus_sft_ci95"] == [d["low"], d["high"]]
        assert 0 <= d["p_mcnemar"] <= 1 and d["won"] + d["lost"] <= d["n"]
    rm_rows = [json.loads(l) for l in open(out / "rm" / "metrics.jsonl") if '"eval_accuracy"' in l]
    assert results["rm_pair_accuracy"] == rm_rows[-1]["eval_accuracy"]
    assert len(results["ppo_score_curve"]) == 2
    # PPO evaluated before its first step and at its end
    assert [s for s, _ in results["ppo_eval_curve"]] == [0, 2]
    assert results["ppo_eval_curve"][-1][1] == results["ppo_validation_accuracy"]
    assert results["seconds"]["test_eval"] > 0
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert (out / "sft" / "task" / "validation.jsonl").exists()
    assert "| PPO |" in res and "exact match (test, 16 problems)" in res and "validation exact match" in res


def test_demo_seed_reaches_every_stage_and_the_stages_evaluate_on_validation():
    from megarlhf.demo import DemoConfig

    st = DemoConfig(out_dir="o", seed=7).stages()
    assert [st[k].train.seed for k in ("sft", "rm", "dpo", "ppo")] == [7] * 4 and st["pairs_sampling"].seed == 7
    assert {st[k].eval.prompts for k in ("sft", "dpo", "ppo")} == {st["validation"]} == {"o/sft/task/validation.jsonl"}
    assert st["test"] == "o/sft/task/eval.jsonl"
    unseeded = DemoConfig(out_dir="o").stages()
    assert unseeded["sft"].train.seed == DemoConfig().sft.train.seed and unseeded["pairs_sampling"].seed == 0


def test_each_roles_kernels_are_checked_before_any_process_starts(mg_causal, mg_reward, capsys):
    """Every model a job builds, each under its own key, against this machine: TE and FP8
    without TE or a GPU, a kernel compiled at run time without what it needs, and TE's
    process-wide attention switch named differently by roles sharing processes."""
    from megarlhf import platform

    if platform.transformer_engine_status()[0]:
        pytest.skip("Transformer Engine is usable on this machine")
    args = ["ppo", "--config", "examples/tiny/ppo.yaml", f"actor.init_from={mg_causal}",
            f"critic.init_from={mg_reward}", f"reward.init_from={mg_reward}",
            "actor.model.transformer_impl=transformer_engine", "actor.model.attention_backend=fused",
            "critic.model.transformer_impl=transformer_engine", "critic.model.attention_backend=flash",
            "reward.model.bias_activation_fusion=true", "train.packing=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "actor.model.transformer_impl='transformer_engine' cannot be used" in err
    assert "critic.model.transformer_impl='transformer_engine' cannot be used" in err
    assert "reference.model" not in err  # the reference runs the actor's checkpoint as it is
    assert "reward.model.bias_activation_fusion=true compiles its kernel at run time" in err
    assert ("Transformer Engine models sharing processes must use one attention backend: "
            "actor.model.attention_backend='fused', critic.model.attention_backend='flash'") in err
    assert main(args[:3] + ["actor.init_from=/no/such/checkpoint"]) == 1
    assert "checkpoint folder not found: /no/such/checkpoint" in capsys.readouterr().err


def test_demo_reads_the_ppo_curve_of_the_whole_run_resumed_steps_included(tmp_path):
    """A demo run over a finished (or resumed) PPO run: its process ran no step, yet the
    summary and the plot take every step from metrics.jsonl, a re-logged step's last record."""
    from megarlhf.demo import ppo_eval_curve, ppo_history

    rows = [{"step": 0, "exact_match": 0.25}, {"step": 1, "score_mean": 0.1}, {"step": 2, "score_mean": 0.2},
            {"step": 2, "eval_accuracy": 0.5}, {"step": 3, "score_mean": 0.3}, {"step": 3, "score_mean": 0.35},
            {"step": 4, "score_mean": 0.4}, {"step": 4, "exact_match": 0.5}, {"step": 4, "exact_match": 0.55}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(h["step"], h["score_mean"]) for h in ppo_history(str(tmp_path))] == [(1, 0.1), (2, 0.2), (3, 0.35),
                                                                                   (4, 0.4)]
    assert ppo_eval_curve(str(tmp_path)) == [[0, 0.25], [4, 0.55]]


def test_demo_results_and_table_from_per_problem_outcomes():
    """results.json's figures: test accuracies from the outcomes, each paired difference to
    SFT over the same problems, the stages' own (validation) figures beside them."""
    from megarlhf.demo import collect_results, table
    from megarlhf.recipes.common import ExactMatch

    sft = [True] * 40 + [False] * 60
    dpo = [True] * 45 + [False] * 55
    ppo = [False] * 10 + [True] * 30 + [False] * 60
    test = {k: ExactMatch(sum(v) / 100, v, 1.0) for k, v in (("sft", sft), ("dpo", dpo), ("ppo", ppo))}
    stages = {"sft": {"exact_match": 0.41, "eval_prompts": 50}, "rm": {"eval": {"accuracy": 0.8}},
              "dpo": {"exact_match": 0.44}, "ppo": {"exact_match": 0.3}}
    history = [{"step": 1, "score_mean": -0.5}, {"step": 2, "score_mean": 0.25}]
    r = collect_results(stages, test, history, [[0, 0.4], [2, 0.3]], {"sft": 1.0, "test_eval": 2.04}, 3)
    assert (r["sft_accuracy"], r["dpo_accuracy"], r["ppo_accuracy"]) == (0.4, 0.45, 0.3)
    assert [r[f"{k}_validation_accuracy"] for k in ("sft", "dpo", "ppo")] == [0.41, 0.44, 0.3]
    assert r["eval_problems"] == 100 and r["validation_problems"] == 50 and r["rm_pair_accuracy"] == 0.8
    d = r["dpo_minus_sft"]
    assert (d["won"], d["lost"], d["n"]) == (5, 0, 100) and d["difference"] == pytest.approx(0.05)
    assert r["dpo_minus_sft_ci95"] == [d["low"], d["high"]] and d["low"] <= 0.05 <= d["high"]
    p = r["ppo_minus_sft"]
    assert (p["won"], p["lost"]) == (0, 10) and p["high"] < 0 and p["p_mcnemar"] == pytest.approx(2 / 2 ** 10)
    assert r["ppo_eval_curve"] == [[0, 0.4], [2, 0.3]] and r["seed"] == 3 and r["seconds"]["test_eval"] == 2.0
    json.dumps(r)
    text = table(r)
    assert "| stage | exact match (test, 100 problems) |" in text
    assert f"| DPO | 45.0% | +5.0 [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}], p=0.062 | 44.0% | |" in text
    assert "| PPO | 30.0% | -10.0 [" in text and "p=0.002 | 30.0% | RM score -0.50 -> 0.25 |" in text
    assert "| reward model | | | | held-out pair accuracy 80.0% |" in text
