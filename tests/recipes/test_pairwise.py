"""`megarlhf rm` and `megarlhf dpo`: layout and accumulation invariance of the loss
trajectory, exact resume after SIGKILL, held-out metrics and rm-eval."""

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from tests.conftest import REPO, megarlhf, run_tool


def cli(*args, timeout=600):
    res = megarlhf(*args, timeout=timeout)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    return res.stdout + res.stderr


def metrics(out_dir):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [r for r in rows if "loss" in r and "grad_norm" in r]


def common(recipe, ckpt, files, out, gbs=4, mbs=4):
    args = [recipe, f"train.init_from={ckpt}", f"data.sources=[{{path: {files['preference']}}}]",
            f"train.out_dir={out}", "train.max_steps=5", f"train.global_batch_size={gbs}",
            f"train.micro_batch_size={mbs}", "train.lr=1e-3", "train.min_lr=1e-4",
            "data.eval_size=8", "log.progress_bar=false", "train.resume=never"]
    if recipe == "dpo":
        args.append(f"eval.prompts={files['eval']}")
        args.append("eval.num_prompts=8")
        args.append("eval.max_new_tokens=8")
    return args


LAYOUTS = {"tp2_pp2": ["world=4", "parallel.tensor_model_parallel_size=2",
                       "parallel.pipeline_model_parallel_size=2"],
           "dp2": ["world=2", "train.micro_batch_size=2"],
           # a runtime setting over the checkpoint's: recomputation changes memory, not numbers
           "recompute_full": ["model.recompute_granularity=full"]}


@pytest.fixture(scope="module", params=["rm", "dpo"])
def baseline(request, sft_like, tmp_path_factory):
    ckpt, files = sft_like
    out = tmp_path_factory.mktemp(request.param)
    cli(*common(request.param, ckpt, files, out))
    return request.param, metrics(out)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_match_tp1(baseline, sft_like, tmp_path, layout):
    recipe, ref = baseline
    ckpt, files = sft_like
    cli(*common(recipe, ckpt, files, tmp_path), *LAYOUTS[layout])
    got = metrics(tmp_path)
    assert len(got) == len(ref) == 5
    assert len({round(r["grad_norm"], 6) for r in ref}) == 5  # the weights really move
    if layout == "recompute_full":  # the override reached the model (and its saved config)
        saved = json.load(open(os.path.join(tmp_path, "final", "megarlhf.json")))
        assert saved["model"]["recompute_granularity"] == "full"
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * max(1.0, a["grad_norm"])


def test_accumulation_matches_one_microbatch(baseline, sft_like, tmp_path):
    recipe, ref = baseline  # micro-batch 4 x 1
    ckpt, files = sft_like
    cli(*common(recipe, ckpt, files, tmp_path, mbs=1))  # micro-batch 1 x 4 accumulation steps
    got = metrics(tmp_path)
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5


def test_dpo_online_reference_matches_precomputed(sft_like, tmp_path):
    ckpt, files = sft_like
    pre, onl = tmp_path / "pre", tmp_path / "onl"
    cli(*common("dpo", ckpt, files, pre))
    cli(*common("dpo", ckpt, files, onl), "dpo.reference=online")
    for a, b in zip(metrics(pre), metrics(onl)):
        assert abs(a["loss"] - b["loss"]) < 1e-5


def test_dpo_nll_term_adds_the_chosen_per_token_nll(sft_like, tmp_path):
    # Step 1 starts with policy == reference, so the DPO part is exactly log 2; with
    # length-normalised log-probs the RPO term is minus the chosen per-token log-prob.
    ckpt, files = sft_like
    cli(*common("dpo", ckpt, files, tmp_path), "train.max_steps=1", "dpo.nll_weight=1.0",
        "dpo.length_normalized=true")
    first = metrics(tmp_path)[0]
    assert first["logp_chosen"] < -0.01
    assert abs(first["loss"] - (math.log(2.0) - first["logp_chosen"])) < 1e-5


def final_weights(out_dir):
    from safetensors.torch import load_file

    hf = os.path.join(tempfile.mkdtemp(prefix="hf", dir=out_dir), "model")  # a run may be read twice
    res = run_tool("tools/convert_megatron_to_hf.py", "--ckpt", os.path.join(out_dir, "final"), "--out", hf)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(os.path.join(hf, "model.safetensors"))


def assert_same_final_weights(run_a, run_b):
    """The two runs' final models, exported to safetensors, are equal bit for bit."""
    a, b = final_weights(run_a), final_weights(run_b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkill_and_resume_is_bit_identical(sft_like, tmp_path):
    ckpt, files = sft_like
    steps = ["train.max_steps=12", "train.save_interval=3", "train.resume=auto"]
    full = tmp_path / "full"
    cli(*common("rm", ckpt, files, full), *steps)
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.Popen([sys.executable, "-m", "megarlhf.cli", *common("rm", ckpt, files, killed),
                             *steps], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, mid-training
    proc.wait()
    assert latest.exists() and not (killed / "final").exists()
    first = latest.read_text().strip()
    out = cli(*common("rm", ckpt, files, killed), *steps)
    assert f"resumed from {killed / 'checkpoints' / first}" in out
    assert_same_final_weights(full, killed)


def test_rm_eval_reports_subsets(sft_like, tmp_path):
    ckpt, files = sft_like
    out = tmp_path / "rm"
    cli(*common("rm", ckpt, files, out), "pooling=mean")
    rows = [json.loads(l) for l in open(files["preference"])][:20]
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(dict(r, subset="math" if i % 2 else "chat")) + "\n"
                             for i, r in enumerate(rows)))
    res = tmp_path / "res.json"
    text = cli("rm-eval", "--ckpt", out / "final", "--data", bench, "--out", res)
    r = json.loads(res.read_text())
    assert r["pairs"] == 20 and r["pooling"] == "mean"  # read as the model was trained
    assert set(k for k in r if k.startswith("accuracy/")) == {"accuracy/chat", "accuracy/math"}
    # 10 pairs per subset: the overall accuracy is the mean of the two, each a count over 10
    assert r["accuracy"] == pytest.approx((r["accuracy/chat"] + r["accuracy/math"]) / 2)
    assert all(abs(r[k] * 10 - round(r[k] * 10)) < 1e-9 for k in ("accuracy/chat", "accuracy/math"))
    assert "math:" in text
