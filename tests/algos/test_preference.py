"""Preference losses against values worked out by hand."""

import math

import pytest
import torch

from megarlhf.algos.preference import (bradley_terry_loss, chosen_nll, dpo_loss, dpo_rewards,
                                       pool_rewards, response_positions, sequence_logprobs)


def lsig(x):
    return -math.log(1 + math.exp(-x))


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_bradley_terry_by_hand():
    # r_c - r_r = 1.5 - 0.5 = 1 -> -log sigma(1) = log(1 + e^-1) = 0.31326
    assert bradley_terry_loss(t(1.5), t(0.5)).item() == pytest.approx(0.3132617, abs=1e-6)
    assert bradley_terry_loss(t(0.0), t(0.0)).item() == pytest.approx(math.log(2))
    # margin 1: -log sigma(0) = log 2
    assert bradley_terry_loss(t(1.5), t(0.5), 1.0).item() == pytest.approx(math.log(2))
    per_pair_margin = bradley_terry_loss(t(1.0, 1.0), t(0.0, 0.0), t(0.0, 2.0))
    assert per_pair_margin.tolist() == pytest.approx([-lsig(1.0), -lsig(-1.0)])


def test_dpo_sigmoid_by_hand():
    # policy c/r = -10/-12, ref c/r = -11/-11: h = (1) - (-1) = 2; beta 0.1 -> -log sigma(0.2)
    loss = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    assert loss.item() == pytest.approx(-lsig(0.2), abs=1e-9)
    assert loss.item() == pytest.approx(0.5981389, abs=1e-6)
    rc, rr = dpo_rewards(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    assert (rc.item(), rr.item()) == pytest.approx((0.1, -0.1))


def test_conservative_dpo_by_hand():
    loss = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(-0.8 * lsig(0.2) - 0.2 * lsig(-0.2), abs=1e-9)


def test_ipo_by_hand():
    # h = 2, beta 0.1: (2 - 5)^2 = 9
    assert dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1, loss_type="ipo").item() == \
        pytest.approx(9.0)
    with pytest.raises(ValueError):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), 0.1, "ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), 0.1, "kto")


def test_sequence_logprobs_sum_average_and_masking():
    lp = t(-1.0, -2.0, -3.0, -4.0).reshape(1, 4)
    mask = torch.tensor([[0, 1, 1, 0]])
    assert sequence_logprobs(lp, mask).item() == -5.0
    assert sequence_logprobs(lp, mask, average=True).item() == -2.5
    # masked positions change nothing, whatever they hold
    lp2 = t(-100.0, -2.0, -3.0, float("-inf")).reshape(1, 4)
    assert sequence_logprobs(lp2.nan_to_num(neginf=-1e9), mask).item() == -5.0
    assert sequence_logprobs(t(0.0, 0.0).reshape(1, 2), torch.zeros(1, 2), average=True).item() == 0.0


def test_gradients_flow_only_to_the_policy():
    pc, pr = t(-10.0).requires_grad_(), t(-12.0).requires_grad_()
    dpo_loss(pc, pr, t(-11.0), t(-11.0), beta=0.1).sum().backward()
    # d/dpc [-log sigma(beta h)] = -beta * sigma(-beta h)
    g = -0.1 / (1 + math.exp(0.2))
    assert pc.grad.item() == pytest.approx(g) and pr.grad.item() == pytest.approx(-g)


def test_chosen_nll_by_hand():
    # RPO's term: -(sum of chosen token log-probs) / chosen tokens
    assert chosen_nll(t(-6.0, -1.0), t(3.0, 4.0)).tolist() == [2.0, 0.25]
    assert chosen_nll(t(0.0), t(0.0)).item() == 0.0  # an empty response divides by 1, not 0


def test_reward_pooling_by_hand():
    # two rows: prompt of 2 tokens, responses of 3 and 2 tokens, then padding
    label_mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]])  # positions predicting a response token
    resp = response_positions(label_mask)
    assert resp.tolist() == [[False, False, True, True, True, False], [False, False, True, True, False, False]]
    v = t(9, 9, 1, -2, 4, 7, 9, 9, 3, 5, 8, 8).reshape(2, 6)
    last = torch.tensor([4, 3])
    assert pool_rewards(v, resp, last, "last").tolist() == [4, 5]
    assert pool_rewards(v, resp, last, "min").tolist() == [-2, 3]
    assert pool_rewards(v, resp, last, "mean").tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="pooling='max'"):
        pool_rewards(v, resp, last, "max")
    with pytest.raises(ValueError, match="no response token"):
        pool_rewards(v, torch.zeros_like(resp), last, "mean")
    # gradients reach only the pooled positions
    x = v.clone().requires_grad_(True)
    pool_rewards(x, resp, last, "mean").sum().backward()
    assert (x.grad != 0).tolist() == resp.tolist()
