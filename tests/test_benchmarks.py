"""The benchmarks run and print/write their JSON (tiny settings): the figures are the ones
timed (consistent with each other), not checked against targets."""

import json

import pytest

from tests.conftest import run_tool


def run(script, *args, timeout=300):
    res = run_tool(script, *args, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def test_generate_benchmark_prints_json():
    out = run("benchmarks/generate.py", "--layers", 2, "--hidden", 64, "--heads", 4, "--kv-heads", 2,
              "--ffn", 128, "--vocab", 512, "--batch", 4, "--prompt-len", 8, "--new-tokens", 8,
              "--repeats", 1)
    last = json.loads(out.strip().splitlines()[-1])
    # the figures are what was timed: 4 prompts x 8 tokens in the median time, both engines
    assert last["tokens_per_s"] == pytest.approx(4 * 8 / last["seconds"], rel=0.01)
    assert last["speedup_vs_hf"] == pytest.approx(last["tokens_per_s"] / last["hf_tokens_per_s"], rel=0.01)
    assert last["peak_rss_mb"] > 100  # torch and a model: a process's memory, not zero or kB


def test_generate_benchmark_ragged_prompts_ending_early_on_fewer_slots():
    """More prompts than slots, lengths 3-12, EOS at rate 0.3: both engines follow the same
    EOS table (the benchmark asserts every response's length), so their token counts agree."""
    out = run("benchmarks/generate.py", "--layers", 2, "--hidden", 64, "--heads", 4, "--kv-heads", 2,
              "--ffn", 128, "--vocab", 512, "--batch", 4, "--num-prompts", 10, "--prompt-len-range", "3:12",
              "--new-tokens", 16, "--eos-rate", 0.3, "--repeats", 1)
    last = json.loads(out.strip().splitlines()[-1])
    assert last["num_prompts"] == 10 and last["slots"] == 4 and last["prompt_len"] == [3, 12]
    assert 10 <= last["generated_tokens"] < 10 * 16  # some responses ended early
    assert last["mean_response"] == pytest.approx(last["generated_tokens"] / 10, abs=0.05)
    assert last["tokens_per_s"] == pytest.approx(last["generated_tokens"] / last["seconds"], rel=0.01)
    assert 3 * 10 <= last["prompt_tokens"] <= 12 * 10 and last["prefill_passes"] >= 2
    assert 0 < last["slot_occupancy"] <= 1 and last["decode_step_ms"] > 0
    assert last["speedup_vs_hf"] == pytest.approx(last["tokens_per_s"] / last["hf_tokens_per_s"], rel=0.01)


def test_generate_benchmark_refuses_a_bad_range():
    res = run_tool("benchmarks/generate.py", "--prompt-len-range", "9:3", "--no-hf")
    assert res.returncode == 2 and "--prompt-len-range" in res.stderr


def test_conversion_memory_benchmark_writes_json(tmp_path):
    out_json = tmp_path / "mem.json"
    run("benchmarks/conversion_memory.py", "--layers", 2, "--hidden", 64, "--ffn", 128, "--heads", 4,
        "--kv-heads", 2, "--vocab", 512, "--out", out_json, "--workdir", tmp_path / "work")
    rows = json.loads(out_json.read_text())["rows"]
    assert {r["converter"] for r in rows} == {"hf_to_megatron", "megatron_to_hf"}
    assert all(r["peak_private_mib"] > 50 for r in rows)  # a process with torch loaded, in MiB


def test_ppo_benchmark_prints_json():
    out = run("benchmarks/ppo.py", "--layers", 2, "--hidden", 64, "--heads", 4, "--kv-heads", 2,
              "--ffn", 128, "--vocab", 512, "--prompts", 8, "--max-new-tokens", 8, "--minibatch", 4,
              "--micro-batch", 4, "--steps", 2)
    last = json.loads(out.strip().splitlines()[-1])
    phases = ("generate_s", "score_s", "logprobs_s", "advantages_s", "update_s")
    for key in (*phases, "step_s"):
        assert last[key] > 0, key
    assert sum(last[k] for k in phases) <= last["step_s"] * 1.02 + 0.005  # the step's parts
    assert 1 <= last["response_length"] <= 8  # --max-new-tokens 8
    assert last["tokens_per_s"] > 0 and last["peak_rss_mb"] > 100 and last["steps_counted"] == 1


def _demo_seeds():
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("demo_seeds", REPO / "benchmarks" / "demo_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_seeds_summarises_every_line_over_the_seeds():
    bench = _demo_seeds()

    def results(sft, dpo, low, high, total, rm=0.8):
        return {"sft_accuracy": sft, "dpo_accuracy": dpo, "ppo_accuracy": 0.5, "sft_validation_accuracy": sft,
                "dpo_validation_accuracy": dpo, "ppo_validation_accuracy": None, "rm_pair_accuracy": rm,
                "dpo_minus_sft": {"difference": dpo - sft, "low": low, "high": high},
                "dpo_minus_sft_ci95": [low, high], "seconds": {"total": total}}

    per_seed = {3: results(0.4, 0.5, 0.02, 0.18, 100.0), 1: results(0.6, 0.6, -0.05, 0.05, 300.0, rm=None)}
    s = bench.summarize(per_seed)
    assert set(s) == set(bench.LINES)
    assert s["sft_accuracy"] == {"mean": pytest.approx(0.5), "min": 0.4, "max": 0.6, "std": pytest.approx(0.1),
                                 "n": 2, "unit": "%", "per_seed": [0.4, 0.6]}
    assert s["dpo_minus_sft"]["per_seed"] == [pytest.approx(0.1), 0.0] and s["dpo_minus_sft"]["unit"] == "points"
    assert s["dpo_minus_sft_ci95_low"]["min"] == -0.05 and s["dpo_minus_sft_ci95_high"]["max"] == 0.18
    assert s["seconds_total"]["mean"] == 200.0 and s["seconds_total"]["std"] == 100.0
    assert s["rm_pair_accuracy"]["n"] == 1 and s["rm_pair_accuracy"]["std"] == 0.0
    assert s["ppo_validation_accuracy"]["mean"] is None and s["ppo_minus_sft"]["per_seed"] == [None, None]
    text = bench.table(s, [3, 1])
    assert text.splitlines()[0] == "| line | mean | min-max | per seed (3, 1) |"
    assert "| sft_accuracy | 50.0% | 40.0% - 60.0% | 40.0%, 60.0% |" in text
    assert "| dpo_minus_sft | +5.0 | +0.0 - +10.0 | +10.0, +0.0 |" in text
    assert "| seconds_total | 200 s | 100 s - 300 s | 100 s, 300 s |" in text
    assert "| ppo_minus_sft | - | - - - | -, - |" in text
    assert bench.demo_argv("runs/x", 2, ["a.b=1"]) == ["out_dir=runs/x/seed2", "seed=2", "a.b=1"]


@pytest.mark.parametrize("args,needle", [
    (["--seeds", "1", "sft.train.lrr=1"], "sft.train.lrr"),
    (["--seeds", "1", "1"], "repeats a seed"),
    (["seed=4"], "seed=4: set by this benchmark"),
])
def test_demo_seeds_refuses_bad_arguments_before_running(args, needle, tmp_path):
    res = run_tool("benchmarks/demo_seeds.py", "--out-dir", tmp_path, *args)
    assert res.returncode == 2 and needle in res.stderr, res.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_demo_seeds_reuse_reads_finished_seeds_without_running_them(tmp_path):
    """--reuse: every seed with a results.json is read, none is run again (a seed without
    one would start the demo; here all are present, so the command runs no demo)."""
    for seed, acc in ((1, 0.7), (2, 0.9)):
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "results.json").write_text(json.dumps({"sft_accuracy": acc}))
    res = run_tool("benchmarks/demo_seeds.py", "--out-dir", tmp_path, "--seeds", "1", "2", "--reuse")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "read from" in res.stdout and "megarlhf.cli demo" not in res.stdout
    summary = json.loads((tmp_path / "demo_seeds.json").read_text())["summary"]
    assert summary["sft_accuracy"]["mean"] == pytest.approx(0.8)
