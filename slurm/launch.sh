#!/usr/bin/env bash
# The launcher every slurm/*.sh script calls: the cluster and NCCL environment of megarlhf
# jobs in one place, then srun with one task per GPU. Each task reads its rank, the world
# size and the master node from SLURM's environment (megarlhf/parallel.py): no torchrun.
#
#   launch.sh RECIPE DEFAULT_CONFIG [--config FILE] [key=value ...]
#
# DEFAULT_CONFIG (a path inside this repository) is passed first; a --config among the
# arguments replaces it (megarlhf's command line keeps the last --config given).
set -euo pipefail

recipe=$1
default_config=$(dirname "$(dirname "$(readlink -f "$0")")")/$2
shift 2

# -- which Python -----------------------------------------------------------------------
# Jobs inherit the submitter's PATH. Point MEGARLHF_PYTHON at the interpreter of the
# environment megarlhf is installed in, e.g. MEGARLHF_PYTHON=$PWD/.venv/bin/python.
python=${MEGARLHF_PYTHON:-python3}

# -- cluster and NCCL environment (site settings: slurm/env.sh) -------------------------
source "$(dirname "$(readlink -f "$0")")/env.sh"

echo "megarlhf: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}," \
     "${SLURM_NTASKS} tasks of ${SRUN_CPUS_PER_TASK} CPU(s):" \
     "megarlhf ${recipe} --config ${default_config} $*"

# One task per GPU (--ntasks-per-node of the sbatch script), each with the job's CPUs per
# task (env.sh); --kill-on-bad-exit ends every rank as soon as one fails, instead of leaving
# the others waiting in a collective.
exec srun --kill-on-bad-exit=1 --cpus-per-task="$SRUN_CPUS_PER_TASK" \
    "$python" -m megarlhf.cli "$recipe" --config "$default_config" "$@"
