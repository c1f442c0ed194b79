"""Scalar head for reward and value models: hidden -> one value per token, TP-aware.

It replaces the LM output layer (``GPTModel.output_layer``), as the paper's reward models
replace the SFT model's LM head. The weight ``[1, hidden]`` is split along ``hidden``
over the TP ranks (a row-parallel linear whose partial products are all-reduced), so a
70B reward model's head shards like every other matrix and checkpoints at any TP.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

__all__ = ["ScalarHead"]


class ScalarHead(tensor_parallel.RowParallelLinear):
    """``[s, b, hidden] -> ([s, b, 1], None)``, called like megatron's output layer."""

    def __init__(self, config, hidden_size: int, tp_group, init_seed: int = 0):
        # Under sequence parallelism the head sees a slice of the sequence: it gathers the
        # sequence first and then runs as a plain (non-SP) row-parallel layer.
        head_config = dataclasses.replace(config, sequence_parallel=False)
        super().__init__(
            hidden_size,
            1,
            config=head_config,
            init_method=config.init_method,
            bias=False,
            input_is_parallel=False,
            skip_bias_add=True,
            tp_group=tp_group,
        )
        self.gather_sequence = config.sequence_parallel
        # A fresh head is drawn from its own seeded generator, whole, and then sharded, so
        # every TP x PP layout starts from the same head (the model's RNG stream depends
        # on how many layers a rank built before it).
        if self.weight.device.type != "meta":
            g = torch.Generator().manual_seed(init_seed)
            full = torch.randn(1, hidden_size, generator=g) * config.init_method_std
            tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
            rank = torch.distributed.get_rank(tp_group) if tp_group is not None else 0
            shard = hidden_size // tp
            with torch.no_grad():
                self.weight.copy_(full[:, rank * shard:(rank + 1) * shard].to(self.weight.dtype))

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        if self.gather_sequence:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, group=self.tp_group)
        values, _ = super().forward(hidden_states)
        return values, None
