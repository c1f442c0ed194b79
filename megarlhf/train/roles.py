"""Several models in one job: where each role's ranks are, and how per-sequence results
move between roles whose layouts differ.

Every rank of the job holds the whole rollout batch's small tensors (token ids, masks,
per-token log-probs, values): each role computes the rows of its own data-parallel shard,
and :func:`share_rows` sums the writers' rows over the whole job, so every rank ends with
every row whatever the roles' layouts or placement. Only one rank per data-parallel
replica writes (TP rank 0 of the last pipeline stage), so nothing is counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megarlhf.parallel import ModelParallel

__all__ = ["Span", "placement_spans", "shard_rows", "replica_share", "share_rows", "is_writer", "Role", "build_role",
           "make_role_trainable"]

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


def replica_share(n: int, mp: ModelParallel) -> range:
    """This data-parallel replica's contiguous share of ``n`` items when they need not split
    evenly (evaluation, generation commands): ``ceil(n / dp)`` each, the last ones shorter
    or empty."""
    per = -(-n // mp.dp_size)
    return range(min(n, mp.dp_rank * per), min(n, (mp.dp_rank + 1) * per))


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


@dataclass
class Role:
    """One model of a multi-model job (actor, reference, critic, reward model) on its own
    layout. On ranks outside the role's span ``mp`` is None and ``chunks`` empty: such a
    rank still joins the job-wide collectives of :meth:`per_token` (every rank calls it)."""

    name: str
    mp: Optional[ModelParallel]
    chunks: List[torch.nn.Module]
    model: Any
    """The role's ``ModelConfig`` (its checkpoint's shape, run as configured)."""
    meta: Any
    """The starting checkpoint's ``CheckpointMeta``."""
    init_from: str
    trainer: Any = None
    """A :class:`~megarlhf.train.job.Trainable` where this rank trains the role."""
    packing: bool = False
    """Pack each microbatch's rows (``train.packing``, :func:`~megarlhf.rollout.batch.microbatches`)."""
    tokens_seen: List[int] = field(default_factory=lambda: [0, 0])
    """Running counts of this rank's microbatches: real tokens, tokens the model computed."""

    @property
    def here(self) -> bool:
        """Whether this rank holds part of the role's model."""
        return self.mp is not None

    @property
    def vocab_start(self) -> int:
        """First vocabulary id of this rank's slice of the output layer."""
        from megarlhf.algos.logprobs import vocab_start_of
        from megarlhf.models.llama import padded_vocab

        tp = self.mp.config.tp
        return vocab_start_of(self.mp.tp_rank, padded_vocab(self.model, tp), tp)

    def rows(self, n: int) -> range:
        """This rank's data-parallel share of ``n`` rows."""
        return shard_rows(n, self.mp)

    def per_token(self, step_fn: Callable, ro, rows: List[range], micro_batch_size: int, device,
                  group=None) -> torch.Tensor:
        """Forward-only: the ``[n, s]`` per-token outputs (``{"values": ...}`` of ``step_fn``'s
        loss function) of the role over this rank's ``rows`` of rollout batch ``ro``, shared
        with every rank of ``group`` (collective over it, default the whole job; ranks
        outside the role only join the sum)."""
        from megarlhf.train.step import forward_only

        full = torch.zeros(ro.n, ro.seq, device=device)
        if self.here and any(len(r) for r in rows):  # a replica may have no rows (uneven shares)
            micro, seq, size = self.microbatches(ro, rows, micro_batch_size)
            res = forward_only(self.chunks, self.mp, step_fn, micro, seq, size)
            rows_all = [i for r in rows for i in r]
            if is_writer(self.mp) and rows_all:  # one writer per replica: the sum counts each row once
                full[torch.tensor(rows_all, device=device)] = torch.cat([o["values"] for o in res]).to(device)
        dist.all_reduce(full, group=group)
        return full.cpu()

    def microbatches(self, ro, rows: List[range], size: int, extra=None) -> Tuple[List[Any], int, int]:
        """This role's microbatches of ``size`` rows over ``rows`` of rollout batch ``ro``
        (packed when :attr:`packing`), with the row length and rows per microbatch its
        pipeline schedule takes."""
        from megarlhf.models.llama import sequence_multiple_of
        from megarlhf.rollout.batch import microbatches

        trim = self.mp.config.pp == 1
        micro = microbatches(ro, rows, size, extra, packing=self.packing, trim=trim,
                             multiple=sequence_multiple_of(self.chunks))  # one shape for the whole pass
        self.tokens_seen[0] += sum(int(ro.last_index[i]) + 1 for r in rows for i in r)
        self.tokens_seen[1] += sum(m.tokens.numel() for m in micro)
        if not self.packing or not micro:
            return micro, ro.seq, size
        return micro, micro[0].tokens.shape[1], 1

    def update(self, step_fn: Callable, micro: List[Any], seq: int, micro_batch_size: int,
               step: int, preempt, device) -> Tuple[torch.Tensor, bool]:
        """One optimizer step over this rank's microbatches; returns the microbatches'
        ``stats`` vectors summed over the role's ranks (the same on each of them), and
        whether the update was skipped (a non-finite loss or gradient; counted by the guard,
        which stops the run after too many in a row)."""
        from megarlhf.train.step import reduce_stats

        res = self.trainer.step(self.mp, step_fn, micro, seq, micro_batch_size, step, preempt,
                                advance_schedule=False)
        return reduce_stats(res["outputs"], self.mp, device).cpu(), res["skipped"]


def build_role(name: str, mp: Optional[ModelParallel], model_cfg, init_from: str, kind: str,
               frozen: bool, say: Callable[[str], None]) -> Role:
    """The role's model on its layout, loaded from ``init_from`` (collective over the whole
    job: ranks outside the role join the load). A reward-kind role from a causal checkpoint
    gets a fresh scalar head; a frozen role is in eval mode without gradients."""
    from megarlhf.models.checkpoint import load_model, read_meta
    from megarlhf.models.llama import build_model, describe

    meta = read_meta(init_from)
    chunks = build_model(model_cfg, mp, kind=kind) if mp is not None else []
    skip = ("output_layer.",) if kind == "reward" and meta.kind == "causal" else ()
    load_model(chunks, init_from, skip_prefixes=skip)
    if mp is not None:
        say(f"{name}: {describe(model_cfg, mp)} on ranks {mp.ranks[0]}-{mp.ranks[-1]} "
            f"from {init_from}{' (fresh value head)' if skip else ''}")
    for c in chunks if frozen else ():
        c.eval()
        c.requires_grad_(False)
    return Role(name, mp, chunks, model_cfg, meta, init_from)


def make_role_trainable(role: Role, t, lr: float, total_steps: int) -> None:
    """Give ``role`` its optimizer and LR schedule from loop config ``t`` (a constant
    schedule keeps its floor at the peak). Collective over the job: ranks outside the role
    join megatron's parameter-group alignment."""
    from megarlhf.train.job import make_trainable
    from megarlhf.train.optim import build_optimizer_elsewhere

    if not role.here:
        build_optimizer_elsewhere()
        return
    floor = lr if t.schedule.style == "constant" else 0.0
    role.trainer = make_trainable(role.chunks, role.mp, t, lr, floor, total_steps, t.distributed_optimizer,
                                  name=role.name)
