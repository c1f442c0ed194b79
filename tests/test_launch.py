"""megarlhf.launch: ranks forked from one parent get torchrun's environment and their
share of threads; a failing rank (exception, exit code, SIGKILL) ends the job with its
code while the others are stopped; signals sent to the launcher reach every rank."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megarlhf import launch
from tests.conftest import REPO

WORKER = str(REPO / "tests/launch_worker.py")


def start(tmp_path, mode, nproc=2, threads="1", **popen):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=threads)
    return subprocess.Popen([sys.executable, "-m", "megarlhf.launch", f"--nproc-per-node={nproc}",
                             WORKER, "--mode", mode, "--out", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def records(tmp_path, nproc=2):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_ranks_get_torchruns_environment_and_their_threads(tmp_path):
    rc, out = finish(start(tmp_path, "ok", nproc=3, threads="2"))
    assert rc == 0, out
    for r, rec in enumerate(records(tmp_path, 3)):
        assert (rec["rank"], rec["local_rank"], rec["world"], rec["sum"]) == (r, r, 3, 6.0)
        assert rec["threads"] == 2 and rec["name"] == "__main__"
        assert rec["argv"] == ["--mode", "ok", "--out", str(tmp_path)]


def test_an_exception_on_one_rank_fails_the_job_with_its_traceback(tmp_path):
    t0 = time.monotonic()
    rc, out = finish(start(tmp_path, "raise"))
    assert rc == 1 and "rank 1 failed" in out and "RuntimeError: rank 1 gives up" in out, out
    assert time.monotonic() - t0 < 2 * launch.GRACE_S + 60  # rank 0, stuck in a barrier, was stopped


def test_a_killed_rank_fails_the_job_and_is_named(tmp_path):
    rc, out = finish(start(tmp_path, "kill"))
    assert rc == 1 and "rank 1" in out and "SIGKILL" in out, out


def test_a_ranks_exit_code_is_the_jobs(tmp_path):
    rc, out = finish(start(tmp_path, "exit75"))
    assert rc == 75, out


@pytest.mark.parametrize("inherited_mask", [(), (signal.SIGUSR1,)], ids=["plain", "started_blocked"])
def test_signals_to_the_launcher_reach_every_rank(tmp_path, inherited_mask):
    """Also when whatever started the launcher had the signal blocked (a mask is inherited)."""
    proc = start(tmp_path, "signal",
                 preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, inherited_mask))
    ready = 0
    for line in proc.stdout:
        ready += line.count("ready")
        if ready == 2:
            break
    proc.send_signal(signal.SIGUSR1)
    rc, out = finish(proc)
    assert rc == 0, out
    assert [r["signal"] for r in records(tmp_path)] == [signal.SIGUSR1, signal.SIGUSR1]


def test_threads_default_to_the_cores_shared_between_ranks(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert (launch.default_threads(2), launch.default_threads(16)) == (4, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch.default_threads(2) == 3


def test_a_gpu_machine_starts_its_ranks_with_torchrun_and_they_train_alike(tmp_path):
    """Where forking is not safe (CUDA), the command's ranks run under torchrun: the same
    smoke job then gives the same losses as forked ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    runs = {}
    for name, safe in (("torchrun", False), ("forked", True)):
        args = ["smoke", "steps=2", f"out_dir={tmp_path / name}"]
        code = ("import sys; from megarlhf import cli, launch; "
                f"launch.forking_is_safe = lambda: {safe}; sys.exit(cli.main({args!r}))")
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-3000:]
        runs[name] = (out, [line.split("loss")[1].split()[0] for line in out.splitlines()
                            if line.lstrip().startswith("step") and "loss" in line])
    assert "(torchrun) on CPU" in runs["torchrun"][0] and "(local) on CPU" in runs["forked"][0]
    assert len(runs["forked"][1]) == 2 and runs["torchrun"][1] == runs["forked"][1]
