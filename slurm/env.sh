# The cluster and NCCL environment of every megarlhf job, sourced by slurm/launch.sh and
# slurm/scaling_bench.sh: site settings go here.
export PYTHONUNBUFFERED=1                   # log lines reach the job's output as they happen
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}  # CPU threads per rank
export CUDA_DEVICE_MAX_CONNECTIONS=1        # megatron: ordered TP/SP communication kernels
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1    # a failed collective ends the job, not hangs it
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# export NCCL_SOCKET_IFNAME=ib0             # the network between nodes, when not the default
# export NCCL_IB_HCA=mlx5                   # InfiniBand adapters, when not all of them
# MASTER_ADDR defaults to the job's first node and MASTER_PORT to a port derived from the
# job id (megarlhf/parallel.py); export them here to choose others.
