"""PPO math as pure functions (torch only): per-token KL and rewards, GAE, whitening,
the clipped policy and value losses, and the KL coefficient controllers.

Layout. Every per-token tensor is ``[b, s]`` and aligned on *label positions*: index ``t``
holds the quantity for the token that position ``t`` predicts (``labels[:, t]``), as the
training forward pass produces log-probs. ``mask`` is 1 on response tokens and 0 on the
prompt and padding; a row's response is one contiguous run of ones.

Sources: Ziegler et al. 2019 (per-token KL penalty, adaptive controller), Schulman et al.
2016 (GAE), Schulman et al. 2017 (clipped surrogate), Schulman's "Approximating KL
divergence" note (k1, k3), Ivison et al. 2024 (the settings the paper ran).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["KL_ESTIMATORS", "kl_estimate", "token_rewards", "gae", "masked_mean", "masked_var",
           "masked_whiten", "policy_loss", "value_loss", "explained_variance", "KLController",
           "last_token_index", "leave_one_out"]

KL_ESTIMATORS = ("k1", "k3", "abs")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1",
                clamp_min: Optional[float] = None, clamp_max: Optional[float] = None) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of the sampled tokens.

    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = exp(-k1) - 1 + k1 (unbiased,
    never negative, lower variance); abs = |k1|. Optionally clamped to [clamp_min, clamp_max]
    (``clamp_min=0`` removes the reward for moving *towards* low reference probability).
    """
    d = logp - ref_logp
    if estimator == "k1":
        kl = d
    elif estimator == "k3":
        kl = torch.expm1(-d) + d
    elif estimator == "abs":
        kl = d.abs()
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}: expected one of {KL_ESTIMATORS}")
    if clamp_min is not None or clamp_max is not None:
        kl = kl.clamp(min=clamp_min, max=clamp_max)
    return kl


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """``[b]`` index of each row's last masked position (0 for an empty row)."""
    s = mask.shape[-1]
    pos = torch.arange(s, device=mask.device).expand_as(mask)
    return torch.where(mask > 0, pos, torch.zeros_like(pos)).amax(dim=-1)


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """Per-token rewards ``[b, s]``: ``-kl_coef * kl`` on every response token and the
    sequence score ``[b]`` added on the last response token; 0 off the mask."""
    r = -kl_coef * kl * mask
    last = last_token_index(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    has = mask.sum(-1) > 0
    r[rows[has], last[has]] += scores[has].to(r.dtype)
    return r


def leave_one_out(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each score minus the mean of the other ``k - 1`` scores of its group; ``scores`` holds
    consecutive groups of ``k`` (the samples of one prompt)."""
    if k < 2 or scores.numel() % k:
        raise ValueError(f"leave_one_out: {scores.numel()} scores do not form groups of k={k} >= 2")
    g = scores.reshape(-1, k)
    return (g - (g.sum(-1, keepdim=True) - g) / (k - 1)).reshape(scores.shape)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens of each row.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V
    and A zero after a row's last response token (the episode ends there). Returns
    (advantages, returns = advantages + values), both ``[b, s]`` and 0 off the mask.
    """
    m = mask.to(values.dtype)
    v = values * m
    r = rewards * m
    adv = torch.zeros_like(v)
    next_v = torch.zeros_like(v[:, 0])
    next_a = torch.zeros_like(v[:, 0])
    for t in range(v.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = (delta + gamma * lam * next_a) * m[:, t]
        adv[:, t] = a
        # Positions before the response (the prompt) pass nothing backwards either.
        next_v = v[:, t]
        next_a = a
    return adv, (adv + v) * m


def masked_mean(x: torch.Tensor, mask: torch.Tensor,
                all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """Token-weighted mean of ``x`` over ``mask`` (over all ranks when ``all_reduce``, an
    in-place sum over data-parallel replicas, is given)."""
    s = torch.stack([(x * mask).sum(), mask.sum()]).double()
    if all_reduce is not None:
        all_reduce(s)
    return (s[0] / s[1].clamp(min=1)).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor,
               all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance) of ``x`` over ``mask``, token-weighted, optionally over ranks."""
    xd, md = x.double(), mask.double()
    s = torch.stack([(xd * md).sum(), (xd * xd * md).sum(), md.sum()])
    if all_reduce is not None:
        all_reduce(s)
    n = s[2].clamp(min=1)
    mean = s[0] / n
    var = (s[1] / n - mean * mean).clamp(min=0) * (n / (n - 1).clamp(min=1))
    return mean.to(x.dtype), var.to(x.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  all_reduce: Optional[Callable[[torch.Tensor], None]] = None,
                  eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the masked tokens (of every rank with ``all_reduce``);
    ``shift_mean=False`` only rescales (keeps the mean, as reward whitening does). 0 off
    the mask."""
    mean, var = masked_var(x, mask, all_reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped surrogate, per token: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    Returns the *sum* over masked tokens (the caller divides by the token count of the
    whole minibatch, so microbatch splits and DP layouts give the same gradient) and sums
    of: clipped tokens, approximate KL 0.5 * (log ratio)^2, ratio.
    """
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    stats = {
        "clipped": ((clipped > unclipped).to(mask.dtype) * mask).sum().detach(),
        "approx_kl": (0.5 * log_ratio.detach() ** 2 * mask).sum(),
        "ratio": (ratio.detach() * mask).sum(),
    }
    return (per_token * mask).sum(), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: Optional[float]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped value loss, per token: 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2);
    ``clip=None`` is the plain squared error. Returns the masked sum and the sum of
    clipped tokens."""
    err = (values - returns) ** 2
    if clip is None:
        per_token, n_clip = err, torch.zeros((), dtype=values.dtype)
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
        err_clip = (v_clip - returns) ** 2
        per_token = torch.maximum(err, err_clip)
        n_clip = ((err_clip > err).to(mask.dtype) * mask).sum().detach()
    return 0.5 * (per_token * mask).sum(), {"clipped": n_clip}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over masked tokens (1: perfect critic, 0: a constant)."""
    _, var_r = masked_var(returns, mask, all_reduce)
    _, var_d = masked_var(returns - values, mask, all_reduce)
    return 1.0 - var_d / var_r.clamp(min=1e-12)


@dataclass
class KLController:
    """The KL coefficient: fixed (the paper's runs) or adaptive (Ziegler et al. 2019):
    coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon after each step, where n is
    the number of sequences the KL was measured on."""

    coef: float
    target: Optional[float] = None
    horizon: int = 10000

    def update(self, kl: float, n: int) -> float:
        if self.target is not None:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + err * n / self.horizon
        return self.coef

    def state_dict(self) -> Dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.coef = float(state["coef"])
