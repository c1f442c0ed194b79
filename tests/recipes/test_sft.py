"""`megarlhf sft` end to end on the built-in task (short runs; the quality figure is
measured by the full default run, see the README)."""

import json
import os
import subprocess
import sys

import pytest

from megarlhf.models.checkpoint import read_meta
from tests.conftest import REPO, megarlhf

SHORT = ["task.num_sft=256", "task.num_eval=32", "task.num_preference=16", "task.num_prompts=16",
         "train.global_batch_size=32", "train.micro_batch_size=4", "train.max_steps=4",
         "eval.num_prompts=32", "eval.max_new_tokens=24"]


def sft(out_dir, *overrides):
    res = megarlhf("sft", f"train.out_dir={out_dir}", *SHORT, *overrides)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    return out


@pytest.mark.parametrize("layout", [["world=2"], ["world=2", "parallel.pipeline_model_parallel_size=2",
                                                  "train.packing=false"]],
                         ids=["dp2_packed", "pp2_padded"])
def test_sft_runs_and_records_its_tokenizer(tmp_path, layout):
    out = sft(tmp_path, *layout)
    assert "exact match on 32 held-out prompts" in out
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    meta = read_meta(str(tmp_path / "checkpoint"))
    assert meta.chat_template == "tulu" and os.path.isfile(meta.tokenizer)
    assert meta.model.vocab_size == 384 and meta.extra["consumed_samples"] == 4 * 32


def test_sft_config_errors_before_launch():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "megarlhf.cli", "sft", "world=3",
                          "parallel.tensor_model_parallel_size=2", "train.seq_length=64"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "world=3 is not divisible by TP x PP = 2" in res.stderr
    assert "train.seq_length=64 is shorter than data.max_length=128" in res.stderr
