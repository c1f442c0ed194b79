"""Policy losses and their token aggregation as pure functions (torch only), registered by
name.

A policy loss maps per-token log-probs of the current policy and of the policy that
sampled (``old``), and advantages, all ``[b, s]`` on label positions, to a per-token loss
``[b, s]`` (0 off the mask) and a per-token 0/1 "clipped" indicator:

  ppo_clip    Schulman et al. 2017: ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))``,
              ``rho = exp(log pi - log pi_old)``.
  dual_clip   Ye et al. 2020 ("Mastering complex control in MOBA games"): as ppo_clip, and
              for ``A < 0`` the loss is also capped at ``-c A`` (``c > 1``), so one token
              whose ratio exploded cannot dominate the batch.

Aggregation turns per-token losses into the minibatch's loss. It is written as per-token
weights and a per-row count so that megatron's per-token-loss reduction (sum of the
microbatches' loss sums over the sum of their counts, over every data-parallel rank)
gives the intended mean whatever the microbatch split or DP layout:

  token_mean                 sum of losses / number of response tokens (PPO as run by
                             Ivison et al. 2024; DAPO's token-level loss)
  seq_mean_token_mean        mean over sequences of each sequence's token mean (GRPO as
                             Shao et al. 2024 write it)
  seq_mean_token_sum_norm    mean over sequences of the token sum / a constant length
                             ``L`` (Dr. GRPO, Liu et al. 2025: no length bias)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

__all__ = ["PolicyLoss", "POLICY_LOSSES", "register_policy_loss", "policy_token_loss",
           "AGGREGATIONS", "loss_weights"]

# (log pi [b, s], log pi_old [b, s], A [b, s], clip eps, dual-clip c) -> (loss [b, s], clipped [b, s])
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], Tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PolicyLoss:
    name: str
    fn: LossFn


POLICY_LOSSES: Dict[str, PolicyLoss] = {}


def register_policy_loss(name: str):
    """Decorator: add a per-token policy loss to :data:`POLICY_LOSSES` under ``name``."""
    def add(fn: LossFn):
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered twice")
        POLICY_LOSSES[name] = PolicyLoss(name, fn)
        return fn
    return add


def policy_token_loss(name: str, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip: float, dual_clip: float = 3.0
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and clipped indicator ``[b, s]`` of the loss registered as ``name``,
    both 0 off the mask (masked positions never reach the exponent)."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}: expected one of {', '.join(POLICY_LOSSES)}")
    m = mask.to(logp.dtype)
    loss, clipped = POLICY_LOSSES[name].fn((logp - old_logp) * m, advantages * m, clip, dual_clip)
    return loss * m, clipped.to(m.dtype) * m


@register_policy_loss("ppo_clip")
def _ppo_clip(log_ratio, adv, clip, dual_clip):
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped), clipped > unclipped


@register_policy_loss("dual_clip")
def _dual_clip(log_ratio, adv, clip, dual_clip):
    loss, clipped = _ppo_clip(log_ratio, adv, clip, dual_clip)
    cap = -dual_clip * adv
    capped = (adv < 0) & (loss > cap)
    return torch.where(capped, cap, loss), clipped | capped


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def loss_weights(mask: torch.Tensor, mode: str, norm_length: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weights ``[b, s]``, counts ``[b]``) such that ``sum(w * loss) / sum(counts)`` over any
    set of rows is the aggregation ``mode`` of their per-token losses; ``norm_length`` is
    Dr. GRPO's constant ``L`` (the generation budget). Rows without tokens count 0."""
    m = mask if mask.is_floating_point() else mask.float()
    n_tok = m.sum(-1)
    has = (n_tok > 0).float()
    if mode == "token_mean":
        return m, n_tok
    if mode == "seq_mean_token_mean":
        return m / n_tok.clamp(min=1).unsqueeze(-1), has
    if mode == "seq_mean_token_sum_norm":
        return m, has * float(norm_length)
    raise ValueError(f"unknown loss aggregation {mode!r}: expected one of {', '.join(AGGREGATIONS)}")
