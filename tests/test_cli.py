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
    real run): every stage runs, the table and results.json come out, the curve is drawn."""
    out = tmp_path / "demo"
    res = cli("demo", f"out_dir={out}", *TOY_PIPELINE, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    res = res.stdout
    last = res.strip().splitlines()[-1]
    assert last == str(out / "results.json")
    results = json.loads(open(last).read())
    # each figure is the one its stage recorded with its own output
    from megarlhf.models.checkpoint import read_meta

    for key, ckpt in (("sft_accuracy", "sft/checkpoint"), ("dpo_accuracy", "dpo/final"), ("ppo_accuracy", "ppo/final")):
        assert results[key] == read_meta(str(out / ckpt)).extra["exact_match"], key
    rm_rows = [json.loads(l) for l in open(out / "rm" / "metrics.jsonl") if '"eval_accuracy"' in l]
    assert results["rm_pair_accuracy"] == rm_rows[-1]["eval_accuracy"]
    assert len(results["ppo_score_curve"]) == 2
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert "| PPO |" in res


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
    from megarlhf.demo import ppo_history

    rows = [{"step": 1, "score_mean": 0.1}, {"step": 2, "score_mean": 0.2}, {"step": 2, "eval_accuracy": 0.5},
            {"step": 3, "score_mean": 0.3}, {"step": 3, "score_mean": 0.35}, {"step": 4, "score_mean": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(h["step"], h["score_mean"]) for h in ppo_history(str(tmp_path))] == [(1, 0.1), (2, 0.2), (3, 0.35),
                                                                                   (4, 0.4)]
