"""Parallel layout of one model: tensor, pipeline (and virtual pipeline), data parallel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["ParallelConfig"]


@dataclass(frozen=True)
class ParallelConfig:
    """How one model is split over ranks. Data parallelism takes the remaining ranks."""

    tensor_model_parallel_size: int = 1
    """TP: each weight matrix is split over this many ranks (within a node on GPUs)."""
    pipeline_model_parallel_size: int = 1
    """PP: the layers are split into this many consecutive stages."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved schedule: model chunks per pipeline rank (needs PP > 1)."""
    sequence_parallel: bool = False
    """Split norms, dropout and activations along the sequence over the TP ranks
    (saves activation memory; needs TP > 1)."""

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def vpp(self) -> int:
        return self.virtual_pipeline_model_parallel_size or 1

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size
