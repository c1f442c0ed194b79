"""The benchmarks run and print/write their JSON (tiny settings; figures are not checked)."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, *map(str, args)], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def test_generate_benchmark_prints_json():
    out = run("benchmarks/generate.py", "--layers", 2, "--hidden", 64, "--heads", 4, "--kv-heads", 2,
              "--ffn", 128, "--vocab", 512, "--batch", 4, "--prompt-len", 8, "--new-tokens", 8,
              "--repeats", 1)
    last = json.loads(out.strip().splitlines()[-1])
    assert last["tokens_per_s"] > 0 and last["peak_rss_mb"] > 0 and last["speedup_vs_hf"] > 0


def test_conversion_memory_benchmark_writes_json(tmp_path):
    out_json = tmp_path / "mem.json"
    run("benchmarks/conversion_memory.py", "--layers", 2, "--hidden", 64, "--ffn", 128, "--heads", 4,
        "--kv-heads", 2, "--vocab", 512, "--out", out_json, "--workdir", tmp_path / "work")
    rows = json.loads(out_json.read_text())["rows"]
    assert {r["converter"] for r in rows} == {"hf_to_megatron", "megatron_to_hf"}
    assert all(r["peak_private_mib"] > 0 for r in rows)


def test_ppo_benchmark_prints_json():
    out = run("benchmarks/ppo.py", "--layers", 2, "--hidden", 64, "--heads", 4, "--kv-heads", 2,
              "--ffn", 128, "--vocab", 512, "--prompts", 8, "--max-new-tokens", 8, "--minibatch", 4,
              "--micro-batch", 4, "--steps", 2)
    last = json.loads(out.strip().splitlines()[-1])
    for key in ("generate_s", "score_s", "logprobs_s", "advantages_s", "update_s", "step_s"):
        assert last[key] > 0, key
    assert last["tokens_per_s"] > 0 and last["peak_rss_mb"] > 0 and last["steps_counted"] == 1
