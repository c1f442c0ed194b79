"""megatron DDP and optimizer around a model's chunks."""

from __future__ import annotations

import dataclasses
from typing import List

import torch

from megarlhf.parallel import ModelParallel

__all__ = ["OptimConfig", "wrap_ddp", "build_optimizer", "build_optimizer_elsewhere", "model_config_of"]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW as megatron-core runs it."""

    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decay schedule."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states over the data-parallel ranks (ZeRO-1)."""


def model_config_of(chunk: torch.nn.Module):
    from megatron.core.utils import get_model_config

    return get_model_config(chunk)


def wrap_ddp(chunks: List[torch.nn.Module], mp: ModelParallel,
             use_distributed_optimizer: bool = False) -> List[torch.nn.Module]:
    """Wrap each chunk in megatron's ``DistributedDataParallel`` (contiguous fp32 grad
    buffers, reduced over the data-parallel group)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=model_config_of(chunk), ddp_config=ddp_config, module=chunk,
            # Only the first chunk's buckets are used for overlap bookkeeping.
            disable_bucketing=i > 0, pg_collection=mp.pg_collection))
    return wrapped


def build_optimizer(ddp_chunks: List[torch.nn.Module], cfg: OptimConfig, mp: ModelParallel):
    """megatron's optimizer (fp32 master weights under bf16), wired into the model config so
    the schedules scale the loss and finalize gradients (DP all-reduce, SP norms, embeddings)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    tconfig = model_config_of(ddp_chunks[0])
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=tconfig.bf16,
        params_dtype=tconfig.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    # A layout built apart from megatron's globals (a PPO role) hands its groups over; the
    # global one lets megatron also set up its gloo groups.
    explicit = mp.ranks is not None
    optimizer = get_megatron_optimizer(ocfg, ddp_chunks, use_gloo_process_groups=not explicit,
                                       pg_collection=mp.pg_collection if explicit else None)
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.finalize_model_grads_func = finalize_model_grads
    fuse_torch_adam(optimizer)
    return optimizer


def fuse_torch_adam(optimizer) -> int:
    """Where megatron fell back to torch's Adam (no Transformer Engine or apex FusedAdam:
    CPU machines, bare GPU images), switch it to torch's fused kernel: one pass over each
    tensor instead of one kernel per operation per parameter (the default on CPU); the
    same update. Returns the parameter groups switched."""
    switched = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            if not group.get("fused") and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                                               for p in group["params"]):
                group["fused"], group["foreach"] = True, False
                switched += 1
    return switched


def build_optimizer_elsewhere() -> None:
    """What a rank that holds no part of a model does while that model's ranks run
    :func:`build_optimizer`: megatron aligns parameter groups over the whole job with an
    ``all_gather_object`` on the default group (one for the dense parameters, one for the
    expert parameters), which every rank must join."""
    import torch.distributed as dist

    for _ in range(2):
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [])
