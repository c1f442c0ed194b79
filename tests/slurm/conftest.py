"""A real SLURM cluster on this machine (tools/local_slurm.sh, two fake nodes) for the
sbatch tests, and the tiny checkpoints the tiny PPO job starts from.

Where the cluster cannot be started (not root, no apt-get, not Linux...) the tests that
need it are skipped with the reason, except under ``CI=true``: there a skip would hide
that the sbatch path never ran, so it is a failure."""

import os
import subprocess

import pytest

from tests.conftest import REPO
from tests.recipes.conftest import sft_like  # noqa: F401  (the tiny SFT checkpoint + task files)

SLURM_DIR = os.environ.get("MEGARLHF_SLURM_DIR", "/tmp/megarlhf-slurm")
SCRIPT = REPO / "tools" / "local_slurm.sh"


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the SLURM tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_env():
    """The environment for sbatch/scancel against the local cluster (started for the session
    and stopped after it; left alone if it was already running)."""
    env = dict(os.environ, MEGARLHF_SLURM_DIR=SLURM_DIR)
    try:
        res = subprocess.run([str(SCRIPT), "start", "--nodes", "2"], env=env, capture_output=True,
                             text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        unavailable(f"cannot run tools/local_slurm.sh: {e}")
    if res.returncode != 0:
        tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-3:]
        unavailable("no local SLURM cluster: " + " | ".join(tail))
    started = "already running" not in res.stdout
    # The job environment: what the submitter has, minus any enclosing SLURM job's variables.
    job_env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    job_env.update(SLURM_CONF=os.path.join(SLURM_DIR, "slurm.conf"), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO))
    yield job_env
    if started:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
