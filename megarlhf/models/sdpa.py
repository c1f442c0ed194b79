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

__all__ = ["SDPAttention", "packed_slots"]


class SDPAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention: attention_bias is not supported")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
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

    def _scale(self) -> float:
        scale = self.softmax_scale
        if self.config.apply_query_key_layer_scaling:
            scale = scale * self.layer_number
        return scale

    def _packed(self, query, key, value, p):
        """Sequences packed end to end (megatron's ``thd`` format: ``[t, heads, dim]``, one
        sequence per span of ``p.cu_seqlens_q``), each attending causally to itself only.
        What flash attention's variable-length kernel does on a GPU, done with the dense
        kernel: the spans are laid out right-padded ``[n, heads, max_seqlen, dim]`` (pads
        come after every real key of their row, so causal attention never reads them),
        attended, and gathered back."""
        if p.qkv_format != "thd":
            raise NotImplementedError(f"SDPAttention: packed_seq_params.qkv_format={p.qkv_format!r} "
                                      "(only 'thd' is supported)")
        if query.dim() == 4:  # [t, 1, heads, dim]
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        t, heads, dim = query.shape
        slot, n, width = packed_slots(p.cu_seqlens_q, int(p.max_seqlen_q), query.device)

        def padded(x):
            out = x.new_zeros(n * width, *x.shape[1:]).index_copy(0, slot, x)
            return out.view(n, width, *x.shape[1:]).transpose(1, 2)  # [n, heads, width, dim]

        q, k, v = padded(query), padded(key), padded(value)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self._scale(),
                                             enable_gqa=k.shape[1] != heads)
        return out.transpose(1, 2).reshape(n * width, heads * dim).index_select(0, slot)


def packed_slots(cu_seqlens: torch.Tensor, max_seqlen: int, device):
    """Where each of the ``t`` packed tokens sits in a right-padded ``[n * max_seqlen]``
    layout of its ``n`` sequences (``cu_seqlens`` ``[n + 1]``): ``(index [t], n, max_seqlen)``."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]
    n = int(lens.numel())
    seq = torch.repeat_interleave(torch.arange(n, device=device), lens)
    pos = torch.arange(int(cu[-1]), device=device) - cu[:-1][seq]
    return seq * max_seqlen + pos, n, max_seqlen
