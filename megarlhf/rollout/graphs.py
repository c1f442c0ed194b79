"""The rollout engine's decode step captured as a CUDA graph, one per slot-count bucket.

A decode step over rows ``0..b-1`` at the full cache length has fixed shapes and touches
only tensors that outlive it (the slots' state, the KV cache, the parameters, which the
optimizer updates in place), so it can be captured once and replayed: one launch instead
of a few hundred small kernels per token, which is what bounds a decode step of a small
or heavily tensor-parallel model. The engine rounds the busy rows up to a bucket (powers
of two up to the slot count; the extra rows are done or free, and a done row is left as
it is), so at most ``log2(slots) + 1`` graphs are captured per call of ``generate``.

Capturing does not run the kernels, but the warm-up before it does (CUDA's lazy set-up
must not be captured): the slots' state is saved before the warm-up and put back after,
so the step then replayed is the one the warm-up computed (it writes the same keys and
values at the same positions, so the KV cache needs no saving).

On CPU there are no graphs: :class:`Replay` stands in, keeping the function and calling
it, so the bucket and warm-up logic runs in the tests; ``tools/gpu_rehearsal.py`` runs
the real capture on a GPU.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

__all__ = ["buckets", "bucket_for", "GraphedStep", "Replay", "CudaGraphs"]


def buckets(slots: int) -> List[int]:
    """Powers of two below ``slots``, then ``slots``."""
    out, b = [], 1
    while b < slots:
        out.append(b)
        b *= 2
    return out + [slots]


def bucket_for(rows: int, sizes: List[int]) -> int:
    """The smallest bucket holding ``rows`` rows."""
    return next(s for s in sizes if s >= rows)


class Replay:
    """Stand-in for a CUDA graph where there are none: "capturing" keeps the function,
    replaying calls it."""

    def warm_up(self, fn: Callable[[], None]) -> None:
        fn()

    def capture(self, fn: Callable[[], None]):
        return fn


class CudaGraphs:
    """Real CUDA graphs: the warm-up on a side stream, then capture into a graph that
    shares one memory pool with this engine's other graphs."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()

    def warm_up(self, fn: Callable[[], None]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn: Callable[[], None]):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        return graph.replay


class GraphedStep:
    """``step(b)`` (one decode step over rows ``0..b-1``, in place) captured per bucket
    on first use and replayed after. ``state()`` lists the tensors a step changes that
    must be put back after the warm-up."""

    def __init__(self, step: Callable[[int], None], state: Callable[[], List[torch.Tensor]], slots: int,
                 backend=None):
        self.step, self.state = step, state
        self.sizes = buckets(slots)
        self.backend = backend or Replay()
        self.replays: Dict[int, Callable[[], None]] = {}
        self.captures = 0

    def __call__(self, rows: int) -> int:
        """One step over at least ``rows`` rows; returns the bucket it ran."""
        b = bucket_for(rows, self.sizes)
        replay = self.replays.get(b)
        if replay is None:
            saved = [t.clone() for t in self.state()]
            self.backend.warm_up(lambda: self.step(b))
            for t, s in zip(self.state(), saved):
                t.copy_(s)
            replay = self.replays[b] = self.backend.capture(lambda: self.step(b))
            self.captures += 1
        replay()
        return b
