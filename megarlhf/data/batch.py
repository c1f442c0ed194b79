"""Causal-LM microbatches, padded or packed.

Padded: one example per row, right-padded to ``seq_length``; causal attention suffices
(pad tokens come after every real token of their row).

Packed: several examples per row (first fit, in order), with a block-diagonal causal
attention mask so attention never crosses an example boundary. Position ids run on
across a row: RoPE attention depends only on relative positions, so within an example
the result equals the unpacked one.

Losses are summed over the ``loss_mask`` and divided by the number of loss tokens of the
whole global batch (megatron's per-token loss), so packing or padding the same
examples gives the same loss and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch

__all__ = ["LMBatch", "pad_examples", "pack_examples", "to_thd", "thd_tokens", "segments_to_attention_mask", "PairBatch", "pair_batch",
           "pack_pairs", "thd_layout", "read_back", "params_to"]

Example = Tuple[Sequence[int], Sequence[bool]]  # token ids, loss mask (True = trained)


@dataclass
class LMBatch:
    """One microbatch.

    tokens          [b, s] int64   input ids
    labels          [b, s] int64   the next token at each position (0 where none)
    loss_mask       [b, s] float32 1 where ``labels`` is a trained (assistant) token
    attention_mask  [b, 1, s, s] bool or None: True where attention is *not* allowed
                    (megatron's convention); None means plain causal
    position_ids    [b, s] int64
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    position_ids: torch.Tensor
    lengths: Optional[List[List[int]]] = None
    """Packed rows: the lengths of each row's examples, in order (for :func:`to_thd`)."""
    packed_seq_params: Optional[Any] = None
    """One ``thd`` row (:func:`to_thd`): megatron's ``PackedSeqParams`` of its examples."""

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device) -> "LMBatch":
        am = None if self.attention_mask is None else self.attention_mask.to(device)
        return LMBatch(self.tokens.to(device), self.labels.to(device), self.loss_mask.to(device),
                       am, self.position_ids.to(device), self.lengths, params_to(self.packed_seq_params, device))


def _shifted(ids: Sequence[int], mask: Sequence[bool]) -> Tuple[List[int], List[float]]:
    """Targets and their loss weights for one example: position t predicts ids[t+1]."""
    labels = list(ids[1:]) + [0]
    weights = [1.0 if m else 0.0 for m in mask[1:]] + [0.0]
    return labels, weights


def pad_examples(examples: Sequence[Example], seq_length: int, pad_id: int,
                 rows: Optional[int] = None) -> LMBatch:
    """One example per row, right-padded; ``rows`` adds empty rows up to that count."""
    n = rows or len(examples)
    if len(examples) > n:
        raise ValueError(f"{len(examples)} examples do not fit in {n} rows")
    tokens = torch.full((n, seq_length), pad_id, dtype=torch.long)
    labels = torch.zeros((n, seq_length), dtype=torch.long)
    loss_mask = torch.zeros((n, seq_length), dtype=torch.float32)
    for r, (ids, mask) in enumerate(examples):
        if len(ids) > seq_length:
            raise ValueError(f"example of {len(ids)} tokens exceeds seq_length={seq_length}")
        lab, w = _shifted(ids, mask)
        tokens[r, :len(ids)] = torch.tensor(list(ids))
        labels[r, :len(ids)] = torch.tensor(lab)
        loss_mask[r, :len(ids)] = torch.tensor(w)
    positions = torch.arange(seq_length).unsqueeze(0).expand(n, -1).contiguous()
    return LMBatch(tokens, labels, loss_mask, None, positions)


def segments_to_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` segment ids -> ``[b, 1, s, s]`` bool, True where query i may NOT attend
    key j (j > i, or another segment)."""
    s = segments.shape[1]
    same = segments.unsqueeze(2) == segments.unsqueeze(1)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return ~(same & causal).unsqueeze(1)


def pack_examples(examples: Sequence[Example], seq_length: int, pad_id: int,
                  row_multiple: int = 1, attention_mask: bool = True) -> LMBatch:
    """First-fit packing in order; the row count is rounded up to ``row_multiple``.
    ``attention_mask=False``: no block-diagonal mask (rows going to :func:`to_thd`)."""
    rows: List[List[int]] = []  # example indices per row
    room: List[int] = []
    for i, (ids, _) in enumerate(examples):
        if len(ids) > seq_length:
            raise ValueError(f"example of {len(ids)} tokens exceeds seq_length={seq_length}")
        for r, free in enumerate(room):
            if len(ids) <= free:
                rows[r].append(i)
                room[r] -= len(ids)
                break
        else:
            rows.append([i])
            room.append(seq_length - len(ids))
    n = -(-len(rows) // row_multiple) * row_multiple
    tokens = torch.full((n, seq_length), pad_id, dtype=torch.long)
    labels = torch.zeros((n, seq_length), dtype=torch.long)
    loss_mask = torch.zeros((n, seq_length), dtype=torch.float32)
    segments = torch.full((n, seq_length), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for seg, i in enumerate(members):
            ids, mask = examples[i]
            lab, w = _shifted(ids, mask)
            k = len(ids)
            tokens[r, pos:pos + k] = torch.tensor(list(ids))
            labels[r, pos:pos + k] = torch.tensor(lab)
            loss_mask[r, pos:pos + k] = torch.tensor(w)
            segments[r, pos:pos + k] = seg
            pos += k
    # Padding positions form their own segment per position (they attend only themselves).
    pad_seg = -1 - torch.arange(seq_length).unsqueeze(0).expand(n, -1)
    segments = torch.where(segments >= 0, segments, pad_seg)
    positions = torch.arange(seq_length).unsqueeze(0).expand(n, -1).contiguous()
    lengths = [[len(examples[i][0]) for i in members] for members in rows] + [[] for _ in range(n - len(rows))]
    mask = segments_to_attention_mask(segments) if attention_mask else None
    return LMBatch(tokens, labels, loss_mask, mask, positions, lengths)


def thd_tokens(b: LMBatch) -> int:
    """The tokens of the examples in packed rows (:func:`pack_examples`)."""
    return sum(sum(row) for row in b.lengths or [])


def to_thd(b: LMBatch, row: Optional[int] = None, multiple: int = 8) -> LMBatch:
    """Packed rows (:func:`pack_examples`) as one row of their examples end to end in
    megatron's ``thd`` layout (``packed_seq_params``; attention stays within each example
    through the attention kernel instead of a dense mask, positions restart at 0),
    ``row`` tokens long (pipeline stages: the same for every microbatch of a step), by
    default the examples' tokens rounded up to ``multiple``. The summed loss is
    unchanged: the same tokens, labels and loss mask, in another order."""
    if b.lengths is None:
        raise ValueError("to_thd needs packed rows (pack_examples)")
    parts = {"tokens": [], "labels": [], "loss_mask": []}
    lens: List[int] = []
    for r, members in enumerate(b.lengths):
        pos = 0
        for n in members:
            for k in parts:
                parts[k].append(getattr(b, k)[r, pos:pos + n])
            lens.append(n)
            pos += n
    used = sum(lens)
    if not lens:
        raise ValueError("to_thd: the rows hold no example")
    if row is None:
        from megarlhf.models.llama import pad_to

        row = pad_to(used, multiple)
    params, positions, _ = thd_layout(lens, row)
    pad = row - used
    # the pad tokens form sequences of their own, outside the loss: their ids are never read
    cat = lambda k: torch.cat(parts[k] + [torch.zeros(pad, dtype=getattr(b, k).dtype)])[None]  # noqa: E731
    return LMBatch(cat("tokens"), cat("labels"), cat("loss_mask"), None, positions, None, params)


@dataclass
class PairBatch:
    """Preference pairs for one microbatch: row ``2i`` is pair i's chosen sequence and row
    ``2i + 1`` its rejected one, so one forward covers both.

    tokens, labels, loss_mask, position_ids as in :class:`LMBatch` (``[2n, s]``, or one
    packed row ``[1, T]`` with ``packed_seq_params``; the loss mask marks response
    tokens), ``last_index [2n]`` the last real token of each sequence (where a reward
    model's score is read; in the per-sequence layout of :meth:`seqwise`),
    ``ref_logprobs [2n]`` precomputed reference sequence log-probs (or None), ``margin
    [n]`` per-pair reward margins (or None).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    last_index: torch.Tensor
    ref_logprobs: Optional[torch.Tensor] = None
    margin: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    """``[n]`` 1 for real pairs, 0 for filler pairs that only complete a microbatch."""
    packed_seq_params: Optional[Any] = None
    """Packed rows only: megatron's ``PackedSeqParams`` (``thd``) of the row's sequences."""
    gather: Optional[torch.Tensor] = None
    """Packed rows only (:func:`pack_pairs`): ``[2n, L]`` where each sequence's tokens sit
    in the flattened batch ``[rows * s]``, in order (``rows * s`` past a sequence's end:
    reads as 0). None: row ``i`` is sequence ``i``."""

    @property
    def num_pairs(self) -> int:
        if self.gather is not None:
            return self.gather.shape[0] // 2
        return self.tokens.shape[0] // 2

    def seqwise(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token ``x [rows, s, ...]`` of the model's layout -> one right-padded row per
        sequence ``[2n, L, ...]`` (chosen, rejected interleaved; zeros past each end), the
        layout ``last_index`` and the per-sequence functions read. The identity for padded
        batches."""
        return x if self.gather is None else read_back(x, self.gather)

    def weights(self) -> torch.Tensor:
        return torch.ones(self.num_pairs, device=self.tokens.device) if self.valid is None else self.valid

    def to(self, device) -> "PairBatch":
        opt = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairBatch(self.tokens.to(device), self.labels.to(device), self.loss_mask.to(device),
                         self.position_ids.to(device), self.last_index.to(device),
                         opt(self.ref_logprobs), opt(self.margin), opt(self.attention_mask),
                         opt(self.valid), params_to(self.packed_seq_params, device), opt(self.gather))


def params_to(p, device):
    """``PackedSeqParams`` with its cumulative lengths on ``device`` (None stays None)."""
    if p is None:
        return None
    import dataclasses

    return dataclasses.replace(p, cu_seqlens_q=p.cu_seqlens_q.to(device), cu_seqlens_kv=p.cu_seqlens_kv.to(device))


def pair_batch(pairs: Sequence[Tuple[Example, Example]], seq_length: int, pad_id: int,
               ref_logprobs: Optional[Sequence[Tuple[float, float]]] = None,
               margins: Optional[Sequence[float]] = None, num_pairs: Optional[int] = None) -> PairBatch:
    """Right-padded chosen/rejected rows, interleaved; ``num_pairs`` repeats the last pair
    as zero-weight filler so every microbatch has the same shape (pipeline stages need it)."""
    real = len(pairs)
    if num_pairs is not None and num_pairs > real:
        pairs = list(pairs) + [pairs[-1]] * (num_pairs - real)
        if ref_logprobs is not None:
            ref_logprobs = list(ref_logprobs) + [ref_logprobs[-1]] * (num_pairs - real)
        if margins is not None:
            margins = list(margins) + [margins[-1]] * (num_pairs - real)
    rows: List[Example] = [side for pair in pairs for side in pair]
    lm = pad_examples(rows, seq_length, pad_id)
    last = torch.tensor([len(ids) - 1 for ids, _ in rows], dtype=torch.long)
    ref = None if ref_logprobs is None else torch.tensor(
        [x for pair in ref_logprobs for x in pair], dtype=torch.float32)
    margin = None if margins is None else torch.tensor(list(margins), dtype=torch.float32)
    valid = None
    if len(pairs) > real:
        valid = torch.zeros(len(pairs))
        valid[:real] = 1.0
    return PairBatch(lm.tokens, lm.labels, lm.loss_mask, lm.position_ids, last, ref, margin,
                     valid=valid)


def pack_pairs(pairs: Sequence[Tuple[Example, Example]], budget: int, pad_id: int,
               ref_logprobs: Optional[Sequence[Tuple[float, float]]] = None,
               margins: Optional[Sequence[float]] = None, trim: bool = False,
               multiple: int = 8) -> List[PairBatch]:
    """Pairs packed end to end into microbatches of one row of at most ``budget`` tokens,
    in order, a pair's two sequences in the same microbatch: megatron's ``thd`` layout
    (``packed_seq_params``, each sequence attending to itself only, positions from 0 in
    each). Each row is as long as its sequences rounded up to ``multiple``, or without
    ``trim`` (pipeline stages, whose microbatches share one shape) as long as the longest
    of the call's rows; the pad tokens after the sequences form sequences of their own."""
    groups, first, used = [], 0, 0
    for i, ((c, _), (r, _)) in enumerate(pairs):
        need = len(c) + len(r)
        if need > budget:
            raise ValueError(f"pair {i} ({len(c)} + {len(r)} tokens) does not fit in a microbatch of "
                             f"{budget} tokens")
        if used + need > budget:
            groups.append((first, i, used))
            first, used = i, 0
        used += need
    if pairs:
        groups.append((first, len(pairs), used))
    from megarlhf.models.llama import pad_to

    rows = [pad_to(u, multiple) for _, _, u in groups]
    if not trim and rows:
        rows = [max(rows)] * len(rows)
    return [_packed(pairs[a:b], a, row, pad_id, ref_logprobs, margins) for (a, b, _), row in zip(groups, rows)]


def thd_layout(lengths: Sequence[int], row: int):
    """Sequences of ``lengths`` packed end to end in one row of ``row`` tokens (megatron's
    ``thd`` layout); the pad tokens after them form sequences of their own, none longer
    than the longest real one. Returns ``(packed_seq_params, position_ids [1, row], gather
    [n, max(lengths)])``: positions restart at 0 for each sequence; ``gather`` holds where
    each sequence's tokens sit in the row (``row`` past its end), for
    :meth:`PairBatch.seqwise`-style read-back."""
    from megatron.core.packed_seq_params import PackedSeqParams

    used, width = sum(lengths), max(lengths)
    if used > row:
        raise ValueError(f"{used} tokens do not fit in a packed row of {row}")
    pad = row - used
    spans = list(lengths) + [width] * (pad // width) + ([pad % width] if pad % width else [])
    positions = torch.cat([torch.arange(n) for n in spans])[None]
    cu = torch.tensor([0] + spans, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    gather = torch.full((len(lengths), width), row, dtype=torch.long)
    for k, n in enumerate(lengths):
        gather[k, :n] = torch.arange(int(cu[k]), int(cu[k]) + n)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=width,
                             max_seqlen_kv=width)
    return params, positions, gather


def read_back(x: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """Per-token ``x [1, row, ...]`` of a packed row -> ``[n, L, ...]`` one right-padded
    row per sequence (zeros past each end), through :func:`thd_layout`'s ``gather``."""
    flat = x.reshape(-1, *x.shape[2:])
    return torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])[gather]


def _packed(pairs, first: int, row: int, pad_id: int, ref_logprobs, margins) -> PairBatch:
    """The one-row ``thd`` :class:`PairBatch` of ``pairs`` (``pairs[0]`` is pair ``first``),
    ``row`` tokens long."""
    seqs = [side for pair in pairs for side in pair]
    lengths = [len(ids) for ids, _ in seqs]
    used = sum(lengths)
    ids_all, labels, weights = [], [], []
    for ids, mask in seqs:
        lab, w = _shifted(ids, mask)
        ids_all += list(ids)
        labels += lab
        weights += w
    pad = row - used
    params, positions, gather = thd_layout(lengths, row)
    tokens = torch.tensor(ids_all + [pad_id] * pad, dtype=torch.long)[None]
    label_t = torch.tensor(labels + [0] * pad, dtype=torch.long)[None]
    loss_mask = torch.tensor(weights + [0.0] * pad, dtype=torch.float32)[None]
    upto = first + len(pairs)
    ref = None if ref_logprobs is None else torch.tensor(
        [x for pair in ref_logprobs[first:upto] for x in pair], dtype=torch.float32)
    margin = None if margins is None else torch.tensor(list(margins[first:upto]), dtype=torch.float32)
    return PairBatch(tokens, label_t, loss_mask, positions, torch.tensor(lengths) - 1, ref, margin,
                     gather=gather, packed_seq_params=params)
