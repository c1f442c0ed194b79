"""Per-token log-probabilities and entropy from (possibly vocab-parallel) logits.

With tensor parallelism each rank holds a slice ``[vocab_start, vocab_start + V/tp)`` of
the vocabulary. These functions never gather the vocabulary: they all-reduce the max,
the sum of exponentials and the picked logit over ``group``, so memory stays
``O(V/tp)`` per token. With ``group=None`` they are plain ``log_softmax``.

Gradients follow megatron's tensor-parallel convention: the loss computed after these
reductions is replicated on every TP rank, so the backward of a sum over ranks is the
identity (each rank's shard receives d loss / d sum), not another all-reduce.
"""

from __future__ import annotations



import torch
import torch.distributed as dist

__all__ = ["token_logprobs", "token_entropy", "vocab_start_of"]


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward (the loss is replicated over ranks)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _sum_over_ranks(x: torch.Tensor, group) -> torch.Tensor:
    return _SumOverRanks.apply(x, group) if _group_size(group) > 1 else x


def _normalizer(logits: torch.Tensor, group) -> torch.Tensor:
    """log sum_v exp(logits_v) over the whole (sharded) vocabulary; shape ``logits[..., 0]``."""
    local_max = logits.detach().max(dim=-1, keepdim=True).values
    if _group_size(group) > 1:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = _sum_over_ranks(torch.exp(logits - local_max).sum(dim=-1, keepdim=True), group)
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
    picked = _sum_over_ranks(torch.where(in_shard, picked, torch.zeros_like(picked)), group)
    return picked - _normalizer(logits, group)


def token_entropy(logits: torch.Tensor, group=None) -> torch.Tensor:
    """Entropy of the softmax over the whole vocabulary: ``[..., V_local] -> [...]`` (nats).

    ``H = m + log Z - T / Z`` with ``Z = sum_v e_v``, ``T = sum_v e_v l_v``,
    ``e_v = exp(l_v - m)``: every cross-rank dependency goes through the sums ``Z`` and
    ``T``, so the identity backward of the rank sum gives exact gradients.
    """
    logits = logits.float()
    m = logits.detach().max(dim=-1, keepdim=True).values
    if _group_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(logits - m)
    z = _sum_over_ranks(e.sum(dim=-1), group)
    t = _sum_over_ranks((e * logits).sum(dim=-1), group)
    return m.squeeze(-1) + torch.log(z) - t / z


def vocab_start_of(tp_rank: int, padded_vocab: int, tp_size: int) -> int:
    """First vocabulary id held by ``tp_rank`` when ``padded_vocab`` is split evenly."""
    return tp_rank * (padded_vocab // tp_size)


