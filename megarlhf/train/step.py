"""One optimizer step, or a forward-only pass, through megatron's pipeline schedules.

A recipe supplies a megatron ``forward_step_func(data_iterator, model) -> (output,
loss_fn)``; the schedule runs it over the microbatches on every pipeline stage, so TP,
PP and virtual PP all work the same way.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

import torch

from megarlhf.parallel import ModelParallel

__all__ = ["train_step", "forward_only"]


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
    applied, grad_norm, _ = optimizer.step()
    return {"outputs": outputs, "grad_norm": grad_norm, "applied": applied}


@torch.no_grad()
def forward_only(chunks: List[torch.nn.Module], mp: ModelParallel, forward_step_func: Callable,
                 microbatches: Sequence[Any], seq_length: int, micro_batch_size: int) -> List[Any]:
    """Run the forward pass only; returns whatever each microbatch's ``loss_fn`` returns
    (on the last pipeline stage; an empty list elsewhere)."""
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
        for chunk in chunks:
            chunk.train()
