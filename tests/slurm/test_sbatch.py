"""The flagship sbatch script, unchanged, on a real SLURM cluster of two fake nodes: the tiny
PPO config (4 ranks: the policy on the first node, the reward model on the second) runs
to the end; a SIGUSR1 sent to the job makes it checkpoint, requeue itself and finish from
that checkpoint with the same steps and numbers as the uninterrupted job; a job that fails
is not requeued. Every sbatch script gives each task of its job step the CPUs it asks for."""

import json
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

STEPS = 4
PROMPTS = 8
COMPARED = ["score_mean", "kl", "policy_loss", "value_loss", "entropy", "approx_kl",
            "explained_variance", "response_length", "eos_rate", "ratio_mean", "kl_coef"]


@pytest.fixture(scope="module")
def tiny_args(sft_like, mg_reward):
    """Arguments after the script: the tiny PPO config on 4 ranks, partitioned like the
    flagship (reward model on its own ranks: the second node)."""
    ckpt, files = sft_like
    return ["--config", "examples/tiny/ppo.yaml", "world=4", "placement=partitioned", "reward_ranks=2",
            f"actor.init_from={ckpt}", f"critic.init_from={mg_reward}", f"reward.init_from={mg_reward}",
            f"data.sources=[{{path: {files['prompts']}}}]", f"rollout.prompts_per_step={PROMPTS}",
            "rollout.max_new_tokens=8", "rollout.temperature=1.0", "ppo.minibatch_size=4",
            "train.micro_batch_size=2", "train.actor_lr=1e-3", "train.critic_lr=1e-3",
            "train.schedule.warmup_steps=1", f"train.max_steps={STEPS}", "eval.prompts=null",
            "log.progress_bar=false"]


def sbatch_cmd(log, *args):
    """sbatch of slurm/ppo_70b_rm.sh as a user of a GPU-less cluster would: the GPU request,
    the CPUs per task and the node shape overridden on the command line (the fake nodes have
    2 CPUs each), nothing in the script changed."""
    return ["sbatch", "--wait", "--parsable", "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1",
            "--gpus-per-node=0", f"--output={log}", "--job-name=megarlhf-test",
            "slurm/ppo_70b_rm.sh", *map(str, args)]


def job_env(slurm_env):
    return dict(slurm_env, MEGARLHF_PYTHON=sys.executable)


def step_rows(out_dir):
    return [json.loads(line) for line in open(out_dir / "metrics.jsonl") if '"score_mean"' in line]


def train_state(ckpt):
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(ckpt))["train"]


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, tiny_args, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sbatch")
    out, log = tmp / "run", tmp / "job.out"
    t0 = time.time()
    res = subprocess.run(sbatch_cmd(log, *tiny_args, f"train.out_dir={out}"), cwd=REPO,
                         env=job_env(slurm_env), capture_output=True, text=True, timeout=600)
    text = log.read_text() if log.exists() else ""
    return res, text, out, time.time() - t0


def test_flagship_script_runs_the_tiny_config_on_two_nodes(uninterrupted):
    res, log, out, secs = uninterrupted
    assert res.returncode == 0, (res.stderr + log)[-6000:]
    assert "on megarlhf-node[1-2], 4 tasks of 1 CPU(s): megarlhf ppo" in log  # the script's own launch line
    assert "megarlhf ppo: 4 process(es)" in log and "placement partitioned" in log
    assert "on ranks 0-1" in log  # the policy roles; the reward model holds ranks 2-3
    assert [r["step"] for r in step_rows(out)] == list(range(1, STEPS + 1))
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{STEPS:07d}"
    state = train_state(out / "checkpoints" / latest)
    assert state["step"] == STEPS and state["consumed_samples"] == STEPS * PROMPTS
    assert (out / "final" / "megarlhf.json").is_file()
    print(f"uninterrupted job: {secs:.0f} s")


def test_signal_checkpoints_requeues_and_resumes(slurm_env, tiny_args, uninterrupted, tmp_path):
    """``scancel --signal=USR1`` (what ``#SBATCH --signal=USR1@...`` does before the time
    limit) reaches every task; the job saves, requeues itself and the second run resumes."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    env = job_env(slurm_env)
    t0 = time.time()
    proc = subprocess.Popen(sbatch_cmd(log, *tiny_args, f"train.out_dir={out}"), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = proc.stdout.readline().strip().split(";")[0]
        assert job.isdigit(), proc.stderr.read()
        # Rank 0 prints this after every rank has joined the process group, i.e. after each
        # has its signal handlers: the signal then lands before the first step ends.
        deadline = time.time() + 300
        while "megarlhf ppo: 4 process(es)" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        sig = subprocess.run(["scancel", "--signal=USR1", job], env=env, capture_output=True, text=True)
        assert sig.returncode == 0, sig.stderr
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            subprocess.run(["scancel", job], env=env)
            proc.kill()
    text = log.read_text()
    secs = time.time() - t0
    assert code == 0, text[-6000:]
    m = re.search(r"stopped after step (\d+) \(SIGUSR1\); saved (\S+); requeueing SLURM job "
                  + job + r" \(restart 1 of", text)
    assert m, text[-6000:]
    k, saved = int(m.group(1)), m.group(2)
    assert 1 <= k < STEPS and saved == str(out / "checkpoints" / f"step_{k:07d}")
    assert f"job {job} (restart 1)" in text and "(restart 2)" not in text  # requeued once
    assert f"resumed from {saved} at step {k} ({k * PROMPTS} prompts consumed)" in text
    # Nothing lost, nothing done twice, and the same numbers as the job that never stopped.
    rows, ref = step_rows(out), step_rows(uninterrupted[2])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for a, b in zip(ref, rows):
        for key in COMPARED:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    state = train_state(out / "checkpoints" / f"step_{STEPS:07d}")
    assert state["step"] == STEPS and state["consumed_samples"] == STEPS * PROMPTS
    print(f"preempted job, requeue included: {secs:.0f} s")


def test_a_failing_job_is_not_requeued(slurm_env, tiny_args, tmp_path):
    """A real error (here: the config's world size does not match the job's 4 tasks) fails
    the job once; --requeue in the script does not bring it back."""
    log = tmp_path / "job.out"
    res = subprocess.run(sbatch_cmd(log, *tiny_args, "world=2", "reward_ranks=1",
                                    f"train.out_dir={tmp_path / 'run'}"),
                         cwd=REPO, env=job_env(slurm_env), capture_output=True, text=True, timeout=600)
    text = log.read_text()
    assert res.returncode != 0, text[-4000:]
    assert "world=2 but the job has 4 processes (slurm): set world=4" in text
    assert "(restart 1)" not in text and not (tmp_path / "run" / "checkpoints").exists()


SCRIPTS = ["sft.sh", "dpo_13b.sh", "rm_70b.sh", "ppo_70b_rm.sh", "scaling_bench.sh"]

# Stands in for the job's interpreter (MEGARLHF_PYTHON): prints what a task of a job step
# sees. The scaling benchmark runs its driver in the batch step, which starts the layouts'
# srun steps: there the probe starts a step with a bare srun, which has only the job's
# environment (SRUN_CPUS_PER_TASK) to take its CPUs per task from.
PROBE = """#!/usr/bin/env bash
if [[ -z ${SLURM_STEP_ID:-} ]]; then exec srun "$0" "$@"; fi
echo "probe rank=$SLURM_PROCID cpus_per_task=${SLURM_CPUS_PER_TASK:-} srun=${SRUN_CPUS_PER_TASK:-}" \\
     "omp=${OMP_NUM_THREADS:-} on_node=${SLURM_CPUS_ON_NODE:-}"
"""


def test_every_script_gives_each_task_the_cpus_it_asks_for(slurm_env, tmp_path):
    """Each script asks for --cpus-per-task (an srun step gives one CPU per task otherwise);
    every task of the job step then has that many CPUs and sees the count as
    SLURM_CPUS_PER_TASK, as SRUN_CPUS_PER_TASK (what an srun inside the job inherits since
    Slurm 22.05) and as OMP_NUM_THREADS, not the submitting shell's OMP_NUM_THREADS=1. The
    fake nodes have 2 CPUs: the request is overridden to 2, one task per node."""
    probe = tmp_path / "python"
    probe.write_text(PROBE)
    probe.chmod(0o755)
    env = dict(slurm_env, MEGARLHF_PYTHON=str(probe), OMP_NUM_THREADS="1")
    jobs = {}
    for name in SCRIPTS:
        text = (REPO / "slurm" / name).read_text()
        asked = re.findall(r"^#SBATCH --cpus-per-task=(\d+)$", text, flags=re.M)
        assert len(asked) == 1 and int(asked[0]) > 1, f"slurm/{name} must ask for --cpus-per-task"
        log = tmp_path / f"{name}.out"
        cmd = ["sbatch", "--wait", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2",
               "--gpus-per-node=0", f"--output={log}", f"slurm/{name}"]
        jobs[name] = log, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
    for name, (log, proc) in jobs.items():
        _, err = proc.communicate(timeout=300)
        text = log.read_text() if log.exists() else ""
        assert proc.returncode == 0, (name, err, text[-3000:])
        seen = [dict(kv.split("=", 1) for kv in line.split()[1:])
                for line in re.findall(r"^probe .*$", text, flags=re.M)]
        assert sorted(t["rank"] for t in seen) == ["0", "1"], (name, text[-3000:])
        for task in seen:
            assert task == dict(task, cpus_per_task="2", srun="2", omp="2", on_node="2"), (name, task)
