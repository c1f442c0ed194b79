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

# -- cluster and NCCL environment: site settings go here --------------------------------
export PYTHONUNBUFFERED=1                   # log lines reach the job's output as they happen
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}  # CPU threads per rank
export CUDA_DEVICE_MAX_CONNECTIONS=1        # megatron: ordered TP/SP communication kernels
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1    # a failed collective ends the job, not hangs it
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# export NCCL_SOCKET_IFNAME=ib0             # the network between nodes, when not the default
# export NCCL_IB_HCA=mlx5                   # InfiniBand adapters, when not all of them
# MASTER_ADDR defaults to the job's first node and MASTER_PORT to a port derived from the
# job id (megarlhf/parallel.py); export them here to choose others.

echo "megarlhf: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}," \
     "${SLURM_NTASKS} tasks: megarlhf ${recipe} --config ${default_config} $*"

# One task per GPU (--ntasks-per-node of the sbatch script); --kill-on-bad-exit ends every
# rank as soon as one fails, instead of leaving the others waiting in a collective.
exec srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
    "$python" -m megarlhf.cli "$recipe" --config "$default_config" "$@"
