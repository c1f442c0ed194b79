"""The planner's arithmetic against figures computed by hand (docs/slurm.md), and the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from megarlhf.config.model import preset
from megarlhf.perf import flops
from megarlhf.perf.plan import (GB, GPUS, Assumptions, Layout, Models, Workload, plan_ppo,
                                role_memory, stage_parameters, training_step_time)

ROOT = Path(__file__).resolve().parents[2]
L13, L70 = preset("llama2-13b"), preset("llama2-70b")


def test_matmul_params_and_flops_by_hand():
    c = preset("tiny")  # h 256, ffn 688, 8 heads of 32, 2 KV groups, vocab 4096, 4 layers
    layer = 256 * (8 + 2 * 2) * 32 + 8 * 32 * 256 + 3 * 256 * 688
    assert flops.matmul_params(c) == 4 * layer + 256 * 4096
    assert flops.matmul_params(c, head_outputs=1) == 4 * layer + 256
    # the embedding lookup is free: everything else is the causal LM's parameter count
    assert flops.matmul_params(c) == c.num_parameters() - 4096 * 256 - (2 * 4 + 1) * 256
    fwd = 2 * flops.matmul_params(c) + 4 * 4 * 128 * 256
    assert flops.forward_flops_per_token(c, 128) == fwd
    assert flops.train_flops_per_token(c, 128) == 3 * fwd


def test_stage_parameters():
    assert stage_parameters(L13, 1) == L13.num_parameters()
    # two stages of 20 layers; the last also holds the head and the final norm
    layer = (L13.num_parameters() - 2 * 32000 * 5120 - 5120) // 40
    assert stage_parameters(L13, 2) == 20 * layer + 32000 * 5120 + 5120
    assert stage_parameters(L70, 1, head_rows=1) == pytest.approx(68.7e9, rel=2e-3)


def test_flagship_memory_equals_the_hand_calculation():
    """docs/slurm.md: the 13B actor at TP=8 DP=2 holds 3.25 + 6.51 + 9.76 GB; the KV cache of
    64 x 2,048 tokens is 13.4 GB; activations of 2 x 2,048 tokens are 19.3 GB (+ logits)."""
    w, a = Workload(), Assumptions()
    actor = role_memory(L13, Layout(8, 1, 2), w, a, trainable=True, scalar_head=False, generates=True)
    assert actor.weights / GB == pytest.approx(2 * 13.016e9 / 8 / GB, rel=1e-3)
    assert actor.gradients == 2 * actor.weights
    assert actor.optimizer / GB == pytest.approx(12 * 13.016e9 / 16 / GB, rel=1e-3)
    assert actor.kv_cache == 64 * 2048 * 2 * 40 * (5120 / 8) * 2
    acts = 2 * 40 * (2048 * 5120 * 13 + 5 * 40 * 2048 ** 2 / 8)
    logits = 2 * 3 * 4 * 2048 * 32000 / 8
    assert actor.activations == pytest.approx(acts + logits)
    assert acts / GB == pytest.approx(19.3, abs=0.05)
    # no recomputation of the scores with fused attention; full recomputation keeps inputs
    fused = role_memory(L13, Layout(8, 1, 2), w, Assumptions(attention="fused"), True, False)
    assert fused.activations == pytest.approx(2 * 40 * 2048 * 5120 * 13 + logits)
    full = role_memory(L13, Layout(8, 1, 2), w, Assumptions(recompute="full"), True, False)
    one_layer = 2048 * 5120 * 13
    assert full.activations == pytest.approx(2 * (40 * 2 * 2048 * 5120 + one_layer) + logits)
    # without the distributed optimizer the states are not sharded
    plain = role_memory(L13, Layout(8, 1, 2), w, Assumptions(distributed_optimizer=False), True, False)
    assert plain.optimizer == 2 * actor.optimizer


def test_pipeline_keeps_pp_microbatches_in_flight():
    w, a = Workload(minibatch=64, micro_batch=1), Assumptions(attention="fused")
    one = role_memory(L13, Layout(8, 1, 1), w, a, True, False).activations
    four = role_memory(L13, Layout(8, 4, 1), w, a, True, False).activations
    logits = 3 * 4 * 2048 * 32000 / 8
    # 10 layers per stage x 4 microbatches in flight = the 40 layers of one microbatch
    assert four - logits == pytest.approx(one - logits)


def test_training_time_parts():
    gpu, a = GPUS["h100-80g"], Assumptions()
    t = training_step_time(L13, Layout(8, 1, 2), gpu, a, sequences=64, seq_len=2048, micro_batch=2,
                           gpus_per_node=8)
    fl = 64 * 2048 * flops.train_flops_per_token(L13, 2048)
    assert t["compute"] == pytest.approx(fl / (16 * 989e12 * 0.4))
    grads = 4 * L13.num_parameters() / 8
    assert t["dp_comm"] == pytest.approx(2 * 1 / 2 * grads / (50e9 * 0.7))  # crosses nodes
    one_node = training_step_time(L13, Layout(8, 1, 1), gpu, a, 64, 2048, 2, 8)
    assert one_node["dp_comm"] == 0.0
    piped = training_step_time(L13, Layout(4, 2, 1), gpu, a, 64, 2048, 2, 8)
    assert piped["compute"] == pytest.approx(fl / (8 * 989e12 * 0.4) * (32 + 1) / 32)


def test_plan_finds_the_flagship_and_rejects_what_cannot_fit():
    m = Models(L13, L13, L70)
    three = plan_ppo(m, GPUS["h100-80g"], 3, 8, Workload(), Assumptions())
    best = three[0]
    assert best.fits and best.policy == Layout(8, 1, 2) and best.reward.gpus == 8
    assert best.policy_peak_gb == pytest.approx(61.5, abs=0.1)
    # one node cannot hold a 13B actor, critic and reference beside a 70B scorer
    assert not any(c.fits for c in plan_ppo(m, GPUS["h100-80g"], 1, 8, Workload(), Assumptions()))
    # every candidate that fits is within the usable memory
    for c in three:
        if c.fits:
            assert c.policy_peak_gb <= 85.5 - 8 and c.reward_peak_gb <= 85.5 - 8


def test_cli(tmp_path):
    out = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--policy", "llama2-13b",
                        "--reward", "llama2-70b", "--nodes", "3", "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "best: partitioned" in r.stdout and out.exists()
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--policy", "llama2-70b",
                        "--reward", "llama2-70b", "--nodes", "1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "nothing fits on 1 node" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--policy", "llama2-13b",
                        "--reward", "llama2-70b", "--rollouts", "0"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "--rollouts=0" in r.stderr


def test_predict_sweep_fits_mfu_on_the_base_row_and_adds_communication():
    from megarlhf.perf.plan import predict_sweep

    cfg = preset("tiny")
    row = dict(status="ok", tp=1, pp=1, dp=1, devices=1, layout="tp1pp1dp1", recompute="none",
               global_batch=16, seq_len=256, micro_batch=8, dtype="float32", step_s=3.0)
    rows = [row, dict(row, dp=2, devices=2, layout="tp1pp1dp2", global_batch=32, step_s=3.3),
            dict(row, pp=2, devices=2, layout="tp1pp2dp1", step_s=2.0),
            dict(row, tp=2, devices=2, layout="tp2pp1dp1", step_s=1.8),
            dict(row, dp=2, devices=2, layout="x", status="not run", step_s=None)]
    got = {r["layout"]: r for r in predict_sweep(rows, cfg, peak_tflops=0.1, link_gbs=0.5)}
    assert set(got) == {"tp1pp1dp1", "tp1pp1dp2", "tp1pp2dp1", "tp2pp1dp1"}
    assert got["tp1pp1dp1"]["ratio"] == pytest.approx(1.0)
    fl = 16 * 256 * flops.train_flops_per_token(cfg, 256)
    assert got["tp1pp1dp1"]["fitted_mfu"] == pytest.approx(fl / (0.1e12 * 3.0))
    # weak scaling: the same compute per device, plus the gradient all-reduce (fp32, 2 ranks)
    grads = 4 * cfg.num_parameters()
    assert got["tp1pp1dp2"]["compute"] == pytest.approx(3.0)
    assert got["tp1pp1dp2"]["dp_comm"] == pytest.approx(grads / 0.5e9)
    # two stages, two microbatches per replica: half the compute per device, times (2+1)/2
    assert got["tp1pp2dp1"]["compute"] == pytest.approx(3.0 / 2 * 1.5)
    # TP=2: half the compute plus 4 all-reduces per layer and microbatch of fp32 activations
    tp_bytes = 8 * 256 * 256 * 4
    assert got["tp2pp1dp1"]["tp_comm"] == pytest.approx(4 * 4 * 2 * tp_bytes / 0.5e9)
