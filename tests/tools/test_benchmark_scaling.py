"""The scaling benchmark: its pure helpers (layouts, batch plans, FLOPs, MFU, efficiency)
against hand-worked numbers, the planner's refusals, and one end-to-end sweep of two
layouts of a tiny model (figures are not checked: only that they are there and sane)."""

import csv
import importlib.util
import json
import subprocess

import pytest

from megarlhf.config import preset
from megarlhf.perf import scaling as S
from megarlhf.perf.flops import forward_flops_per_token, matmul_params, train_flops_per_token
from tests.conftest import REPO, run_tool

TINY_SHAPE = ["--layers", "2", "--hidden", "64", "--ffn", "128", "--heads", "4", "--kv-heads", "2",
              "--vocab", "512"]


def load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_scaling", REPO / "tools/benchmark_scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- layouts and batches ----------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("tp1pp1dp1", (1, 1, 1)), ("tp2pp1dp4", (2, 1, 4)), ("dp2", (1, 1, 2)), ("tp8", (8, 1, 1)),
    ("TP2PP2", (2, 2, 1)), (" pp2dp2 ", (1, 2, 2)),
])
def test_parse_layout(text, want):
    lay = S.parse_layout(text)
    assert (lay.tp, lay.pp, lay.dp) == want
    assert lay.devices == want[0] * want[1] * want[2]
    assert S.parse_layout(lay.name) == lay


@pytest.mark.parametrize("text", ["", "dp2tp1", "tp", "tp0", "x2", "tp2,dp2"])
def test_parse_layout_rejects(text):
    with pytest.raises(ValueError):
        S.parse_layout(text)


def test_parse_layouts_and_lists_keep_order_and_drop_duplicates():
    assert [l.name for l in S.parse_layouts("dp2,tp1pp1dp1,tp1pp1dp2,")] == ["tp1pp1dp2", "tp1pp1dp1"]
    assert S.parse_list("4,1,4") == [4, 1]
    assert S.parse_list("full,none", str, S.RECOMPUTE) == ["full", "none"]
    with pytest.raises(ValueError, match="recompute 'some'"):
        S.parse_list("some", str, S.RECOMPUTE, "recompute")


def test_recompute_names_map_to_model_config():
    assert [S.recompute_granularity(r) for r in S.RECOMPUTE] == [None, "full", "selective"]
    with pytest.raises(ValueError):
        S.recompute_granularity("partial")


def test_batch_plan_weak_and_strong():
    dp4 = S.Layout(tp=2, pp=1, dp=4)
    assert S.batch_plan("sft", "weak", dp4, 2, 8, None) == S.BatchPlan(8, 32, 4)
    assert S.batch_plan("sft", "strong", dp4, 2, None, 32) == S.BatchPlan(8, 32, 4)
    assert S.batch_plan("dpo", "strong", S.Layout(dp=2), 4, None, 16) == S.BatchPlan(8, 16, 2)
    with pytest.raises(ValueError, match="not divisible by DP=4"):
        S.batch_plan("sft", "strong", dp4, 1, None, 30)
    with pytest.raises(ValueError, match="not divisible by --micro-batch 3"):
        S.batch_plan("sft", "weak", dp4, 3, 8, None)
    with pytest.raises(ValueError, match="pairs"):
        S.batch_plan("rm", "weak", dp4, 1, 8, None)
    with pytest.raises(ValueError, match="--global-batch"):
        S.batch_plan("sft", "strong", dp4, 1, 8, None)


# -- FLOPs, MFU, efficiency -------------------------------------------------------------------

def test_train_flops_per_phase():
    cfg = preset("tiny")
    assert S.train_flops_per_row_token(cfg, "sft", 128) == train_flops_per_token(cfg, 128)
    assert S.train_flops_per_row_token(cfg, "dpo", 128) == train_flops_per_token(cfg, 128)
    # the reward model's head has one output instead of the vocabulary
    diff = S.train_flops_per_row_token(cfg, "sft", 128) - S.train_flops_per_row_token(cfg, "rm", 128)
    assert diff == 3 * 2 * cfg.hidden_size * (cfg.vocab_size - 1)
    with pytest.raises(ValueError):
        S.train_flops_per_row_token(cfg, "generate", 128)


def test_generation_flops_counts_each_fed_position():
    cfg = preset("tiny")
    prompt, new = 5, 4
    layers = matmul_params(cfg, head_outputs=0)
    total = 0.0
    for p in range(prompt + new - 1):  # positions fed through the layers
        total += 2 * layers + 4 * cfg.num_layers * cfg.num_attention_heads * cfg.kv_channels * (p + 1)
    total += new * 2 * cfg.hidden_size * cfg.vocab_size  # one head product per sampled token
    assert S.generation_flops(cfg, prompt, new) == pytest.approx(total, rel=1e-12)


def test_ppo_step_flops():
    cfg = preset("tiny")
    policy, value = forward_flops_per_token(cfg, 64), forward_flops_per_token(cfg, 64, head_outputs=1)
    assert S.ppo_step_flops(cfg, 1000, 64) == pytest.approx(1000 * (6 * policy + 5 * value))
    assert S.ppo_step_flops(cfg, 1000, 64, ppo_epochs=2) == pytest.approx(1000 * (9 * policy + 8 * value))


def test_mfu_and_its_basis():
    assert S.mfu(50e9, 200e9) == 0.25
    assert S.mfu(None, 200e9) is None and S.mfu(50e9, None) is None
    probe = {"source": "gemm probe", "n": 2048, "dtype": "float32", "device": "cpu", "threads": 1,
             "tflops": 0.095}
    basis = S.mfu_basis(probe)
    assert "float32" in basis and "2048x2048" in basis and "1 thread" in basis
    assert "bfloat16" in S.mfu_basis({"source": "given", "tflops": 989.0, "dtype": "bfloat16"})


def test_efficiency_weak_and_strong():
    # weak: twice the devices, twice the tokens per step, step 5% slower -> 1/1.05
    assert S.efficiency(2 * 1000 / 1.05, 2, 1000, 1) == pytest.approx(1 / 1.05)
    # strong: same global batch on 4x the devices, step time down 3.2x -> 0.8
    assert S.efficiency(1000 * 3.2, 4, 1000, 1) == pytest.approx(0.8)
    # against a base of 2 devices
    assert S.efficiency(3000, 4, 1600, 2) == pytest.approx(0.9375)
    with pytest.raises(ValueError):
        S.efficiency(1.0, 2, 0.0, 1)


def _row(layout, tps, scaling="weak", mb=4, status="ok", per=8, glob=None):
    lay = S.parse_layout(layout)
    return {"phase": "sft", "scaling": scaling, "layout": lay.name, "devices": lay.devices,
            "micro_batch": mb, "recompute": "none", "dtype": "float32", "seq_len": 128,
            "batch_per_replica": per, "global_batch": glob or per * lay.dp, "status": status,
            "tokens_per_s": tps}


def test_add_efficiency_groups_and_bases():
    rows = [_row("dp2", 1800.0), _row("dp1", 1000.0), _row("tp2", 900.0),
            _row("dp1", 700.0, mb=2), _row("dp2", 1050.0, mb=2),
            _row("dp4", None, status="not run"),
            _row("dp1", 1000.0, scaling="strong", glob=16, per=16),
            _row("dp2", 1600.0, scaling="strong", glob=16)]
    S.add_efficiency(rows)
    eff = [r["efficiency"] for r in rows]
    assert eff[0] == pytest.approx(0.9) and eff[1] == 1.0 and eff[2] == pytest.approx(0.45)
    assert eff[3] == 1.0 and eff[4] == pytest.approx(0.75)  # its own micro-batch group
    assert eff[5] is None and rows[5]["efficiency_base"] is None
    assert eff[6] == 1.0 and eff[7] == pytest.approx(0.8)
    assert rows[0]["efficiency_base"] == "tp1pp1dp1" and rows[7]["efficiency_base"] == "tp1pp1dp1"


# -- the tool ---------------------------------------------------------------------------------

def test_planner_marks_what_cannot_run():
    tool = load_tool()
    args = tool.parse_args(["--phase", "generate", "--layouts", "tp1,tp3,dp2", "--recompute", "none,full",
                            "--batch-per-replica", "6", "--micro-batch", "4,3", *TINY_SHAPE])
    runs = tool.plan_runs(args)
    assert len(runs) == 12
    by = {(r["layout"], r["micro_batch"], r["recompute"]): r for r in runs}
    assert by[("tp1pp1dp1", 3, "none")]["status"] == "planned"
    assert by[("tp1pp1dp2", 3, "none")]["global_batch"] == 12
    assert "num_attention_heads=4 is not divisible" in by[("tp3pp1dp1", 3, "none")]["reason"]
    assert "not divisible by --micro-batch 4" in by[("tp1pp1dp1", 4, "none")]["reason"]
    assert "training steps only" in by[("tp1pp1dp1", 3, "full")]["reason"]
    assert all(r["status"] in ("planned", "not run") for r in runs)


def test_slurm_script_syntax_and_entry_point():
    text = (REPO / "slurm/scaling_bench.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "slurm/scaling_bench.sh")]).returncode == 0
    assert "tools/benchmark_scaling.py\" --launcher srun" in text and text.rstrip().endswith('"$@"')


def test_sweep_writes_json_csv_and_plots(tmp_path):
    out = tmp_path / "scaling"
    res = run_tool("tools/benchmark_scaling.py", "--preset", "tiny", "--phase", "sft",
                   "--layouts", "tp1pp1dp1,tp1pp1dp2,tp3pp1dp1", "--launcher", "torchrun",
                   "--steps", "2", "--warmup", "1", "--seq-len", "32", "--batch-per-replica", "4",
                   "--micro-batch", "2", "--probe-n", "256", "--probe-seconds", "0.2", *TINY_SHAPE,
                   "--out", out, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "scaling.json").read_text())
    rows = {r["layout"]: r for r in report["rows"]}
    assert rows["tp3pp1dp1"]["status"] == "not run"
    one, two = rows["tp1pp1dp1"], rows["tp1pp1dp2"]
    for r, dp in ((one, 1), (two, 2)):
        assert r["status"] == "ok" and r["devices"] == dp
        assert r["tokens_per_step"] == 4 * dp * 32  # weak scaling: 4 rows of 32 tokens per replica
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / dp, rel=1e-3)
        assert 0 < r["mfu"] < 1.5 and r["tflops_per_device"] > 0
        assert r["peak_memory_mb"] > 10 and r["params"] > 0 and 0 < r["cpu_busy"] < 2
        assert "float32" in r["mfu_basis"] and "256x256" in r["mfu_basis"]
    assert one["efficiency"] == 1.0 and two["efficiency_base"] == "tp1pp1dp1"
    for r in (one, two):  # seconds per step in the gradient reduction, mean and max over ranks
        assert 0 <= r["extra"]["grad_sync_s"] <= r["extra"]["grad_sync_s_max"] < r["step_s"]
    assert two["efficiency"] == pytest.approx(two["tokens_per_s"] / (2 * one["tokens_per_s"]), rel=1e-3)
    probe = report["probe"]
    assert probe["n"] == 256 and probe["dtype"] == "float32" and probe["threads"] == 1
    assert len(probe["samples_tflops"]) == 2  # before and after the sweep
    shared = report["probe_shared"]  # the probe on both ranks' cores at once
    assert shared["processes"] == 2 and shared["n"] == 256 and shared["threads"] == 1
    assert len(shared["flops_per_s_per_device"]) == 2 and min(shared["flops_per_s_per_device"]) > 0
    assert 0 < shared["ratio_to_solo"] < 2
    assert "processes at once" in res.stdout
    assert report["environment"]["launcher"] == "torchrun"
    with open(out / "scaling.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["layout"] for r in table] == ["tp1pp1dp1", "tp1pp1dp2", "tp3pp1dp1"]
    for name in ("throughput.png", "mfu.png", "efficiency.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
