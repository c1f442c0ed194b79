#!/usr/bin/env bash
# Scaling benchmark of a real preset on 2 nodes of 8 GPUs (docs/performance.md): the
# driver runs once, on the first node, and starts each layout as an srun step inside this
# allocation (one task per GPU, rank 0 on the first node); results go to --out.
#
#   sbatch [sbatch options] slurm/scaling_bench.sh [tools/benchmark_scaling.py options]
#
# Options after the script go to tools/benchmark_scaling.py and win over the defaults
# below (the last occurrence of an option counts), e.g.
#   sbatch slurm/scaling_bench.sh --preset llama2-13b --phase dpo --layouts tp8dp1,tp8dp2
#   sbatch --nodes=4 slurm/scaling_bench.sh --layouts tp8dp1,tp8dp2,tp8dp4
# A layout needs TP x PP x DP <= nodes x 8 tasks. Submit from the repository (or set
# MEGARLHF_HOME to it), with MEGARLHF_PYTHON naming the environment's interpreter; --out
# must be on a filesystem every node sees (ranks write their peak memory there).
# On a GPU-less test cluster, override the request: sbatch --gpus-per-node=0 --cpus-per-task=1 ...
#SBATCH --job-name=megarlhf-scaling
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
# CPUs per task (one task per GPU): 12 x 8 = 96 of a node's CPUs, for each rank's NCCL
# threads, data loading and the host side of decoding. Where nodes have more CPUs per GPU,
# ask for more (sbatch --cpus-per-task=N, or this line); slurm/env.sh hands the number on
# to srun (SRUN_CPUS_PER_TASK) and to each rank's threads (OMP_NUM_THREADS).
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=2:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

home=${MEGARLHF_HOME:-$SLURM_SUBMIT_DIR}
python=${MEGARLHF_PYTHON:-python3}

source "$home/slurm/env.sh"              # the job environment (site settings go there)

echo "megarlhf: job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}: tools/benchmark_scaling.py $*"

# Defaults: Llama 2 7B SFT steps in bf16, TP=8 within a node, then DP over nodes (weak
# scaling: 8 rows of 4,096 tokens per replica), and TP=4 x PP=2 beside it. MFU is stated
# against a bf16 GEMM probe of n=8192 measured in the same job (n=2048 underfills an H100);
# pass --peak-tflops to use a datasheet figure instead.
exec "$python" "$home/tools/benchmark_scaling.py" --launcher srun \
    --preset llama2-7b --dtype bfloat16 --phase sft \
    --layouts tp8pp1dp1,tp8pp1dp2,tp4pp2dp1,tp4pp2dp2 \
    --seq-len 4096 --micro-batch 1 --batch-per-replica 8 --steps 10 --warmup 3 \
    --probe-n 8192 --threads "$OMP_NUM_THREADS" \
    --out "runs/scaling/${SLURM_JOB_ID}" "$@"
