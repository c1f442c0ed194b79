"""The rollout batch of a PPO-style step and the microbatches the roles run on (torch only).

Every per-token tensor is ``[n, s]`` and aligned on *label positions*: index ``t`` holds
the quantity of the token that position ``t`` predicts (``labels[:, t]``); ``mask`` is 1
on response tokens. Samples of one prompt are consecutive rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

__all__ = ["Rollout", "build_rollout", "pad_responses", "Microbatch", "PER_TOKEN", "microbatches",
           "minibatch_has_tokens", "FINISH_CODES"]

FINISH_CODES = {"eos": 0, "stop": 1, "length": 2}
"""``Rollout.finish``: the end-of-sequence token, another stop id, or max_new_tokens."""


@dataclass
class Rollout:
    """The whole step's sequences, identical on every rank.

    tokens            [n, s] int64   prompt + response, right-padded
    labels            [n, s] int64   tokens shifted left (the token each position predicts)
    mask              [n, s] float32 1 on response tokens (label positions)
    last_index        [n] int64      each row's last real token (where a reward model reads)
    response_len      [n] int64
    finish            [n] int64      :data:`FINISH_CODES`
    rollout_logprobs  [n, s] float32 the sampler's log-probs of the response tokens
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    last_index: torch.Tensor
    response_len: torch.Tensor
    finish: torch.Tensor
    rollout_logprobs: torch.Tensor

    @property
    def n(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq(self) -> int:
        return self.tokens.shape[1]

    def permuted(self, order: torch.Tensor) -> "Rollout":
        """The same rows in ``order``."""
        return Rollout(*(getattr(self, f.name)[order] for f in dataclasses.fields(self)))


def build_rollout(prompts: List[List[int]], resp: torch.Tensor, resp_len: torch.Tensor,
                  finish: torch.Tensor, resp_lp: torch.Tensor, pad_id: int, multiple: int = 8) -> Rollout:
    """Rows ``prompt + response``, right-padded to the longest rounded up to ``multiple``
    (what every role's layout needs: :func:`~megarlhf.models.llama.sequence_multiple`).
    ``resp``/``resp_lp`` are ``[n, max_new]``, ``resp_len``/``finish`` ``[n]``."""
    n = len(prompts)
    lens = [len(p) + int(l) for p, l in zip(prompts, resp_len)]
    seq = -(-max(lens) // multiple) * multiple
    tokens = torch.full((n, seq), pad_id, dtype=torch.long)
    labels = torch.zeros((n, seq), dtype=torch.long)
    mask = torch.zeros((n, seq))
    lp = torch.zeros((n, seq))
    for i, p in enumerate(prompts):
        lp_len, r = len(p), int(resp_len[i])
        row = torch.tensor(list(p) + resp[i, :r].tolist(), dtype=torch.long)
        tokens[i, :len(row)] = row
        labels[i, :len(row) - 1] = row[1:]
        mask[i, lp_len - 1:lp_len - 1 + r] = 1.0
        lp[i, lp_len - 1:lp_len - 1 + r] = resp_lp[i, :r]
    last = torch.tensor(lens) - 1
    return Rollout(tokens, labels, mask, last, resp_len.clone(), finish.clone(), lp)


def pad_responses(response_ids: List[List[int]], logprobs: List[List[float]], finish_reasons: List[str],
                  max_new: int):
    """An engine's ragged output -> (ids ``[n, max_new]``, lengths ``[n]``, finish codes
    ``[n]``, log-probs ``[n, max_new]``)."""
    n = len(response_ids)
    ids = torch.zeros(n, max_new, dtype=torch.long)
    lps = torch.zeros(n, max_new)
    for i, (r, lp) in enumerate(zip(response_ids, logprobs)):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        lps[i, :len(lp)] = torch.tensor(lp)
    lens = torch.tensor([len(r) for r in response_ids], dtype=torch.long)
    codes = torch.tensor([FINISH_CODES[f] for f in finish_reasons], dtype=torch.long)
    return ids, lens, codes, lps


# What a microbatch carries beyond the rollout's own rows, zeros until known.
PER_TOKEN = ("old_logprobs", "ref_logprobs", "advantages", "old_values", "returns", "loss_weights")


@dataclass
class Microbatch:
    """Rows of the rollout batch a role runs in one forward pass, ``[b, s]`` each.

    tokens, position_ids, labels          int64
    mask                                  float32 1 on response tokens
    old_logprobs, ref_logprobs            float32 the sampling policy's, the reference's
    advantages, old_values, returns       float32
    loss_weights                          float32 per-token weight of the policy loss
    loss_counts                           [b] float32 what each row adds to the loss's divisor
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor
    old_values: torch.Tensor
    returns: torch.Tensor
    loss_weights: torch.Tensor
    loss_counts: torch.Tensor
    packed_seq_params: Optional[Any] = None
    """Packed microbatches only: ``tokens``, ``position_ids`` and ``labels`` are then one
    row ``[1, T]`` of the rows' real tokens end to end (megatron's ``thd`` layout, these
    params); every other field keeps the ``[b, s]`` layout, which :meth:`unpack` maps the
    model's per-token outputs back to."""
    gather: Optional[torch.Tensor] = None
    """Packed only: ``[b, s]`` where each row's tokens sit in the packed row."""

    def to(self, device) -> "Microbatch":
        from megarlhf.data.batch import params_to

        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        moved = {k: (params_to(v, device) if k == "packed_seq_params" else None if v is None else v.to(device))
                 for k, v in moved.items()}
        return Microbatch(**moved)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """The model's per-token ``x [rows, s, ...]`` in the rows' ``[b, s, ...]`` layout
        (zeros where a row has no token); the identity for padded microbatches."""
        from megarlhf.data.batch import read_back

        return x if self.gather is None else read_back(x, self.gather)


def microbatches(ro: Rollout, rows, size: int, extra: Optional[Dict[str, torch.Tensor]] = None,
                 packing: bool = False, trim: bool = False, multiple: int = 8) -> List[Microbatch]:
    """``rows`` of ``ro`` (a ``range``, or a list of them: one pass over all) in
    microbatches of ``size`` rows; ``extra`` holds per-token tensors
    of :data:`PER_TOKEN` (``[n, s]``) and ``loss_counts`` (``[n]``), zeros where absent
    (``loss_weights`` defaults to the mask, ``loss_counts`` to each row's token count).
    ``packing``: the model sees each microbatch's rows as one row of their real tokens
    end to end (:class:`Microbatch`), as long as they are rounded up to ``multiple``, or
    without ``trim`` (pipeline stages: one shape per call) as long as the longest such."""
    from megarlhf.data.batch import thd_layout
    from megarlhf.models.llama import pad_to

    extra = dict(extra or {})
    extra.setdefault("loss_weights", ro.mask)
    extra.setdefault("loss_counts", ro.mask.sum(-1))
    zeros = torch.zeros_like(ro.mask)
    pos = torch.arange(ro.seq).unsqueeze(0)
    lengths = (ro.last_index + 1).tolist()
    ranges = [rows] if isinstance(rows, range) else list(rows)
    slices = [slice(s, min(s + size, r.stop)) for r in ranges for s in range(r.start, r.stop, size)]
    row_len = [pad_to(sum(lengths[sl]), multiple) for sl in slices]
    if not trim and row_len:
        row_len = [max(row_len)] * len(row_len)
    out = []
    for sl, row in zip(slices, row_len):
        tokens, labels, positions, params, gather = ro.tokens[sl], ro.labels[sl], None, None, None
        if packing:
            lens = lengths[sl]
            params, positions, gather = thd_layout(lens, row)
            pad = torch.zeros(row - sum(lens), dtype=torch.long)  # their own sequences: never read
            tokens = torch.cat([t[:n] for t, n in zip(tokens, lens)] + [pad])[None]
            labels = torch.cat([t[:n] for t, n in zip(labels, lens)] + [pad])[None]
            # per row [b, s]: the packed row's index of each of the row's tokens (T past its end)
            full = torch.full((len(lens), ro.seq), row, dtype=torch.long)
            full[:, :gather.shape[1]] = gather
            gather = full
        out.append(Microbatch(
            tokens=tokens, position_ids=positions if packing else pos.expand(sl.stop - sl.start, -1).contiguous(),
            labels=labels, mask=ro.mask[sl],
            **{k: extra.get(k, zeros)[sl] for k in PER_TOKEN}, loss_counts=extra["loss_counts"][sl],
            packed_seq_params=params, gather=gather))
    return out


def minibatch_has_tokens(mask: torch.Tensor, index: int, size: int) -> bool:
    """Whether minibatch ``index`` (rows ``[index * size, (index + 1) * size)`` over all DP
    ranks) has any response token: a minibatch of empty responses is skipped, since its
    per-token loss would divide by zero tokens."""
    return bool(mask[index * size:(index + 1) * size].sum() > 0)
