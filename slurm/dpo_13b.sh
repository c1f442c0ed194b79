#!/usr/bin/env bash
# DPO of a 13B policy on 2 nodes: TP=8, DP=2 (docs/slurm.md).
#
#   sbatch [sbatch options] slurm/dpo_13b.sh [--config FILE] [key=value ...]
#
# Arguments after the script go to `megarlhf dpo`; without --config it runs
# examples/dpo_13b.yaml. Submit from the repository (or set MEGARLHF_HOME to it), with
# MEGARLHF_PYTHON naming the environment's interpreter. On a GPU-less test cluster, override
# the request: sbatch --gpus-per-node=0 --cpus-per-task=1 --nodes=... --ntasks-per-node=...
#   slurm/dpo_13b.sh ...
# SIGUSR1 comes 600 s before the time limit: the job saves a checkpoint at the end of the
# current step, requeues itself and resumes from that checkpoint.
#SBATCH --job-name=megarlhf-dpo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
# CPUs per task (one task per GPU): 12 x 8 = 96 of a node's CPUs, for each rank's NCCL
# threads, data loading and the host side of decoding. Where nodes have more CPUs per GPU,
# ask for more (sbatch --cpus-per-task=N, or this line); slurm/env.sh hands the number on
# to srun (SRUN_CPUS_PER_TASK) and to each rank's threads (OMP_NUM_THREADS).
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
exec "${MEGARLHF_HOME:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" dpo examples/dpo_13b.yaml "$@"
