"""Layers that carry ``_extra_state`` where Transformer Engine's do, for checkpoint tests
on machines without TE.

Mirrors, in what a checkpoint sees:

* ``transformer_engine/pytorch/module/base.py``: ``TransformerEngineBaseModule.get_extra_state``
  returns a ``uint8`` tensor (the pickled FP8 scaling metadata; empty when FP8 never
  ran) and ``set_extra_state`` ignores ``None`` and empty tensors. Every TE module has it:
  the fused norm + linear layers (QKV, FC1), the linears (projection, FC2) and the core
  attention (``DotProductAttention``);
* ``transformer_engine/pytorch/ops/op.py``: ``BasicOperation.get_extra_state``, which
  TE's ``RMSNorm`` (megatron-core's ``TENorm``, the final norm) inherits: the local
  layers' final norm has none, so a converted checkpoint lacks
  ``decoder.final_layernorm._extra_state``;
* megatron-core's ``make_sharded_tensors_for_checkpoint`` turns each into a
  ``ShardedObject`` named ``..._extra_state``, except the core attention's:
  ``TEDotProductAttention.sharded_state_dict`` (megatron/core/extensions/transformer_engine.py)
  leaves it out, as the local ``DotProductAttention.sharded_state_dict`` does.

The arithmetic is the local layers' own, so a model built with :func:`block_spec` computes
exactly what the local model computes.
"""

import dataclasses
import pickle

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules


class _ExtraState:
    """FP8-metadata-like extra state: a scale and an amax history per module."""

    def get_extra_state(self) -> torch.Tensor:
        meta = getattr(self, "fp8_meta_like", None)
        if meta is None:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(pickle.dumps(meta)), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        self.loaded_extra_state = state
        if state is None or (isinstance(state, torch.Tensor) and state.numel() == 0):
            return
        self.fp8_meta_like = pickle.loads(state.numpy().tobytes())


class TELikeColumnParallelLinear(_ExtraState, ColumnParallelLinear):
    pass


class TELikeRowParallelLinear(_ExtraState, RowParallelLinear):
    pass


class TELikeDotProductAttention(_ExtraState, DotProductAttention):
    pass


class _RMSNormWithExtraState(_ExtraState, torch.nn.RMSNorm):
    pass


class TELikeNorm:
    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        return _RMSNormWithExtraState(hidden_size, eps=eps, dtype=config.params_dtype)


def block_spec(local_block_spec):
    """Wrap megarlhf's ``block_spec`` so that the layers carry extra state as TE's do."""

    def spec(cfg, num_layers_here: int) -> TransformerBlockSubmodules:
        local = local_block_spec(cfg, num_layers_here)
        layer = local.layer_specs[0]
        attn = layer.submodules.self_attention
        attn = dataclasses.replace(attn, submodules=dataclasses.replace(
            attn.submodules, linear_qkv=TELikeColumnParallelLinear, core_attention=TELikeDotProductAttention,
            linear_proj=TELikeRowParallelLinear))
        mlp = layer.submodules.mlp
        mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(
            mlp.submodules, linear_fc1=TELikeColumnParallelLinear, linear_fc2=TELikeRowParallelLinear))
        layer = dataclasses.replace(layer, submodules=dataclasses.replace(
            layer.submodules, self_attention=attn, mlp=mlp))
        return TransformerBlockSubmodules(layer_specs=[layer] * num_layers_here, layer_norm=TELikeNorm)

    return spec


def extra_state_modules(chunk):
    """The modules whose extra state megatron checkpoints (all but the core attention)."""
    return [m for m in chunk.modules()
            if isinstance(m, _ExtraState) and not isinstance(m, TELikeDotProductAttention)]
