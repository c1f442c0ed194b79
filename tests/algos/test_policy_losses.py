"""Policy losses against their papers' formulas written per token in plain Python, and the
aggregations against their definitions, whatever the microbatch split."""

import random

import pytest
import torch

from megarlhf.algos.policy_losses import AGGREGATIONS, loss_weights, policy_token_loss


def objective_ppo(r, a, eps):
    """Schulman et al. 2017, eq. 7 (the objective; the loss is its negative)."""
    return min(r * a, max(min(r, 1 + eps), 1 - eps) * a)


def objective_dual(r, a, eps, c):
    """Ye et al. 2020, eq. 5: for A < 0, max(min(r A, clip(r) A), c A)."""
    o = objective_ppo(r, a, eps)
    return max(o, c * a) if a < 0 else o


def random_tokens(seed, b=4, s=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, s, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(b, s, generator=g, dtype=torch.float64) * 1.5  # ratios well past the clip
    adv = torch.randn(b, s, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, s, generator=g) > 0.3).double()
    return logp, old, adv, mask


@pytest.mark.parametrize("name", ["ppo_clip", "dual_clip"])
def test_per_token_loss_matches_the_formula(name):
    logp, old, adv, mask = random_tokens(0)
    eps, c = 0.2, 3.0
    loss, clipped = policy_token_loss(name, logp, old, adv, mask, eps, c)
    n_capped = 0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                assert loss[i, t] == 0 and clipped[i, t] == 0
                continue
            r, a = float(torch.exp(logp[i, t] - old[i, t])), float(adv[i, t])
            want = -(objective_ppo(r, a, eps) if name == "ppo_clip" else objective_dual(r, a, eps, c))
            assert float(loss[i, t]) == pytest.approx(want, abs=1e-12)
            n_capped += name == "dual_clip" and a < 0 and r * a < c * a
    if name == "dual_clip":
        assert n_capped > 0, "the random batch never reaches the dual clip: the test would not test it"


def test_masked_positions_change_nothing():
    logp, old, adv, mask = random_tokens(1)
    garbage = torch.randn_like(logp) * 50 * (1 - mask)
    for name in ("ppo_clip", "dual_clip"):
        a = policy_token_loss(name, logp, old, adv, mask, 0.2)
        b = policy_token_loss(name, logp + garbage, old - garbage, adv + garbage, mask, 0.2)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gradient_is_zero_where_clipped():
    logp, old, adv, mask = random_tokens(2)
    logp.requires_grad_(True)
    loss, clipped = policy_token_loss("ppo_clip", logp, old, adv, mask, 0.2)
    loss.sum().backward()
    assert clipped.sum() > 0
    assert logp.grad[clipped.bool()].abs().max() == 0
    assert logp.grad[(mask > 0) & ~clipped.bool()].abs().min() > 0


def aggregate_reference(loss, mask, mode, L):
    rows = [[float(v) for v, m in zip(lr, mr) if m] for lr, mr in zip(loss, mask)]
    rows_with = [r for r in rows if r]
    if mode == "token_mean":
        flat = [v for r in rows for v in r]
        return sum(flat) / len(flat)
    if mode == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in rows_with) / len(rows_with)
    return sum(sum(r) / L for r in rows_with) / len(rows_with)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregations_match_their_definitions_for_any_split(mode):
    rng = random.Random(0)
    b, s, L = 6, 9, 16
    mask = torch.zeros(b, s, dtype=torch.float64)
    for i in range(b):
        if i == 2:
            continue  # an empty response counts nowhere
        start = rng.randint(0, 3)
        mask[i, start:start + rng.randint(1, 5)] = 1
    loss = torch.randn(b, s, dtype=torch.float64) * mask
    w, counts = loss_weights(mask, mode, L)
    want = aggregate_reference(loss.tolist(), mask.tolist(), mode, L)
    assert float((w * loss).sum() / counts.sum()) == pytest.approx(want, rel=1e-6)
    # as megatron reduces microbatches: sum of loss sums over sum of counts
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    total = sum(float((w[p] * loss[p]).sum()) for p in parts) / sum(float(counts[p].sum()) for p in parts)
    assert total == pytest.approx(want, rel=1e-6)


def test_unknown_names_are_refused():
    logp, old, adv, mask = random_tokens(0)
    with pytest.raises(ValueError, match="unknown policy loss 'clip'"):
        policy_token_loss("clip", logp, old, adv, mask, 0.2)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        loss_weights(mask, "mean")
