"""Token sampling as tensor ops on the model's device (torch only, no host round trip).

Randomness is counter-based: the uniform that picks response token ``j`` of prompt ``i``
is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
of the counter ``(j, i mod 2^32, i div 2^32, 0)`` under the key ``(seed mod 2^32,
seed div 2^32)``, computed with integer tensor ops. It depends on nothing else: not the
rank, the slot the prompt runs in, the batch beside it, the vocabulary padding or the
device. A token is drawn by inverse CDF over the real vocabulary in float64.

    u = philox_uniforms(seed, prompt_index, steps)      # [b, n] in [0, 1)
    new, sample_lp, policy_lp = pick(logits, params, u[:, j])
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["philox4x32", "philox_uniforms", "filter_logits", "pick"]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57          # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85          # key schedule (Weyl sequence)


def _mulhilo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` (``a`` a 32-bit constant, ``b`` int64 holding
    32-bit values), exactly, without int64 overflow: ``b`` is split in 16-bit halves."""
    hi16, lo16 = b >> 16, b & 0xFFFF
    t, u = hi16 * a, lo16 * a                 # each < 2^48
    lo = (((t & 0xFFFF) << 16) + u) & _MASK32
    hi = (t + (u >> 16)) >> 16
    return hi, lo


def philox4x32(counter: Tuple[torch.Tensor, ...], key: Tuple[torch.Tensor, torch.Tensor],
               rounds: int = 10) -> Tuple[torch.Tensor, ...]:
    """Philox4x32 of four 32-bit counter words and two key words (int64 tensors holding
    values below 2^32, broadcastable); returns four such words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_uniforms(seed: int, index: torch.Tensor, steps: int) -> torch.Tensor:
    """``[len(index), steps]`` float64 uniforms in [0, 1): row ``r`` is the stream of prompt
    ``index[r]`` (int64, on the device the result should be on), column ``j`` its
    ``j``-th response token. 53 random bits each (two Philox output words)."""
    dev = index.device
    i = index.to(torch.int64)[:, None]
    j = torch.arange(steps, dtype=torch.int64, device=dev)[None, :]
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    seed = int(seed) % (1 << 64)
    key = (zero + (seed & _MASK32), zero + (seed >> 32))
    w0, w1, _, _ = philox4x32((j & _MASK32, i & _MASK32, (i >> 32) & _MASK32, zero), key)
    bits = ((w0 >> 5) << 26) + (w1 >> 6)      # 27 + 26 = 53 bits
    return bits.to(torch.float64) * (1.0 / (1 << 53))


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k and top-p applied to ``[b, V]`` fp32 logits."""
    logits = logits / temperature
    neg = torch.finfo(logits.dtype).min
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep a token while the mass before it is below top_p (the first is always kept)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, neg)
    return logits


def pick(logits: torch.Tensor, params, u: torch.Tensor, shaped: Optional[torch.Tensor] = None
         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next tokens ``[b]`` from fp32 logits ``[b, V]`` (the real vocabulary only) and
    uniforms ``[b]``; returns the tokens, their log-probs under the sampling distribution
    (0 for greedy) and under the raw policy (temperature 1, no truncation). ``shaped``:
    the logits a logits processor made of ``logits``, sampled from instead. ``params``
    is a :class:`~megarlhf.rollout.engine.SamplingParams`. Device ops only."""
    # row-major first: every op below works along rows (the decoder's few-row output
    # product is column-major; a log-softmax over it costs 2x its copy)
    logits = logits.contiguous()
    policy = torch.log_softmax(logits, dim=-1)
    if shaped is not None:
        logits = shaped
    if params.greedy:
        new = logits.argmax(-1)
        return new, torch.zeros_like(new, dtype=policy.dtype), policy.gather(-1, new[:, None])[:, 0]
    plain = params.temperature == 1.0 and not params.top_k and params.top_p >= 1.0 and shaped is None
    filt = policy if plain else torch.log_softmax(
        filter_logits(logits, params.temperature, params.top_k, params.top_p), dim=-1)
    cdf = filt.exp().cumsum(-1, dtype=torch.float64)  # probabilities in fp32, summed in fp64
    total = cdf[:, -1:]
    # the first id whose CDF exceeds u * total: it raised the CDF, so its probability is > 0
    # (a zero-probability id never is: it leaves the CDF where it was). The target stays
    # below the total even where u * total rounds up to it.
    target = torch.minimum(u.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    new = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return new, filt.gather(-1, new[:, None])[:, 0], policy.gather(-1, new[:, None])[:, 0]
