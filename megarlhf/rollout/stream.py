"""Finished responses streamed from the actor's replicas to the reward model's ranks while
the actor still generates (the partitioned placement), so that the reward model scores
during generation instead of after it.

Each actor replica's writer (its last pipeline stage, TP rank 0) sends the responses of
its share of the step's rows in chunks of ``chunk`` rows, in the order they finish, as one
int64 message ``[k, 2 + max_new]`` per chunk: the row's index in the step, the response
length, the response tokens. A replica with ``s`` rows sends ``ceil(s / chunk)`` messages,
the last one shorter, so every reward rank knows every message's size in advance: the
first reward rank receives them round-robin over the replicas (message 1 of each, then 2,
...) with point-to-point receives from known sources (what NCCL needs), and broadcasts
each to the other reward ranks. Sends are non-blocking: the actor never waits for the
reward model while it generates.
"""

from __future__ import annotations

from typing import Iterator, List, Sequence

import torch
import torch.distributed as dist

__all__ = ["message_rows", "ResponseSender", "receive_responses"]


def message_rows(share: int, chunk: int) -> List[int]:
    """Rows of each message a replica with ``share`` rows sends."""
    return [min(chunk, share - start) for start in range(0, share, chunk)]


class ResponseSender:
    """The writer side: ``add`` finished rows as the engine reports them; ``close`` sends
    what is left and waits until every message has gone."""

    def __init__(self, dst: int, chunk: int, max_new: int, first: int, share: int, device):
        self.dst, self.chunk, self.max_new, self.first, self.device = dst, chunk, max_new, first, device
        self.sizes = message_rows(share, chunk)
        self.rows: List[List[int]] = []
        self.pending: list = []  # (work, buffer): buffers stay alive until sent

    def add(self, local: Sequence[int], responses: Sequence[Sequence[int]]) -> None:
        """Rows ``local`` (indices in this replica's share) finished with ``responses``."""
        for i, r in zip(local, responses):
            self.rows.append([self.first + i, len(r), *r, *([0] * (self.max_new - len(r)))])
        while self.sizes and len(self.rows) >= self.sizes[0]:
            self._send(self.sizes.pop(0))

    def _send(self, k: int) -> None:
        buf = torch.tensor(self.rows[:k], dtype=torch.long, device=self.device)
        del self.rows[:k]
        self.pending.append((dist.isend(buf, dst=self.dst), buf))

    def close(self) -> None:
        if self.rows or self.sizes:
            raise RuntimeError(f"{len(self.rows)} finished rows left over, {len(self.sizes)} messages unsent")
        for work, _ in self.pending:
            work.wait()
        self.pending = []


def receive_responses(sources: Sequence[int], share: int, chunk: int, max_new: int, leader: int, group,
                      device) -> Iterator[torch.Tensor]:
    """The reward side (every reward rank calls it): each message, ``[k, 2 + max_new]``,
    round-robin over the replicas' writers ``sources`` (each with ``share`` rows)."""
    sizes = message_rows(share, chunk)
    me = dist.get_rank()
    for k in sizes:
        for src in sources:
            buf = torch.empty(k, 2 + max_new, dtype=torch.long, device=device)
            if me == leader:
                dist.recv(buf, src=src)
            dist.broadcast(buf, src=leader, group=group)
            yield buf
