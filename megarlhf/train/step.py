"""One optimizer step, or a forward-only pass, through megatron's pipeline schedules.

A recipe supplies a megatron ``forward_step_func(data_iterator, model) -> (output,
loss_fn)``; the schedule runs it over the microbatches on every pipeline stage, so TP,
PP and virtual PP all work the same way.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.distributed as dist

from megarlhf.parallel import ModelParallel
from megarlhf.train import faults

__all__ = ["train_step", "forward_only", "all_finite", "reduce_stats"]


def _iterators(microbatches: Sequence[Any], n_chunks: int):
    if n_chunks == 1:
        return iter(microbatches)
    return [iter(microbatches) for _ in range(n_chunks)]


def _schedule(mp: ModelParallel, chunks: List[torch.nn.Module]):
    """megatron's schedule for this layout, bound to the layout's own process groups."""
    import functools

    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    fn = get_forward_backward_func(pp_size=mp.config.pp,
                                   vp_size=mp.config.virtual_pipeline_model_parallel_size)
    kwargs: Dict[str, Any] = {"pg_collection": mp.pg_collection}
    if mp.config.pp > 1:
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=mp.pp_group,
                                                     config=get_model_config(chunks[0]))
    return functools.partial(fn, **kwargs)


def train_step(ddp_chunks: List[torch.nn.Module], optimizer, mp: ModelParallel,
               forward_step_func: Callable, microbatches: Sequence[Any], seq_length: int,
               micro_batch_size: int) -> Dict[str, Any]:
    """Forward + backward over ``microbatches`` (one global batch on this DP rank), then
    one optimizer step. Returns the per-microbatch loss dicts (last stage only), the
    gradient norm and whether the step was applied."""
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = _schedule(mp, ddp_chunks)(
        forward_step_func=forward_step_func,
        data_iterator=_iterators(microbatches, len(ddp_chunks)),
        model=ddp_chunks,
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    _inject(faults.at("train_step"), ddp_chunks, outputs)
    if not all_finite(ddp_chunks, outputs, mp):
        # A NaN/Inf loss or gradient on any rank of the model: every rank skips the update
        # (weights, Adam moments and step count stay as they were). The caller counts it.
        for chunk in ddp_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        return {"outputs": outputs, "grad_norm": float("nan"), "applied": False, "skipped": True}
    applied, grad_norm, _ = optimizer.step()
    return {"outputs": outputs, "grad_norm": grad_norm, "applied": applied, "skipped": False}


def _grad_buffers(ddp_chunks):
    for chunk in ddp_chunks:
        for buf in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            yield buf.grad_data


def _output_tensors(outputs):
    for out in outputs or []:
        values = out.values() if isinstance(out, dict) else [out]
        for v in values:
            if torch.is_tensor(v) and v.is_floating_point():
                yield v


def all_finite(ddp_chunks: List[torch.nn.Module], outputs: Sequence[Any], mp: ModelParallel) -> bool:
    """Whether this step's losses (the last stage's loss outputs) and gradients are finite on
    every rank of the model: one flag, MAX-reduced over its TP, PP and DP groups, so all
    ranks take the same decision.

    One sum per gradient buffer, no copy of it and one host sync in all: a sum is NaN or Inf
    exactly when an element is (or when finite gradients overflow fp32, which only absurd
    ones do, and such a step is worth skipping too)."""
    sums = [g.float().sum() for g in _grad_buffers(ddp_chunks)]
    sums += [v.float().sum() for v in _output_tensors(outputs)]
    if sums:
        flag = (~torch.isfinite(torch.stack(sums))).any().float().reshape(1)
    else:
        flag = torch.zeros(1)
    for group in (mp.tp_group, mp.pp_group, mp.dp_group):
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    return float(flag.item()) == 0.0


def _inject(actions: List[str], ddp_chunks, outputs) -> None:
    """Carry out injected numerical faults (megarlhf.train.faults)."""
    for action in actions:
        value = float("nan") if action in ("nan_grad", "nan_loss") else float("inf")
        if action in ("nan_grad", "inf_grad"):
            for g in _grad_buffers(ddp_chunks):
                g.view(-1)[0] = value
        elif action == "nan_loss":
            for v in _output_tensors(outputs):
                v.fill_(value)


@torch.no_grad()
def forward_only(chunks: List[torch.nn.Module], mp: ModelParallel, forward_step_func: Callable,
                 microbatches: Sequence[Any], seq_length: int, micro_batch_size: int) -> List[Any]:
    """Run the forward pass only; returns whatever each microbatch's ``loss_fn`` returns
    (on the last pipeline stage; an empty list elsewhere). Each chunk is back in the mode
    it was in (a frozen role stays in eval mode)."""
    modes = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        return _schedule(mp, chunks)(
            forward_step_func=forward_step_func,
            data_iterator=_iterators(microbatches, len(chunks)),
            model=list(chunks),
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
            collect_non_loss_data=True,
        )
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)


def reduce_stats(outputs: List[Dict[str, torch.Tensor]], mp: ModelParallel, device) -> torch.Tensor:
    """Sum each microbatch's ``stats`` vector, then over pipeline stages (only the last holds
    them) and data-parallel replicas; the same result on every rank."""
    total = None
    for o in outputs:
        total = o["stats"].double() if total is None else total + o["stats"].double()
    n = _stats_len(outputs, mp, device)
    if total is None:
        total = torch.zeros(n, dtype=torch.float64, device=device)
    total = total.to(device)
    if mp.config.pp > 1:
        dist.all_reduce(total, group=mp.pp_group)
    dist.all_reduce(total, group=mp.dp_group)
    return total


def _stats_len(outputs, mp: ModelParallel, device) -> int:
    """The stats vector's length, known on the last stage and shared along the pipeline."""
    n = torch.tensor([len(outputs[0]["stats"]) if outputs else 0], device=device)
    if mp.config.pp > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=mp.pp_group)
    return int(n.item())
