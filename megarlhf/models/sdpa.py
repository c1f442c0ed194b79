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

__all__ = ["SDPAttention", "packed_plan"]


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
        scale = self._scale()
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
        out = _attend(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)

    def _scale(self) -> float:
        scale = self.softmax_scale
        if self.config.apply_query_key_layer_scaling:  # megatron folds layer_number into both
            scale = scale * self.layer_number
        return scale

    def _packed(self, query, key, value, p):
        """Sequences packed end to end (megatron's ``thd`` format: ``[t, heads, dim]``, one
        sequence per span of ``p.cu_seqlens_q``), each attending causally to itself only.
        What flash attention's variable-length kernel does on a GPU, done with the dense
        kernel: sequences of similar length are laid out right-padded together
        (:func:`packed_plan`; pads come after every real key of their row, so causal
        attention never reads them), attended, and gathered back in order."""
        if p.qkv_format != "thd":
            raise NotImplementedError(f"SDPAttention: packed_seq_params.qkv_format={p.qkv_format!r} "
                                      "(only 'thd' is supported)")
        if query.dim() == 4:  # [t, 1, heads, dim]
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        t, heads, dim = query.shape
        plan = getattr(p, "_sdpa_plan", None)
        if plan is None or plan[0].device != query.device:
            plan = packed_plan(p.cu_seqlens_q, query.device)
            p._sdpa_plan = plan  # one plan per microbatch, shared by its layers
        order, buckets = plan
        parts = []
        for tokens, slot, n, width in buckets:
            def padded(x):
                x = x.index_select(0, tokens)
                out = x.new_zeros(n * width, *x.shape[1:]).index_copy(0, slot, x)
                return out.view(n, width, *x.shape[1:]).transpose(1, 2)  # [n, heads, width, dim]

            out = _attend(padded(query), padded(key), padded(value), is_causal=True, scale=self._scale(),
                          enable_gqa=key.shape[1] != heads)
            parts.append(out.transpose(1, 2).reshape(n * width, heads * dim).index_select(0, slot))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.index_select(0, order)


def _attend(q, k, v, **kwargs) -> torch.Tensor:
    """``scaled_dot_product_attention``, in fp32 where :func:`megarlhf.platform.attention_upcast`
    says the half-precision kernel is the slow one (the output keeps ``q``'s dtype)."""
    from megarlhf.platform import attention_upcast

    if attention_upcast(q):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def packed_plan(cu_seqlens: torch.Tensor, device, ratio: float = 0.75):
    """How :class:`SDPAttention` lays out packed sequences (``cu_seqlens`` ``[n + 1]``):
    longest first, a sequence joins the current group while at least ``ratio`` of the
    group's longest, so padding to the longest wastes little attention. Returns ``(order,
    groups)``: each group ``(tokens, slot, n, width)``, its tokens' indices in the pack and
    their places in its right-padded ``[n * width]`` layout; ``order`` puts the groups'
    concatenated outputs back in pack order."""
    cu = [int(x) for x in cu_seqlens.tolist()]
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    groups, cur = [], []
    for i in sorted(range(len(lens)), key=lambda i: -lens[i]):
        if cur and lens[i] < ratio * lens[cur[0]]:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    out, seen = [], []
    for g in groups:
        width = lens[g[0]]
        tokens = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in g])
        slot = torch.cat([k * width + torch.arange(lens[i]) for k, i in enumerate(g)])
        out.append((tokens.to(device), slot.to(device), len(g), width))
        seen.append(tokens)
    order = torch.empty(cu[-1], dtype=torch.long)
    order[torch.cat(seen)] = torch.arange(cu[-1])
    return order.to(device), out
