"""Packed batches meet what Transformer Engine's attention asserts of the ``thd`` layout.

Mirrors, since Transformer Engine cannot run here:
* ``transformer_engine/pytorch/attention/dot_product_attention/dot_product_attention.py``,
  ``DotProductAttention.forward``, its ``qkv_format == "thd"`` checks (3-D queries, keys
  and values; a ``padding`` mask type; ``cu_seqlens_q``/``cu_seqlens_kv`` given, 1-D, of one
  shape, int32) and its inter-sequence padding detection (no ``cu_seqlens_*_padded``: no
  padding between sequences, so flash attention stays eligible);
* ``megatron/core/extensions/transformer_engine.py``, ``TEDotProductAttention.forward``: the
  ``PackedSeqParams`` fields go to TE as keyword arguments (``cp_group`` and
  ``local_cp_size`` dropped), ``causal`` becomes ``padding_causal`` for ``thd``.
``tools/gpu_rehearsal.py`` (item ``rm_packed``) runs the real thing on a GPU.
"""

import dataclasses

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megarlhf.data.batch import pack_pairs
from megarlhf.rollout.batch import build_rollout, microbatches

# DotProductAttention.forward's keyword arguments for packed sequences (TE >= 1.10)
TE_PACKED_KWARGS = {"qkv_format", "cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded",
                    "max_seqlen_q", "max_seqlen_kv"}


def megatron_te_kwargs(p: PackedSeqParams, mask_type: str = "causal"):
    """What TEDotProductAttention.forward passes on for ``p``."""
    kept = {f.name for f in dataclasses.fields(PackedSeqParams)} - {"cp_group", "local_cp_size"}
    kwargs = {k: getattr(p, k) for k in kept}
    if kwargs["qkv_format"] == "thd" and mask_type == "causal":
        mask_type = "padding_causal"
    return {"attn_mask_type": mask_type, **kwargs}


def te_thd_checks(q, k, v, attn_mask_type, qkv_format, cu_seqlens_q, cu_seqlens_kv, cu_seqlens_q_padded,
                  cu_seqlens_kv_padded, max_seqlen_q, max_seqlen_kv):
    """DotProductAttention.forward's checks of a ``thd`` call; returns pad_between_seqs."""
    assert qkv_format == "thd"
    assert all(len(x.shape) == 3 for x in (q, k, v)), "Queries, keys and values must be 3D tensors"
    assert "padding" in attn_mask_type, "Attention mask type must be padding or padding_causal"
    assert cu_seqlens_q is not None and cu_seqlens_kv is not None
    assert cu_seqlens_q.shape == cu_seqlens_kv.shape and len(cu_seqlens_q.shape) == 1
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_kv.dtype == torch.int32
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_kv, int)
    return cu_seqlens_q_padded is not None or cu_seqlens_kv_padded is not None


def check(tokens: torch.Tensor, p: PackedSeqParams, multiple: int = 1):
    assert set(megatron_te_kwargs(p)) - {"attn_mask_type"} <= TE_PACKED_KWARGS
    t = tokens.shape[1]
    assert tokens.shape[0] == 1 and t % multiple == 0
    q = torch.zeros(t, 4, 8)
    kv = torch.zeros(t, 2, 8)
    assert te_thd_checks(q, kv, kv, **megatron_te_kwargs(p)) is False  # no padding between sequences
    cu = p.cu_seqlens_q.long()
    spans = cu[1:] - cu[:-1]
    assert int(cu[0]) == 0 and int(cu[-1]) == t and bool((spans > 0).all())
    assert p.max_seqlen_q >= int(spans.max()) and p.max_seqlen_kv == p.max_seqlen_q


@pytest.mark.parametrize("trim,multiple", [(False, 8), (True, 8), (True, 16), (True, 32)])
def test_packed_pairs_meet_te_thd_checks(trim, multiple):
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(9):
        c, r = (int(x) for x in torch.randint(3, 40, (2,), generator=g))
        pairs.append((([1] * c, [False] + [True] * (c - 1)), ([2] * r, [False] + [True] * (r - 1))))
    for b in pack_pairs(pairs, 128, 0, trim=trim, multiple=multiple):
        b = b.to("cpu")
        check(b.tokens, b.packed_seq_params, multiple)


def test_packed_ppo_microbatches_meet_te_thd_checks():
    n, max_new = 6, 8
    prompts = [[1] * (3 + 2 * i) for i in range(n)]
    resp = torch.randint(3, 50, (n, max_new))
    lens = torch.tensor([1, 8, 3, 5, 2, 7])
    ro = build_rollout(prompts, resp, lens, torch.zeros(n, dtype=torch.long), torch.zeros(n, max_new), 0, multiple=16)
    for trim in (False, True):
        for mb in microbatches(ro, range(n), 4, packing=True, trim=trim, multiple=16):
            check(mb.to("cpu").tokens, mb.packed_seq_params, 16)
