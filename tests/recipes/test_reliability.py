"""Faults injected into real `megarlhf rm` runs (MEGARLHF_FAULTS): non-finite steps are
skipped and counted, K in a row halt the run after a checkpoint, a killed rank ends the
job at once and it resumes bit-exactly, a hung rank hits the collective timeout, a kill
during a checkpoint write leaves the previous one in place, and a damaged checkpoint is
refused by name with the previous one offered."""

import json
import time

import pytest

from tests.conftest import megarlhf
from tests.recipes.test_pairwise import assert_same_final_weights, common


def run(*args, faults="", env_extra=None, timeout=600):
    t0 = time.time()
    res = megarlhf(*args, env_extra={"MEGARLHF_FAULTS": faults, **(env_extra or {})}, timeout=timeout)
    return res.returncode, res.stdout + res.stderr, time.time() - t0


def ok(*args, **kw):
    rc, out, _ = run(*args, **kw)
    assert rc == 0, out[-5000:]
    return out


def rm_args(sft_like, out, *extra):
    ckpt, files = sft_like
    return [*common("rm", ckpt, files, out), *extra]


def latest(out):
    return (out / "checkpoints" / "latest").read_text().strip()


def rows(out):
    return [json.loads(l) for l in open(out / "metrics.jsonl") if '"grad_norm"' in l]


CONSTANT_LR = ["train.schedule.style=constant", "train.schedule.warmup_ratio=0"]


@pytest.fixture(scope="module")
def four_clean_steps(sft_like, tmp_path_factory):
    """The reference every poisoned run is compared with (one run for all faults)."""
    clean = tmp_path_factory.mktemp("clean")
    ok(*rm_args(sft_like, clean, "train.max_steps=4", *CONSTANT_LR))
    return clean


@pytest.mark.parametrize("fault", ["nan_grad", "inf_grad", "nan_loss"])
def test_a_non_finite_step_is_skipped_and_changes_nothing(sft_like, four_clean_steps, tmp_path, fault):
    """Five steps whose last one is poisoned end with the weights of four clean steps."""
    clean, poisoned = four_clean_steps, tmp_path / "poisoned"
    ok(*rm_args(sft_like, poisoned, "train.max_steps=5", *CONSTANT_LR), faults=f"{fault}@train_step=5")
    last = rows(poisoned)[-1]
    assert last["step"] == 5 and last["skipped_steps"] == 1 and last["grad_norm"] != last["grad_norm"]
    assert all("skipped_steps" not in r for r in rows(poisoned)[:-1])
    assert_same_final_weights(clean, poisoned)


def test_k_bad_steps_in_a_row_halt_after_saving_and_the_run_resumes(sft_like, tmp_path):
    out = tmp_path / "run"
    args = rm_args(sft_like, out, "train.max_steps=7", "train.max_bad_steps=3", "train.resume=auto")
    rc, log, _ = run(*args, faults="nan_grad@train_step=2-20")
    assert rc == 1, log[-3000:]
    assert "halted after step 4: 3 updates in a row had a non-finite loss or gradient (steps 2-4; " \
           "train.max_bad_steps=3)" in log
    assert "Traceback" not in log
    assert latest(out) == "step_0000004" and not (out / "final").exists()
    log = ok(*args)  # the cause is gone: resume from the saved state
    assert f"resumed from {out / 'checkpoints' / 'step_0000004'}" in log
    assert (out / "final").exists()


def test_sigkill_of_one_rank_fails_fast_and_the_job_resumes_bit_exactly(sft_like, tmp_path):
    dp2 = ["world=2", "train.micro_batch_size=2", "train.max_steps=6", "train.save_interval=2",
           "train.resume=auto"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    ok(*rm_args(sft_like, full, *dp2))
    rc, log, secs = run(*rm_args(sft_like, killed, *dp2), faults="kill@train_step=5:rank=1")
    assert rc != 0, log[-3000:]
    assert "SIGKILL at train_step 5 on rank 1" in log
    assert secs < 150, f"the job took {secs:.0f} s to fail (collective timeout is 1800 s)"
    assert latest(killed) == "step_0000004" and not (killed / "final").exists()
    log = ok(*rm_args(sft_like, killed, *dp2))
    assert f"resumed from {killed / 'checkpoints' / 'step_0000004'}" in log
    assert_same_final_weights(full, killed)


def test_a_hung_rank_ends_the_job_at_the_collective_timeout(sft_like, tmp_path):
    args = rm_args(sft_like, tmp_path / "run", "world=2", "train.micro_batch_size=2")
    rc, log, secs = run(*args, faults="hang@train_step=2:rank=1",
                        env_extra={"MEGARLHF_COLLECTIVE_TIMEOUT_S": "5"})
    assert rc != 0, log[-3000:]
    assert "SIGSTOP at train_step 2 on rank 1" in log
    assert secs < 240, f"{secs:.0f} s"


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(sft_like, tmp_path):
    out = tmp_path / "run"
    args = rm_args(sft_like, out, "train.max_steps=6", "train.save_interval=2", "train.resume=auto")
    rc, log, _ = run(*args, faults="kill@save=2")
    assert rc != 0 and "SIGKILL at save 2" in log, log[-3000:]
    assert latest(out) == "step_0000002"
    assert (out / "checkpoints" / "step_0000004.tmp").is_dir()  # the torn one, never renamed
    assert not (out / "checkpoints" / "step_0000004").exists()
    log = ok(*args)
    assert f"resumed from {out / 'checkpoints' / 'step_0000002'}" in log
    assert latest(out) == "step_0000006"
    assert not (out / "checkpoints" / "step_0000004.tmp").exists()


def test_a_corrupted_checkpoint_is_refused_by_name_and_the_previous_one_loads(sft_like, tmp_path):
    out = tmp_path / "run"
    ok(*rm_args(sft_like, out, "train.max_steps=4", "train.save_interval=2"))
    ckpts = out / "checkpoints"
    assert latest(out) == "step_0000004"
    victim = sorted((ckpts / "step_0000004").glob("*.distcp"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    victim.write_bytes(bytes(data))
    more = ["train.max_steps=6", "train.save_interval=2"]
    rc, log, _ = run(*rm_args(sft_like, out, *more, "train.resume=auto"))
    assert rc == 1, log[-3000:]
    assert f"{victim.name}: SHA-256 differs from the one written (corrupted)" in log
    assert f"train.resume={ckpts / 'step_0000002'}" in log
    assert "Traceback" not in log
    log = ok(*rm_args(sft_like, out, *more, f"train.resume={ckpts / 'step_0000002'}"))
    assert f"resumed from {ckpts / 'step_0000002'}" in log


def test_ppo_partitioned_halts_on_every_rank_and_resumes(sft_like, mg_reward, tmp_path):
    """NaN gradients on one policy rank: both TP ranks of each trainable role skip, the reward
    model's own rank joins the agreed halt and the checkpoint, and the run resumes."""
    from tests.recipes.test_ppo import POLICY_TP2, ppo_args

    args = ppo_args(sft_like, mg_reward, tmp_path, "world=3", "placement=partitioned", "reward_ranks=1",
                    *POLICY_TP2, "train.max_steps=2", "train.max_bad_steps=3")
    rc, log, _ = run(*args, faults="nan_grad@train_step=1-100:rank=0")
    assert rc == 1, log[-3000:]
    assert "halted after step 1: 3 actor updates in a row had a non-finite loss or gradient" in log
    step1 = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"score_mean"' in l][-1]
    assert step1["skipped_updates/actor"] == 4 and step1["skipped_updates/critic"] == 4
    assert latest(tmp_path) == "step_0000001"
    log = ok(*args)
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_0000001'}" in log
