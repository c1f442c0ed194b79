"""Advantage estimators as pure functions (torch only), registered by name.

Every estimator takes one :class:`AdvantageInputs` (the whole step's batch, identical on
every rank) and returns :class:`Advantages`: per-token advantages ``[n, s]`` aligned on
label positions as in :mod:`megarlhf.algos.ppo`, and returns for a critic when it has
one. Samples of one prompt are consecutive rows, ``group_size`` of them.

  gae           Schulman et al. 2016, with a critic: per-token reward ``-beta KL_t`` plus
                the score at the last token; ``delta_t = r_t + gamma V_{t+1} - V_t``,
                ``A_t = delta_t + gamma lam A_{t+1}`` (PPO as Ouyang et al. 2022 and
                Ivison et al. 2024 ran it).
  grpo          Shao et al. 2024 (DeepSeekMath, outcome supervision): every token of
                sample i gets ``(r_i - mean(r_group)) / (std(r_group) + eps)``; the KL
                term goes into the loss, not the reward.
  dr_grpo       Liu et al. 2025 ("Understanding R1-Zero-like training"): GRPO without the
                division by the group's std: ``r_i - mean(r_group)``.
  rloo          Ahmadian et al. 2024: sequence reward ``R_i = r_i - beta sum_t KL_it``,
                advantage ``R_i - mean_{j != i} R_j`` on every token of sample i.
  reinforce_pp  Hu 2025 (REINFORCE++): per-token reward ``-beta KL_t`` plus the score at
                the last token, return-to-go ``G_t = sum_{u >= t} gamma^(u-t) r_u``,
                whitened over every token of the batch.

``r_i`` is the sequence score after the missing-EOS penalty; ``KL_t`` the per-token KL
estimate (0 off the mask); ``beta`` the KL coefficient (0 where the KL is a loss term).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from megarlhf.algos.ppo import gae, masked_whiten, token_rewards

__all__ = ["AdvantageInputs", "Advantages", "Estimator", "ESTIMATORS", "register_estimator",
           "estimate_advantages", "group_baseline", "returns_to_go"]


@dataclass(frozen=True)
class AdvantageInputs:
    """One step's batch.

    scores      [n] float   sequence scores (after the missing-EOS penalty)
    kl          [n, s]      per-token KL estimate of the policy against the reference (0 off the mask)
    mask        [n, s]      1 on response tokens (label positions)
    values      [n, s]      the critic's old values (None without a critic)
    """

    scores: torch.Tensor
    kl: torch.Tensor
    mask: torch.Tensor
    values: Optional[torch.Tensor] = None
    kl_coef: float = 0.0
    """beta: weight of the KL in the reward (0 when it is a loss term)."""
    group_size: int = 1
    """Samples per prompt (consecutive rows)."""
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    """gae only: rescale the per-token rewards by their std over the batch (mean kept)."""
    eps: float = 1e-6
    """Added to the group's std (grpo)."""


@dataclass(frozen=True)
class Advantages:
    """advantages [n, s] (0 off the mask); returns [n, s] for the critic (None without one);
    rewards [n, s], the per-token rewards the estimator used (for metrics)."""

    advantages: torch.Tensor
    returns: Optional[torch.Tensor]
    rewards: torch.Tensor


@dataclass(frozen=True)
class Estimator:
    name: str
    fn: Callable[[AdvantageInputs], Advantages]
    needs_critic: bool
    """Reads ``values`` and yields returns for a critic."""
    needs_groups: bool
    """Needs several samples per prompt (``group_size >= 2``)."""
    kl_in_reward: bool
    """Takes the KL penalty in the reward (else the recipe puts it in the loss)."""


ESTIMATORS: Dict[str, Estimator] = {}


def register_estimator(name: str, needs_critic: bool = False, needs_groups: bool = False,
                       kl_in_reward: bool = True):
    """Decorator: add an advantage estimator to :data:`ESTIMATORS` under ``name``."""
    def add(fn: Callable[[AdvantageInputs], Advantages]):
        if name in ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ESTIMATORS[name] = Estimator(name, fn, needs_critic, needs_groups, kl_in_reward)
        return fn
    return add


def estimate_advantages(name: str, x: AdvantageInputs) -> Advantages:
    """Run the estimator registered as ``name``, checking what it needs."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}: expected one of {', '.join(ESTIMATORS)}")
    est = ESTIMATORS[name]
    if est.needs_critic and x.values is None:
        raise ValueError(f"advantage estimator {name!r} needs the critic's values")
    if est.needs_groups and (x.group_size < 2 or x.scores.numel() % x.group_size):
        raise ValueError(f"advantage estimator {name!r} needs groups of >= 2 samples per prompt; "
                         f"got {x.scores.numel()} rows in groups of {x.group_size}")
    return est.fn(x)


def group_baseline(scores: torch.Tensor, k: int, leave_one_out: bool = False) -> torch.Tensor:
    """``[n]`` baseline of each score from its group of ``k`` consecutive rows: the group's
    mean, or (``leave_one_out``) the mean of the group's other ``k - 1`` scores."""
    g = scores.reshape(-1, k)
    total = g.sum(-1, keepdim=True)
    base = (total - g) / (k - 1) if leave_one_out else (total / k).expand_as(g)
    return base.reshape(scores.shape)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = sum_{u >= t} gamma^(u-t) r_u`` over each row's masked positions (0 off it)."""
    m = mask.to(rewards.dtype)
    r = rewards * m
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = (r[:, t] + gamma * running) * m[:, t]
        out[:, t] = running
    return out


def _on_tokens(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast ``[n]`` to every masked token of its row."""
    return per_row.to(mask.dtype).unsqueeze(-1) * mask


def _last_token_reward(x: AdvantageInputs, scores: torch.Tensor) -> torch.Tensor:
    return token_rewards(x.kl, scores, x.mask, x.kl_coef)


@register_estimator("gae", needs_critic=True)
def _gae(x: AdvantageInputs) -> Advantages:
    rewards = _last_token_reward(x, x.scores)
    if x.whiten_rewards:
        rewards = masked_whiten(rewards, x.mask, shift_mean=False)
    adv, ret = gae(rewards, x.values, x.mask, x.gamma, x.lam)
    return Advantages(adv, ret, rewards)


@register_estimator("grpo", needs_groups=True, kl_in_reward=False)
def _grpo(x: AdvantageInputs) -> Advantages:
    g = x.scores.reshape(-1, x.group_size)
    std = g.std(-1, keepdim=True).expand_as(g).reshape(x.scores.shape)  # unbiased, as DeepSeekMath/TRL
    adv = (x.scores - group_baseline(x.scores, x.group_size)) / (std + x.eps)
    return Advantages(_on_tokens(adv, x.mask), None, _last_token_reward(x, x.scores))


@register_estimator("dr_grpo", needs_groups=True, kl_in_reward=False)
def _dr_grpo(x: AdvantageInputs) -> Advantages:
    adv = x.scores - group_baseline(x.scores, x.group_size)
    return Advantages(_on_tokens(adv, x.mask), None, _last_token_reward(x, x.scores))


@register_estimator("rloo", needs_groups=True)
def _rloo(x: AdvantageInputs) -> Advantages:
    seq_reward = x.scores - x.kl_coef * (x.kl * x.mask).sum(-1)
    adv = seq_reward - group_baseline(seq_reward, x.group_size, leave_one_out=True)
    return Advantages(_on_tokens(adv, x.mask), None, _last_token_reward(x, x.scores))


@register_estimator("reinforce_pp")
def _reinforce_pp(x: AdvantageInputs) -> Advantages:
    rewards = _last_token_reward(x, x.scores)
    adv = masked_whiten(returns_to_go(rewards, x.mask, x.gamma), x.mask)
    return Advantages(adv, None, rewards)
