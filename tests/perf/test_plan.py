"""The planner's arithmetic against figures computed by hand (docs/slurm.md), and the CLI."""

import json
import re
from pathlib import Path

import pytest

from megarlhf.config.model import preset
from megarlhf.perf import flops
from megarlhf.perf.plan import (GB, GPUS, Assumptions, Layout, Models, Precision, Workload,
                                activation_coefficients, fp8_meta_bytes, fp8_weight_bytes,
                                gemm_parameters, plan_ppo, ppo_step_time, role_memory,
                                stage_parameters, training_step_time)
from tests.conftest import run_tool

ROOT = Path(__file__).resolve().parents[2]
L13, L70 = preset("llama2-13b"), preset("llama2-70b")
# The flagship as examples/ppo_13b_70b_rm.yaml runs it: Transformer Engine layers (fused
# attention) everywhere, FP8 for the actor, reference and critic, bf16 for the reward model.
FLAGSHIP_FP8 = Precision.with_fp8(["actor", "reference", "critic"])
FLAGSHIP_CMD = ["--policy", "llama2-13b", "--reward", "llama2-70b", "--nodes", "3", "--attention", "fused",
                "--fp8", "actor,reference,critic"]


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
    64 x 2,048 tokens is 13.4 GB; with megatron's local attention (the page's earlier table)
    activations of 2 x 2,048 tokens are 19.3 GB (+ logits)."""
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
    r = run_tool("tools/plan.py", "--policy", "llama2-13b", "--reward", "llama2-70b", "--nodes", "3", "--json", out)
    assert r.returncode == 0, r.stderr
    assert "best: partitioned" in r.stdout and out.exists()
    r = run_tool("tools/plan.py", "--policy", "llama2-70b", "--reward", "llama2-70b", "--nodes", "1")
    assert r.returncode == 1 and "nothing fits on 1 node" in r.stdout
    r = run_tool("tools/plan.py", "--policy", "llama2-13b", "--reward", "llama2-70b", "--rollouts", "0")
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


# ---- FP8 (Transformer Engine, delayed scaling, bf16 parameters) ----

def test_fp8_weight_copies_and_scaling_state_by_hand():
    c = preset("tiny")  # h 256, ffn 688, 8 heads of 32, 2 KV groups, 4 layers, amax history 1024
    # GEMM weights per layer: QKV 256 x (8 + 2 x 2) x 32 = 98,304; attention output 8 x 32 x 256
    # = 65,536; SwiGLU 3 x 256 x 688 = 528,384; together 692,224 (x 4 layers = 2,768,896).
    # No embedding, norm or output head: those are not Transformer Engine GEMMs.
    assert gemm_parameters(c, 1) == 2_768_896
    assert gemm_parameters(c, 2) == 1_384_448  # two layers on the largest stage
    lay = Layout(tp=2, pp=2, dp=1)
    # per GPU 1,384,448 / 2 = 692,224 parameters: data + transpose (2 B) when trainable, the
    # row-wise data only (1 B) for a forward-only role
    assert fp8_weight_bytes(c, lay, trainable=True) == 1_384_448
    assert fp8_weight_bytes(c, lay, trainable=False) == 692_224
    # 2 layers x 35 FP8 tensors x (1,024 history + 1 scale) x 4 B, not split over TP
    assert fp8_meta_bytes(c, lay) == 287_000
    assert fp8_meta_bytes(c, Layout(tp=8, pp=2, dp=1)) == 287_000
    w, a = Workload(prompt_len=128, response_len=128, micro_batch=2, minibatch=8), Assumptions()
    actor = role_memory(c, lay, w, a, trainable=True, scalar_head=False, fp8=True)
    ref = role_memory(c, lay, w, a, trainable=False, scalar_head=False, fp8=True)
    plain = role_memory(c, lay, w, a, trainable=True, scalar_head=False)
    assert actor.resident == plain.resident + 1_384_448 + 287_000
    assert ref.resident == ref.weights + 692_224 + 287_000
    # weights, gradients and optimizer states are those of bf16 parameters: FP8 adds, never replaces
    for term in ("weights", "gradients", "optimizer"):
        assert getattr(actor, term) == getattr(plain, term)


def test_fp8_activation_terms_by_hand():
    # bf16: s h (10 + 24/TP). FP8: the QKV and fc1 inputs 2 -> 1 B (10 -> 8); fc2's input
    # 8 -> 4 and the attention projection's input 2 -> 1, plus the bf16 output that fused
    # attention keeps for its own backward (+2): 24 -> 21; local attention does not keep it: 19.
    assert activation_coefficients(False, "fused") == (10, 24)
    assert activation_coefficients(False, "local") == (10, 24)
    assert activation_coefficients(True, "fused") == (8, 21)
    assert activation_coefficients(True, "local") == (8, 19)
    c = preset("tiny")
    w = Workload(prompt_len=128, response_len=128, micro_batch=2, minibatch=8)  # s = 256
    lay = Layout(tp=2, pp=1, dp=1)
    logits = 3 * 4 * 256 * 4096 / 2  # 6,291,456 B
    # fused, FP8: 256 x 256 x (8 + 21/2) = 1,212,416 B per layer; x 4 layers = 4,849,664;
    # (4,849,664 + 6,291,456) x micro-batch 2 = 22,282,240
    fused = role_memory(c, lay, w, Assumptions(attention="fused"), True, False, fp8=True)
    assert fused.activations == 22_282_240
    # bf16 for comparison: 256 x 256 x (10 + 12) = 1,441,792 per layer: 2 x (5,767,168 + logits)
    assert role_memory(c, lay, w, Assumptions(attention="fused"), True, False).activations == 24_117_248
    # local, FP8: 256 x 256 x (8 + 19/2) = 1,146,880 + scores 5 x 8 x 256^2 / 2 = 1,310,720
    # = 2,457,600 per layer; 2 x (4 x 2,457,600 + logits) = 32,243,712
    local = role_memory(c, lay, w, Assumptions(attention="local"), True, False, fp8=True)
    assert local.activations == 32_243_712
    # full recomputation keeps each layer's bf16 input (2 s h) and one FP8 layer's working set:
    # 2 x (4 x 2 x 256 x 256 + 1,212,416 + logits) = 16,056,320
    full = role_memory(c, lay, w, Assumptions(attention="fused", recompute="full"), True, False, fp8=True)
    assert full.activations == 16_056_320
    # generation is bf16: the KV cache does not change
    gen = dict(trainable=True, scalar_head=False, generates=True)
    assert (role_memory(c, lay, w, Assumptions(), **gen, fp8=True).kv_cache
            == role_memory(c, lay, w, Assumptions(), **gen).kv_cache)


def test_fp8_training_time_by_hand():
    c, gpu = preset("tiny"), GPUS["h100-80g"]
    # forward FLOPs per token (s = 256): layer GEMMs 2 x 2,768,896 = 5,537,792 run FP8; the head
    # 2 x 256 x 4,096 = 2,097,152 and the attention 4 x 4 x 256 x 256 = 1,048,576 stay bf16.
    # 8 sequences x 256 tokens x 3 passes = 6,144 token-passes:
    # FP8 5,537,792 x 6,144 = 34,024,194,048; bf16 3,145,728 x 6,144 = 19,327,352,832.
    t = training_step_time(c, Layout(1, 1, 1), gpu, Assumptions(), sequences=8, seq_len=256, micro_batch=2,
                           gpus_per_node=8, fp8=True)
    assert t["compute"] == pytest.approx(34_024_194_048 / (1979e12 * 0.28) + 19_327_352_832 / (989e12 * 0.40))
    bf16 = training_step_time(c, Layout(1, 1, 1), gpu, Assumptions(), 8, 256, 2, 8)
    assert bf16["compute"] == pytest.approx((34_024_194_048 + 19_327_352_832) / (989e12 * 0.40))
    assert t["tp_comm"] == bf16["tp_comm"] and t["dp_comm"] == bf16["dp_comm"]  # bf16 / fp32 traffic
    # 13B: 12,687,769,600 GEMM parameters of 13.02B; at TP=8 x DP=2 the update's GEMMs take
    # 64 x 2,048 x 3 x 2 x 12.69e9 / (16 x 1,979e12 x 0.28) = 1.23 s instead of 2.43 s at bf16 rates
    assert gemm_parameters(L13, 1) == 12_687_769_600
    fl = 64 * 2048 * 3 * 2 * 12_687_769_600
    t13 = training_step_time(L13, Layout(8, 1, 2), gpu, Assumptions(), 64, 2048, 2, 8, fp8=True)
    rest = 64 * 2048 * flops.train_flops_per_token(L13, 2048) - fl
    assert t13["compute"] == pytest.approx(fl / (16 * 1979e12 * 0.28) + rest / (16 * 989e12 * 0.4))
    with pytest.raises(ValueError, match="no FP8"):
        training_step_time(c, Layout(1, 1, 1), GPUS["a100-80g"], Assumptions(), 8, 256, 2, 8, fp8=True)


def test_bf16_is_unchanged_by_the_fp8_setting():
    """Precision() (all bf16, the default) gives the figures the planner gave before it knew
    FP8: the flagship's 61.5 / 70.8 GB and 184.6 s with local attention."""
    m, w, a, gpu = Models(L13, L13, L70), Workload(), Assumptions(), GPUS["h100-80g"]
    default = plan_ppo(m, gpu, 3, 8, w, a)
    explicit = plan_ppo(m, gpu, 3, 8, w, a, Precision.with_fp8([]))
    assert [(c.policy, c.reward, c.policy_peak_gb, c.step_s) for c in default] == \
        [(c.policy, c.reward, c.policy_peak_gb, c.step_s) for c in explicit]
    best = default[0]
    assert (best.policy, best.reward) == (Layout(8, 1, 2), Layout(2, 1, 4))
    assert best.policy_peak_gb == pytest.approx(61.55, abs=0.005)
    assert best.reward_peak_gb == pytest.approx(70.79, abs=0.005)
    assert best.step_s == pytest.approx(184.6, abs=0.05)
    assert {k: round(v, 1) for k, v in best.times.phases.items()} == {
        "generate": 75.1, "score": 49.3, "ref_and_values": 20.7, "actor_update": 13.6, "actor_comm": 6.3,
        "critic_update": 13.4, "critic_comm": 6.2}
    assert all(mem.fp8_weights == 0 and mem.fp8_meta == 0 for mem in best.memory.values())
    with pytest.raises(ValueError, match="expected 'bf16' or 'fp8'"):
        Precision(actor="fp16")
    with pytest.raises(ValueError, match="unknown role"):
        Precision.with_fp8(["policy"])
    with pytest.raises(ValueError, match="no FP8 tensor cores"):
        plan_ppo(m, GPUS["a100-80g"], 3, 8, w, a, FLAGSHIP_FP8)


def test_flagship_fits_with_fp8_and_how_much_room_is_left():
    """The flagship with FP8 actor, reference and critic: still TP8 x DP2 beside a TP2 x DP4
    reward model. FP8 costs 7.9 GB of cached FP8 weights and saves 2.0 GB of activations; the
    peak is generation's (bf16), 63.4 GB: 14.1 GB under the 77.5 usable (85.5 - 8 reserved)."""
    m, w, a, gpu = Models(L13, L13, L70), Workload(), Assumptions(attention="fused"), GPUS["h100-80g"]
    fp8 = plan_ppo(m, gpu, 3, 8, w, a, FLAGSHIP_FP8)[0]
    bf16 = plan_ppo(m, gpu, 3, 8, w, a)[0]
    for best in (fp8, bf16):
        assert best.fits and (best.policy, best.reward) == (Layout(8, 1, 2), Layout(2, 1, 4))
        assert best.peak_phase == "generation"
    actor, critic, ref = fp8.memory["actor"], fp8.memory["critic"], fp8.memory["reference"]
    assert actor.fp8_weights == critic.fp8_weights == 2 * 12_687_769_600 / 8  # 3.17 GB
    assert ref.fp8_weights == 12_687_769_600 / 8  # 1.59 GB: row-wise only
    assert actor.fp8_meta == 40 * 35 * 1025 * 4  # 5.7 MB
    extra = sum(fp8.memory[r].resident - bf16.memory[r].resident for r in ("actor", "critic", "reference"))
    assert extra / GB == pytest.approx(7.95, abs=0.01)
    # activations of 2 x 2,048 tokens over 40 layers: 13 s h -> 10.625 s h (+ 0.2 GB logits)
    assert actor.activations / GB == pytest.approx(9.11, abs=0.005)
    assert bf16.memory["actor"].activations / GB == pytest.approx(11.10, abs=0.005)
    assert fp8.policy_peak_gb == pytest.approx(63.42, abs=0.005)
    assert bf16.policy_peak_gb == pytest.approx(55.48, abs=0.005)
    headroom = gpu.memory_gb - a.reserve_gb - fp8.policy_peak_gb
    assert headroom == pytest.approx(14.1, abs=0.05)
    assert fp8.reward_peak_gb == bf16.reward_peak_gb == pytest.approx(69.45, abs=0.005)  # the RM stays bf16
    # FP8 speeds the updates and the policy-side forwards; generation and scoring are bf16
    assert fp8.times.phases["generate"] == bf16.times.phases["generate"]
    assert fp8.times.phases["score"] == bf16.times.phases["score"]
    assert fp8.times.phases["actor_update"] < 0.75 * bf16.times.phases["actor_update"]
    assert fp8.step_s == pytest.approx(173.8, abs=0.05) and bf16.step_s == pytest.approx(184.6, abs=0.05)
    # FP8 takes away one option: all four roles colocated at TP8 x DP2 on two nodes fit in bf16,
    # not with the FP8 weight copies
    two = {(c.placement, c.policy): c for c in plan_ppo(m, gpu, 2, 8, w, a, FLAGSHIP_FP8)}
    two_bf16 = {(c.placement, c.policy): c for c in plan_ppo(m, gpu, 2, 8, w, a)}
    assert not two["colocated", Layout(8, 1, 2)].fits and two_bf16["colocated", Layout(8, 1, 2)].fits


def test_ppo_step_time_runs_each_role_in_its_precision():
    m, w, a, gpu = Models(L13, L13, L70), Workload(), Assumptions(attention="fused"), GPUS["h100-80g"]
    pol, rm = Layout(8, 1, 2), Layout(2, 1, 4)
    base = ppo_step_time(m, pol, rm, gpu, w, a, 8)
    only_reward = ppo_step_time(m, pol, rm, gpu, w, a, 8, Precision(reward="fp8"))
    assert only_reward.phases["score"] < base.phases["score"]
    assert {k: v for k, v in only_reward.phases.items() if k != "score"} == \
        {k: v for k, v in base.phases.items() if k != "score"}
    only_ref = ppo_step_time(m, pol, rm, gpu, w, a, 8, Precision(reference="fp8"))
    assert only_ref.phases["ref_and_values"] < base.phases["ref_and_values"]
    assert only_ref.phases["actor_update"] == base.phases["actor_update"]


def _flagship_table():
    """The rows of the memory table in docs/slurm.md's flagship section: label -> (bf16, FP8)."""
    text = (ROOT / "docs" / "slurm.md").read_text()
    start = text.index("### The flagship: 13B policy, 13B critic, 70B reward model")
    section = text[start:text.index("\n### ", start + 1)]
    rows, in_table = {}, False
    for line in section.splitlines():
        if line.startswith("| GB per GPU | bf16 | FP8"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            break
        if in_table and not line.startswith("|---"):
            cells = [c.strip().strip("*").strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = (cells[-2], cells[-1])
    return section, rows


def test_doc_flagship_table_equals_the_planner():
    """Every row of docs/slurm.md's flagship memory table, both columns, against the planner
    run as the section's command says (to the digits the table prints)."""
    section, rows = _flagship_table()
    assert "python tools/plan.py " + " ".join(FLAGSHIP_CMD) in " ".join(section.split())
    m, w, a, gpu = Models(L13, L13, L70), Workload(), Assumptions(attention="fused"), GPUS["h100-80g"]
    cands = {"bf16": plan_ppo(m, gpu, 3, 8, w, a)[0], "fp8": plan_ppo(m, gpu, 3, 8, w, a, FLAGSHIP_FP8)[0]}

    def policy_resident(c):
        return sum(c.memory[r].resident for r in ("actor", "critic", "reference"))

    expected = {  # label prefix -> GB from a candidate
        "actor: weights": lambda c: c.memory["actor"].weights,
        "actor: FP8 weight copies": lambda c: c.memory["actor"].fp8_weights + c.memory["actor"].fp8_meta,
        "actor: gradients": lambda c: c.memory["actor"].gradients,
        "actor: optimizer": lambda c: c.memory["actor"].optimizer,
        "critic": lambda c: c.memory["critic"].resident,
        "reference": lambda c: c.memory["reference"].resident,
        "resident": policy_resident,
        "generation: KV cache": lambda c: c.memory["actor"].kv_cache,
        "update: actor activations": lambda c: c.memory["actor"].activations,
        "peak": lambda c: c.policy_peak_gb * GB,
        "reward model": lambda c: c.reward_peak_gb * GB,
    }
    seen = set()
    for label, (bf16, fp8) in rows.items():
        keys = [k for k in expected if label.startswith(k)]
        assert len(keys) == 1, f"row {label!r} matches {keys}"
        seen.add(keys[0])
        for text, prec in ((bf16, "bf16"), (fp8, "fp8")):
            value = float(re.sub(r"[^0-9.]", "", text))
            decimals = len(text.split(".")[1]) if "." in text else 0
            got = expected[keys[0]](cands[prec]) / GB
            assert abs(got - value) <= 0.5 * 10 ** -decimals + 1e-9, (label, prec, text, got)
    assert seen == set(expected), f"rows missing from the table: {set(expected) - seen}"
    assert cands["fp8"].peak_phase == "generation"
    assert "(generation" in next(k for k in rows if k.startswith("peak"))


def test_cli_flagship_fp8(tmp_path):
    out = tmp_path / "plan.json"
    r = run_tool("tools/plan.py", *FLAGSHIP_CMD, "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "precision: actor fp8, reference fp8, critic fp8, reward bf16; generation bf16" in r.stdout
    assert "fp8_mfu=0.28" in r.stdout and "attention=fused" in r.stdout
    assert "policy side: resident 50.00 + generation 13.42 = peak 63.42; reward model: 69.45" in r.stdout
    res = json.loads(out.read_text())
    assert res["precision"] == {"actor": "fp8", "reference": "fp8", "critic": "fp8", "reward": "bf16"}
    assert res["candidates"][0]["roles_gb"]["actor"]["fp8_weights"] == pytest.approx(3.172, abs=1e-3)
    r = run_tool("tools/plan.py", "--policy", "llama2-13b", "--reward", "llama2-70b", "--gpu", "a100-80g",
                 "--fp8", "actor")
    assert r.returncode != 0 and "no FP8 tensor cores" in r.stderr
    r = run_tool("tools/plan.py", "--policy", "llama2-13b", "--reward", "llama2-70b", "--fp8", "policy")
    assert r.returncode == 2 and "unknown role" in r.stderr
