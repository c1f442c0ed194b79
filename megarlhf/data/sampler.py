"""Data order: a seeded permutation per epoch, cut into global batches, each split over
the data-parallel ranks; resumable from the number of samples consumed.

At any DP size every example is seen exactly once per epoch (the last incomplete global
batch of an epoch is dropped and reported), and a job restarted with
``consumed_samples`` from its checkpoint continues with exactly the batches an
uninterrupted job would have seen.
"""

from __future__ import annotations

from typing import Iterator, List

import torch

__all__ = ["ShardedSampler"]


class ShardedSampler:
    """Indices of this DP rank's share of each global batch."""

    def __init__(self, num_examples: int, global_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle: bool = True):
        if global_batch_size % dp_size:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                             f"data-parallel size {dp_size}")
        if num_examples < global_batch_size:
            raise ValueError(f"{num_examples} examples are fewer than one global batch "
                             f"({global_batch_size})")
        self.n, self.gbs = num_examples, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = num_examples // global_batch_size
        self.dropped_per_epoch = num_examples - self.steps_per_epoch * global_batch_size
        self.samples_per_epoch = self.steps_per_epoch * global_batch_size

    def permutation(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def batches(self, consumed_samples: int = 0) -> Iterator[List[int]]:
        """This rank's indices for each global batch from ``consumed_samples`` on (forever)."""
        if consumed_samples % self.gbs:
            raise ValueError(f"consumed_samples={consumed_samples} is not a multiple of the "
                             f"global batch size {self.gbs}")
        epoch, offset = divmod(consumed_samples, self.samples_per_epoch)
        per_rank = self.gbs // self.dp_size
        while True:
            perm = self.permutation(epoch)
            for start in range(offset, self.samples_per_epoch, self.gbs):
                lo = start + self.dp_rank * per_rank
                yield perm[lo:lo + per_rank]
            epoch, offset = epoch + 1, 0
