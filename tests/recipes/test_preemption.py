"""A signal stops a recipe after the current step with a checkpoint; the same command
resumes from it: SFT ends exactly as a run that never stopped; the reward model and DPO
resume without losing or repeating a step. One process each (that every rank of a job
stops after the same step is tested in tests/train/test_preemption.py; the SLURM side,
with requeue, in tests/slurm)."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from megarlhf.train.preemption import STOPPED_EXIT
from tests.cli_fork import run_cli
from tests.conftest import REPO
from tests.recipes.test_pairwise import common
from tests.recipes.test_sft import SHORT


def env_without_slurm():
    """No SLURM variables: these runs must never try to requeue an enclosing job. One
    thread: the runs stay quick on a busy machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return dict(env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def cli(*args):
    res = run_cli(list(args), env_without_slurm(), str(REPO), 600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    return res.stdout + res.stderr


def run_and_signal(args, started: str):
    """Run ``megarlhf *args`` (one process); once ``started`` is printed (the handlers are
    in place by then), send it SIGUSR1. Returns (exit code, output)."""
    proc = subprocess.Popen([sys.executable, "-m", "megarlhf.cli", *map(str, args)], cwd=REPO,
                            env=env_without_slurm(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if started in line:
                proc.send_signal(signal.SIGUSR1)
                break
        lines += proc.stdout.readlines()
        return proc.wait(timeout=600), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()


def rows(out_dir, key):
    return [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl")) if key in l]


def stopped_step(out: str) -> int:
    m = re.search(r"stopped after step (\d+)", out)
    assert m, out[-4000:]
    return int(m.group(1))


def test_sft_stopped_by_a_signal_resumes_identically(tmp_path):
    steps = [*SHORT, "train.max_steps=6", "log.progress_bar=false"]
    full, part = tmp_path / "full", tmp_path / "part"
    cli("sft", f"train.out_dir={full}", *steps)
    code, out = run_and_signal(["sft", f"train.out_dir={part}", *steps], "megarlhf sft: 1 process(es)")
    assert code == STOPPED_EXIT, out[-4000:]
    k = stopped_step(out)
    assert 1 <= k < 6 and "(SIGUSR1)" in out
    assert f"saved {part / 'checkpoints' / f'step_{k:07d}'}" in out and "not a SLURM job" in out
    assert not (part / "checkpoint").exists()  # the final model is not written
    out = cli("sft", f"train.out_dir={part}", *steps)
    assert f"resumed from {part / 'checkpoints' / f'step_{k:07d}'} at step {k}" in out
    a, b = rows(full, '"loss"'), rows(part, '"loss"')
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert (ra["loss"], ra["grad_norm"], ra["lr"]) == (rb["loss"], rb["grad_norm"], rb["lr"]), (ra, rb)
    assert json.load(open(part / "checkpoint" / "megarlhf.json"))["extra"]["consumed_samples"] == 6 * 32


@pytest.mark.parametrize("recipe", ["rm", "dpo"])
def test_pairwise_stopped_by_a_signal_resumes(recipe, sft_like, tmp_path):
    ckpt, files = sft_like
    args = [*common(recipe, ckpt, files, tmp_path), "train.max_steps=6", "train.resume=auto", "world=1"]
    code, out = run_and_signal(args, f"megarlhf {recipe}: 1 process(es)")
    assert code == STOPPED_EXIT, out[-4000:]
    k = stopped_step(out)
    assert 1 <= k < 6 and "(SIGUSR1)" in out and not (tmp_path / "final").exists()
    out = cli(*args)
    assert f"at step {k} ({k * 4} pairs consumed)" in out
    assert [r["step"] for r in rows(tmp_path, '"grad_norm"')] == [1, 2, 3, 4, 5, 6]
