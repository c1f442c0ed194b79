# The cluster and NCCL environment of every megarlhf job, sourced by slurm/launch.sh and
# slurm/scaling_bench.sh: site settings go here.
export PYTHONUNBUFFERED=1                   # log lines reach the job's output as they happen
# CPUs per rank: the sbatch scripts ask for --cpus-per-task. Since Slurm 22.05 an srun inside
# the job does not inherit it unless SRUN_CPUS_PER_TASK says so, and each task gets one CPU,
# shared by NCCL's threads, data loading and the host side of decoding. Every srun of the job
# (the launcher's; the scaling benchmark's steps) reads it from here.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
# CPU threads per rank (OpenMP, torch's CPU ops): the rank's CPUs, not the OMP_NUM_THREADS of
# the submitting shell (sbatch passes that shell's environment to the job).
export OMP_NUM_THREADS=$SRUN_CPUS_PER_TASK
export CUDA_DEVICE_MAX_CONNECTIONS=1        # megatron: ordered TP/SP communication kernels
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1    # a failed collective ends the job, not hangs it
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# export NCCL_SOCKET_IFNAME=ib0             # the network between nodes, when not the default
# export NCCL_IB_HCA=mlx5                   # InfiniBand adapters, when not all of them
# export HF_HUB_OFFLINE=1                   # compute nodes without internet: hub datasets only
#                                           # from `megarlhf prepare-data`'s cache (docs/slurm.md)
# MASTER_ADDR defaults to the job's first node and MASTER_PORT to a port derived from the
# job id (megarlhf/parallel.py); export them here to choose others.
