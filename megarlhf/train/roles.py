"""Several models in one job: where each role's ranks are, and how per-sequence results
move between roles whose layouts differ.

Every rank of the job holds the whole rollout batch's small tensors (token ids, masks,
per-token log-probs, values): each role computes the rows of its own data-parallel shard,
and :func:`share_rows` sums the writers' rows over the whole job, so every rank ends with
every row whatever the roles' layouts or placement. Only one rank per data-parallel
replica writes (TP rank 0 of the last pipeline stage), so nothing is counted twice.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megarlhf.parallel import ModelParallel

__all__ = ["Span", "placement_spans", "shard_rows", "share_rows", "is_writer"]

Span = Tuple[int, int]  # first rank, number of ranks


def placement_spans(placement: str, world: int, separate_ranks: int,
                    roles: Sequence[str], apart: Sequence[str]) -> Dict[str, Span]:
    """Ranks of each role: ``colocated``, every role on every rank; ``partitioned``, the
    roles in ``apart`` on the last ``separate_ranks`` ranks and the others on the rest."""
    if placement == "colocated":
        return {r: (0, world) for r in roles}
    if placement != "partitioned":
        raise ValueError(f"placement={placement!r}: expected 'colocated' or 'partitioned'")
    if not 0 < separate_ranks < world:
        raise ValueError(f"partitioned placement needs 0 < separate ranks ({separate_ranks}) "
                         f"< world size ({world})")
    rest = world - separate_ranks
    return {r: ((rest, separate_ranks) if r in apart else (0, rest)) for r in roles}


def shard_rows(n: int, mp: Optional[ModelParallel]) -> range:
    """The rows of ``n`` that this rank's data-parallel replica computes (contiguous,
    equal shares); empty when this rank holds no part of the model."""
    if mp is None:
        return range(0)
    if n % mp.dp_size:
        raise ValueError(f"{n} rows cannot be split evenly over {mp.dp_size} data-parallel replicas")
    per = n // mp.dp_size
    return range(mp.dp_rank * per, (mp.dp_rank + 1) * per)


def is_writer(mp: Optional[ModelParallel]) -> bool:
    return mp is not None and mp.tp_rank == 0 and mp.is_last_stage


def share_rows(n: int, tail: Tuple[int, ...], dtype: torch.dtype, rows: range,
               values: Optional[torch.Tensor], writer: bool, device) -> torch.Tensor:
    """``[n, *tail]`` with ``values`` at ``rows`` from every writing rank, on every rank of
    the job (collective over the job: every rank calls it, in the same order)."""
    full = torch.zeros((n, *tail), dtype=dtype, device=device)
    if writer and len(rows):
        full[rows.start:rows.stop] = values.to(device=device, dtype=dtype)
    dist.all_reduce(full)
    return full.cpu()
