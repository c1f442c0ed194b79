"""megarlhf.train.preemption: a signal only sets a flag, every rank stops after the same
step, SIGTERM never requeues, and the requeue decision guards against loops."""

import json
import os
import signal
import subprocess
import sys

import pytest

from megarlhf.config import ConfigError
from megarlhf.train.preemption import STOPPED_EXIT, Preemption, PreemptionConfig, requeue_decision
from tests.conftest import REPO


def test_signal_sets_a_flag_and_the_handlers_come_off():
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    p = Preemption(PreemptionConfig())
    try:
        assert not p.should_stop() and p.reason is None
        os.kill(os.getpid(), signal.SIGUSR1)  # the process survives: only a flag is set
        assert p.received == "SIGUSR1"
        assert p.should_stop() and p.reason == "requeue"
    finally:
        p.uninstall()
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_wins_over_a_requeue_request():
    p = Preemption(PreemptionConfig())
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.should_stop() and p.reason == "sigterm"
    finally:
        p.uninstall()


def test_other_signal_and_no_sigterm_handler():
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    p = Preemption(PreemptionConfig(signal="USR2", on_sigterm=False))
    try:
        assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before
        os.kill(os.getpid(), signal.SIGUSR2)
        assert p.should_stop() and p.received == "SIGUSR2" and p.reason == "requeue"
    finally:
        p.uninstall()


@pytest.mark.parametrize("value", ["SIGKILL", "TERM", "bogus"])
def test_bad_signal_names_the_key(value):
    with pytest.raises(ConfigError, match=f"train.preemption.signal={value!r}"):
        Preemption(PreemptionConfig(signal=value))


SLURM = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "0"}


@pytest.mark.parametrize("reason,cfg,environ,requeue,why", [
    ("requeue", PreemptionConfig(), SLURM, True, "requeueing SLURM job 42 (restart 1 of at most 20)"),
    ("requeue", PreemptionConfig(), {**SLURM, "SLURM_RESTART_COUNT": "3"}, True, "restart 4 of"),
    ("requeue", PreemptionConfig(max_requeues=3), {**SLURM, "SLURM_RESTART_COUNT": "3"}, False,
     "restarted 3 times (train.preemption.max_requeues=3)"),
    ("requeue", PreemptionConfig(requeue=False), SLURM, False, "train.preemption.requeue=false"),
    ("requeue", PreemptionConfig(), {}, False, "not a SLURM job"),
    ("sigterm", PreemptionConfig(), SLURM, False, "SIGTERM"),
])
def test_requeue_decision(reason, cfg, environ, requeue, why):
    got, text = requeue_decision(reason, cfg, environ)
    assert got is requeue and why in text


def test_every_rank_stops_after_the_same_step(tmp_path):
    """Two gloo processes; one of them gets the signal: both stop after that step (SIGTERM
    agreed as such), and leave with the stopped status (no SLURM here: no requeue)."""
    from tests.train.preemption_worker import SCENARIOS

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests/train/preemption_worker.py"), "--out", str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    by_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for i, (rank, name, at) in enumerate(SCENARIOS):
        for r in (0, 1):
            got = by_rank[r][i]
            assert got["stopped"] == at, (i, r, got)
            assert got["reason"] == ("sigterm" if name == "SIGTERM" else "requeue"), (i, r, got)
            assert got["received"] == (name if r == rank else None), (i, r, got)  # the other followed
    assert by_rank[0][-1]["exit"] == by_rank[1][-1]["exit"] == STOPPED_EXIT
    assert "SIGTERM: stopping without requeue" in res.stdout
