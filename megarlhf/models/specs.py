"""Layer specs (megatron-core ``ModuleSpec``): the local torch layers or Transformer Engine.

The choice is made here once from ``ModelConfig.transformer_impl``; layers themselves
never branch on it.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megarlhf import platform
from megarlhf.config.model import ModelConfig

__all__ = ["LocalRMSNorm", "layer_spec", "block_spec"]


class LocalRMSNorm:
    """``torch.nn.RMSNorm`` that also works under sequence parallelism.

    megatron's torch-norm wrapper refuses ``sequence_parallel`` although nothing in an
    RMSNorm depends on it: each rank normalises its own tokens. What SP does need is that
    the weight's gradient, computed on a slice of the sequence, is summed over the TP
    ranks; megatron's ``finalize_model_grads`` does that for parameters marked
    ``sequence_parallel=True``, which is what this builder sets.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        if config.sequence_parallel:
            for p in norm.parameters():
                setattr(p, "sequence_parallel", True)
        return norm


def _local_layer_spec(attention_backend: str = "unfused") -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    sub = dataclasses.replace(spec.submodules, input_layernorm=LocalRMSNorm,
                              pre_mlp_layernorm=LocalRMSNorm)
    if attention_backend == "sdpa":
        from megarlhf.models.sdpa import SDPAttention

        attn = sub.self_attention
        attn_sub = dataclasses.replace(attn.submodules, core_attention=SDPAttention)
        sub = dataclasses.replace(sub, self_attention=dataclasses.replace(attn, submodules=attn_sub))
    return dataclasses.replace(spec, submodules=sub)


def _te_layer_spec() -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()


def layer_spec(cfg: ModelConfig) -> ModuleSpec:
    """The spec of one transformer layer for ``cfg.transformer_impl``."""
    if cfg.transformer_impl == "transformer_engine":
        platform.require_transformer_engine(cfg.fp8)
        return _te_layer_spec()
    if cfg.transformer_impl != "local":
        raise ValueError(f"model.transformer_impl={cfg.transformer_impl!r}: expected "
                         "'local' or 'transformer_engine'")
    return _local_layer_spec(cfg.attention_backend)


def block_spec(cfg: ModelConfig, num_layers_here: int) -> TransformerBlockSubmodules:
    """A decoder block of ``num_layers_here`` layers with the final norm made explicit
    (megatron would otherwise pick apex's or TE's norm by what happens to be installed)."""
    spec = layer_spec(cfg)
    if cfg.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = LocalRMSNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers_here, layer_norm=final_norm)
