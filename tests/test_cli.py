"""The `megarlhf` command: config errors, printing the config, and the demo job end to end."""

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
    assert main(["demo", "model.num_layerz=3"]) == 2
    assert "model.num_layerz" in capsys.readouterr().err


def test_invalid_layout_is_reported_before_any_process_starts(capsys):
    assert main(["demo", "parallel.tensor_model_parallel_size=3"]) == 2
    err = capsys.readouterr().err
    assert "model.num_attention_heads=8 is not divisible by parallel.tensor_model_parallel_size=3" in err
    assert main(["demo", "seq_length=4096"]) == 2
    assert "seq_length=4096 exceeds model.max_position_embeddings=512" in capsys.readouterr().err


def test_transformer_engine_without_it_is_reported(capsys):
    from megarlhf import platform

    if platform.transformer_engine_status()[0]:
        pytest.skip("Transformer Engine is usable on this machine")
    assert main(["demo", "model.transformer_impl=transformer_engine", "model.fp8=hybrid"]) == 2
    assert "model.transformer_impl='transformer_engine' cannot be used" in capsys.readouterr().err


def test_print_config(capsys):
    assert main(["demo", "--print-config", "steps=3"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "tensor_model_parallel_size: 2" in out


def test_demo_runs_end_to_end(tmp_path):
    res = cli("demo", "steps=4", f"out_dir={tmp_path}")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "starting 2 processes" in out and "TP2 PP1 DP1" in out
    losses = [float(x) for x in re.findall(r"step +\d+ +loss +([\d.]+)", out)]
    assert len(losses) == 4
    assert "max |logit difference| = 0.00e+00" in out
    assert (tmp_path / "checkpoint" / "megarlhf.json").exists()
