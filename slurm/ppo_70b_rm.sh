#!/usr/bin/env bash
# PPO, the flagship layout: a 13B policy, its reference and a 13B critic on 2 nodes (TP=8,
# DP=2; Transformer Engine layers, FP8) and a 70B reward model on a third (TP=2, DP=4; TE
# layers, bf16): one job of 24 GPUs. The memory calculation behind it: docs/slurm.md; the
# layout is the planner's best on 3 nodes (python tools/plan.py --policy llama2-13b
# --reward llama2-70b --nodes 3 --attention fused --fp8 actor,reference,critic).
#
#   sbatch [sbatch options] slurm/ppo_70b_rm.sh [--config FILE] [key=value ...]
#
# Arguments after the script go to `megarlhf ppo`; without --config it runs
# examples/ppo_13b_70b_rm.yaml. Submit from the repository (or set MEGARLHF_HOME to it), with
# MEGARLHF_PYTHON naming the environment's interpreter. On a GPU-less test cluster, override
# the request: sbatch --gpus-per-node=0 --cpus-per-task=1 --nodes=... --ntasks-per-node=...
#   slurm/ppo_70b_rm.sh ...
# SIGUSR1 comes 900 s before the time limit: the job saves a checkpoint at the end of the
# current step, requeues itself and resumes from that checkpoint.
#SBATCH --job-name=megarlhf-ppo
#SBATCH --nodes=3
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
exec "${MEGARLHF_HOME:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" ppo examples/ppo_13b_70b_rm.yaml "$@"
