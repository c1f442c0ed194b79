"""Per-token log-probabilities and entropy from (possibly vocab-parallel) logits.

With tensor parallelism each rank holds a slice ``[vocab_start, vocab_start + V/tp)`` of
the vocabulary. These functions never gather the vocabulary: they all-reduce the max,
the sum of exponentials and the picked logit over ``group`` (autograd-aware), so memory
stays ``O(V/tp)`` per token. With ``group=None`` they are plain ``log_softmax``.
"""

from __future__ import annotations



import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

__all__ = ["token_logprobs", "token_entropy", "vocab_start_of"]


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _normalizer(logits: torch.Tensor, group) -> torch.Tensor:
    """log sum_v exp(logits_v) over the whole (sharded) vocabulary; shape ``logits[..., 0]``."""
    local_max = logits.detach().max(dim=-1, keepdim=True).values
    if _group_size(group) > 1:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(logits - local_max).sum(dim=-1, keepdim=True)
    if _group_size(group) > 1:
        sum_exp = dist_fn.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
    return (local_max + torch.log(sum_exp)).squeeze(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, group=None,
                   vocab_start: int = 0) -> torch.Tensor:
    """``log p(targets)``: logits ``[..., V_local]`` (fp32 recommended), targets ``[...]``
    (global ids) -> ``[...]``. ``vocab_start`` is this rank's first vocabulary id."""
    logits = logits.float()
    v_local = logits.shape[-1]
    local = targets - vocab_start
    in_shard = (local >= 0) & (local < v_local)
    picked = torch.gather(logits, -1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(in_shard, picked, torch.zeros_like(picked))
    if _group_size(group) > 1:
        picked = dist_fn.all_reduce(picked, op=dist.ReduceOp.SUM, group=group)
    return picked - _normalizer(logits, group)


def token_entropy(logits: torch.Tensor, group=None) -> torch.Tensor:
    """Entropy of the softmax over the whole vocabulary: ``[..., V_local] -> [...]`` (nats)."""
    logits = logits.float()
    logz = _normalizer(logits, group)
    p = torch.exp(logits - logz.unsqueeze(-1))
    ent_part = (p * logits).sum(dim=-1)
    if _group_size(group) > 1:
        ent_part = dist_fn.all_reduce(ent_part, op=dist.ReduceOp.SUM, group=group)
    return logz - ent_part


def vocab_start_of(tp_rank: int, padded_vocab: int, tp_size: int) -> int:
    """First vocabulary id held by ``tp_rank`` when ``padded_vocab`` is split evenly."""
    return tp_rank * (padded_vocab // tp_size)


