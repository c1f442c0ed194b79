#!/usr/bin/env bash
# A 70B reward model (Bradley-Terry) on 4 nodes: TP=8 x PP=4, DP=1 (docs/slurm.md).
#
#   sbatch [sbatch options] slurm/rm_70b.sh [--config FILE] [key=value ...]
#
# Arguments after the script go to `megarlhf rm`; without --config it runs
# examples/rm_70b.yaml. Submit from the repository (or set MEGARLHF_HOME to it), with
# MEGARLHF_PYTHON naming the environment's interpreter. On a GPU-less test cluster, override
# the request: sbatch --gpus-per-node=0 --cpus-per-task=1 --nodes=... --ntasks-per-node=...
#   slurm/rm_70b.sh ...
# SIGUSR1 comes 900 s before the time limit: the job saves a checkpoint at the end of the
# current step, requeues itself and resumes from that checkpoint.
#SBATCH --job-name=megarlhf-rm
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
# CPUs per task (one task per GPU): 12 x 8 = 96 of a node's CPUs, for each rank's NCCL
# threads, data loading and the host side of decoding. Where nodes have more CPUs per GPU,
# ask for more (sbatch --cpus-per-task=N, or this line); slurm/env.sh hands the number on
# to srun (SRUN_CPUS_PER_TASK) and to each rank's threads (OMP_NUM_THREADS).
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
exec "${MEGARLHF_HOME:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" rm examples/rm_70b.yaml "$@"
