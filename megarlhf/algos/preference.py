"""Preference losses as pure functions (torch only): Bradley-Terry reward modelling and
DPO with its variants. Inputs are per-pair tensors ``[n]``; every function returns the
per-pair loss ``[n]`` (callers sum or average) so masking and batching stay outside.

Bradley-Terry (reward model):  ``-log sigma(r_c - r_r - m)``.
DPO (Rafailov et al. 2023), with ``h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))``:
  sigmoid (the paper's)          ``-log sigma(beta h)``
  conservative DPO (cDPO)        ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``
  IPO (Azar et al. 2023)         ``(h - 1 / (2 beta))^2``
Length normalisation (average instead of summed token log-probs) is applied to the
sequence log-probs before these functions (:func:`sequence_logprobs`).
RPO (Pang et al. 2024) adds ``alpha`` times the chosen response's per-token negative
log-likelihood (:func:`chosen_nll`) to each pair's DPO loss: each pair's NLL is its own
token mean, then pairs are averaged (Pang et al.'s normalisation). TRL's ``rpo_alpha``
differs in that: it averages the NLL over all chosen tokens of the batch, so long
responses weigh more there.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["bradley_terry_loss", "pool_rewards", "response_positions", "POOLINGS", "dpo_loss", "dpo_rewards", "sequence_logprobs", "chosen_nll",
           "LOSS_TYPES"]

LOSS_TYPES = ("sigmoid", "ipo")
POOLINGS = ("last", "min", "mean")


def response_positions(label_mask: torch.Tensor) -> torch.Tensor:
    """``[n, s]`` bool: positions whose *input* token is a response token, from a mask on
    label positions (position t marks the token it predicts, t + 1): shifted right by one."""
    out = torch.zeros_like(label_mask, dtype=torch.bool)
    out[:, 1:] = label_mask[:, :-1].bool()
    return out


def pool_rewards(values: torch.Tensor, response_mask: Optional[torch.Tensor], last_index: torch.Tensor,
                 pooling: str = "last") -> torch.Tensor:
    """One reward per row from per-token scalar values ``[n, s]``.

    ``last``: the value at ``last_index`` (the last real token; the paper's reward model).
    ``min``/``mean``: the minimum/mean over the positions whose input token belongs to the
    response (``response_mask [n, s]``, see :func:`response_positions`; unused, may be
    None, for ``last``), so every step of
    the answer takes part in the reward, not only the summary in the last token's state.
    """
    rows = torch.arange(values.shape[0], device=values.device)
    if pooling == "last":
        return values[rows, last_index]
    if response_mask is None:
        raise ValueError(f"pooling={pooling!r} needs the response mask")
    mask = response_mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("a row has no response token to pool over")
    if pooling == "min":
        return values.masked_fill(~mask, float("inf")).amin(-1)
    if pooling == "mean":
        m = mask.to(values.dtype)
        return (values * m).sum(-1) / m.sum(-1)
    raise ValueError(f"pooling={pooling!r}: expected one of {POOLINGS}")


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``[n]`` rewards -> ``[n]`` losses ``-log sigma(r_c - r_r - margin)``."""
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """Sum (or mean) of ``[n, s]`` token log-probs over ``mask`` (response tokens) -> ``[n]``."""
    mask = mask.to(token_logprobs.dtype)
    total = (token_logprobs * mask).sum(-1)
    if not average:
        return total
    return total / mask.sum(-1).clamp(min=1.0)


def dpo_rewards(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, beta: float):
    """Implicit rewards ``beta (log pi - log ref)`` of chosen and rejected, ``[n]`` each."""
    return beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss from sequence log-probs ``[n]`` of policy and reference."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        return (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)
                - label_smoothing * F.logsigmoid(-beta * h))
    if loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only")
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")


def chosen_nll(chosen_logprob_sum: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood ``[n]`` of the chosen responses, from their summed
    log-probs and response token counts (RPO's extra term)."""
    return -chosen_logprob_sum / chosen_tokens.to(chosen_logprob_sum.dtype).clamp(min=1.0)
