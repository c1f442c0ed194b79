"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for megatron's local ``DotProductAttention`` (same constructor, same
``[s, b, heads, dim]`` inputs and ``[s, b, heads * dim]`` output): instead of
materialising the ``[b, heads, s, s]`` score tensor, masking it and running a separate
softmax, torch's fused kernel (flash attention on CPUs and GPUs) does it in one pass.
Selected with ``model.attention_backend: sdpa`` for the local layers; Transformer Engine
layers bring their own fused attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

__all__ = ["SDPAttention"]


class SDPAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed_seq_params and attention_bias are not supported")
        sq, b, heads, dim = query.shape
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)  # [b, heads, sq, dim]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        groups = heads // k.shape[1]
        if groups > 1:  # grouped-query attention: each KV head serves `groups` query heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scale = self.softmax_scale
        if self.config.apply_query_key_layer_scaling:  # megatron folds layer_number into both
            scale = scale * self.layer_number
        mask, causal = None, False
        if attention_mask is not None:
            allowed = ~attention_mask.bool()  # megatron's mask is True where attention is NOT allowed
            # A row with nothing to attend to: megatron's masked softmax gives uniform weights
            # over all keys; do the same instead of the NaN a fully masked SDPA row gives.
            mask = allowed | ~allowed.any(dim=-1, keepdim=True)
        elif (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise ValueError(f"SDPAttention: a causal mask needs as many queries as keys ({sq} != {sk})")
            causal = True
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)
