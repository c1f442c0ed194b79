"""PPO math against independent references: GAE against a plain Python loop over time,
KL estimators, whitening and both losses worked out by hand; masked positions change
nothing."""

import math
import random

import pytest
import torch

from megarlhf.algos.ppo import (KLController, explained_variance, gae, kl_estimate, last_token_index,
                                masked_mean, masked_var, masked_whiten, policy_loss, token_rewards,
                                value_loss)


def rows(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def gae_reference(rewards, values, gamma, lam):
    """One episode, as the GAE paper writes it: lists over time steps."""
    n = len(rewards)
    adv = [0.0] * n
    last = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_python_loop(gamma, lam):
    rng = random.Random(0)
    b, s = 5, 12
    rewards = torch.zeros(b, s, dtype=torch.float64)
    values = torch.zeros(b, s, dtype=torch.float64)
    mask = torch.zeros(b, s, dtype=torch.float64)
    episodes = []
    for i in range(b):
        start, length = rng.randint(0, 4), rng.randint(1, 7)
        r = [rng.uniform(-1, 1) for _ in range(length)]
        v = [rng.uniform(-1, 1) for _ in range(length)]
        rewards[i, start:start + length] = torch.tensor(r, dtype=torch.float64)
        values[i, start:start + length] = torch.tensor(v, dtype=torch.float64)
        mask[i, start:start + length] = 1
        episodes.append((start, length, r, v))
    # Garbage off the mask (prompt and padding) must not leak in.
    noise = torch.randn(b, s, dtype=torch.float64) * (1 - mask)
    adv, ret = gae(rewards + noise, values + 3 * noise, mask, gamma, lam)
    for i, (start, length, r, v) in enumerate(episodes):
        ref_a, ref_r = gae_reference(r, v, gamma, lam)
        assert adv[i, start:start + length].tolist() == pytest.approx(ref_a, abs=1e-12)
        assert ret[i, start:start + length].tolist() == pytest.approx(ref_r, abs=1e-12)
        assert adv[i][mask[i] == 0].abs().max() == 0 and ret[i][mask[i] == 0].abs().max() == 0


def test_gae_by_hand():
    # gamma 1, lambda 0.5; r = [0, 1], V = [0.5, 0.25]
    # delta_1 = 1 - 0.25 = 0.75, A_1 = 0.75; delta_0 = 0 + 0.25 - 0.5 = -0.25, A_0 = -0.25 + 0.5*0.75
    adv, ret = gae(rows([0.0, 1.0]), rows([0.5, 0.25]), rows([1.0, 1.0]), 1.0, 0.5)
    assert adv.tolist()[0] == pytest.approx([0.125, 0.75])
    assert ret.tolist()[0] == pytest.approx([0.625, 1.0])


def test_kl_estimators_by_hand():
    logp, ref = rows(-1.0, -2.0), rows(-1.5, -1.0)
    d = [0.5, -1.0]
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx(d)
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([math.exp(-x) - 1 + x for x in d])
    assert kl_estimate(logp, ref, "abs").tolist() == pytest.approx([0.5, 1.0])
    assert kl_estimate(logp, ref, "k1", clamp_min=0.0).tolist() == pytest.approx([0.5, 0.0])
    assert kl_estimate(logp, ref, "k1", clamp_min=-0.2, clamp_max=0.3).tolist() == pytest.approx([0.3, -0.2])
    assert (kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(logp, ref, "k2")


def test_k1_and_k3_estimate_the_true_kl():
    # Samples from p; both estimators' means approach KL(p || q).
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    true = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 400000, replacement=True, generator=g)
    for est in ("k1", "k3"):
        assert kl_estimate(p.log()[x], q.log()[x], est).mean().item() == pytest.approx(true, rel=0.02)


def test_token_rewards_by_hand():
    kl = rows([0.1, 0.2, 0.3, 9.0], [0.5, 0.5, 9.0, 9.0])
    mask = rows([0, 1, 1, 0], [1, 1, 0, 0])
    r = token_rewards(kl, rows(2.0, -10.0), mask, kl_coef=0.05)
    assert r.tolist()[0] == pytest.approx([0.0, -0.01, -0.015 + 2.0, 0.0])
    assert r.tolist()[1] == pytest.approx([-0.025, -0.025 - 10.0, 0.0, 0.0])
    assert last_token_index(mask).tolist() == [2, 1]


def test_masked_moments_and_whitening():
    x = rows([1.0, 2.0, 100.0], [3.0, -50.0, 6.0])
    mask = rows([1, 1, 0], [1, 0, 1])
    vals = [1.0, 2.0, 3.0, 6.0]
    mean = sum(vals) / 4
    var = sum((v - mean) ** 2 for v in vals) / 3
    assert masked_mean(x, mask).item() == pytest.approx(mean)
    m, v = masked_var(x, mask)
    assert (m.item(), v.item()) == pytest.approx((mean, var))
    w = masked_whiten(x, mask, eps=0.0)
    assert w[mask > 0].tolist() == pytest.approx([(a - mean) / math.sqrt(var) for a in vals])
    assert w[mask == 0].tolist() == [0.0, 0.0]
    w2 = masked_whiten(x, mask, shift_mean=False, eps=0.0)
    assert w2[mask > 0].tolist() == pytest.approx([(a - mean) / math.sqrt(var) + mean for a in vals])


def test_whitening_over_ranks_equals_whitening_the_union():
    # Two "ranks" holding halves: the all-reduce callable sums their moment vectors.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 5, generator=g) > 0.3).double()
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]

    def reducer(other):
        def all_reduce(t):
            ox, om = other
            od, omd = ox.double(), om.double()
            if len(t) == 2:
                t += torch.stack([(od * omd).sum(), omd.sum()])
            else:
                t += torch.stack([(od * omd).sum(), (od * od * omd).sum(), omd.sum()])
        return all_reduce

    full = masked_whiten(x, mask)
    part0 = masked_whiten(*halves[0], all_reduce=reducer(halves[1]))
    part1 = masked_whiten(*halves[1], all_reduce=reducer(halves[0]))
    assert torch.allclose(torch.cat([part0, part1]), full, atol=1e-12)
    assert masked_mean(*halves[0], all_reduce=reducer(halves[1])).item() == pytest.approx(
        masked_mean(x, mask).item())


def test_policy_loss_by_hand():
    old = rows([0.0, 0.0, 0.0, 0.0])
    logp = rows([math.log(1.5), math.log(0.5), math.log(1.1), 7.0])
    adv = rows([1.0, 1.0, -2.0, 5.0])
    mask = rows([1, 1, 1, 0])
    loss, st = policy_loss(logp, old, adv, mask, clip=0.2)
    # ratio 1.5, A=1: max(-1.5, -1.2) = -1.2 (clipped); ratio 0.5, A=1: max(-0.5, -0.8) = -0.5;
    # ratio 1.1, A=-2: max(2.2, 2.2) = 2.2; the masked token contributes nothing.
    assert loss.item() == pytest.approx(-1.2 - 0.5 + 2.2)
    assert st["clipped"].item() == 1
    assert st["ratio"].item() == pytest.approx(1.5 + 0.5 + 1.1)
    lr = [math.log(1.5), math.log(0.5), math.log(1.1)]
    assert st["approx_kl"].item() == pytest.approx(sum(0.5 * x * x for x in lr))


def test_policy_loss_gradient_at_ratio_one_is_minus_advantage():
    logp = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    adv, mask = rows([0.5, -1.0, 3.0]), rows([1, 1, 0])
    loss, st = policy_loss(logp, logp.detach().clone(), adv, mask, clip=0.2)
    loss.backward()
    assert logp.grad.tolist() == [[-0.5, 1.0, 0.0]]
    assert st["clipped"].item() == 0 and st["ratio"].item() == 2.0


def test_value_loss_by_hand():
    v, old, ret = rows([1.0, 0.0, 5.0]), rows([0.5, 0.0, 0.0]), rows([0.0, 1.0, 0.0])
    mask = rows([1, 1, 0])
    loss, st = value_loss(v, old, ret, mask, clip=0.2)
    # token 0: err (1-0)^2 = 1, clipped V = 0.7 -> 0.49 -> max 1; token 1: both 1.
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0))
    assert st["clipped"].item() == 0
    v2 = rows([0.1, 0.0, 5.0])
    loss2, st2 = value_loss(v2, rows([0.5, 0.0, 0.0]), rows([0.0, 1.0, 0.0]), mask, clip=0.2)
    # token 0: err 0.01, clipped V = 0.3 -> 0.09 -> max 0.09 (clipped counts)
    assert loss2.item() == pytest.approx(0.5 * (0.09 + 1.0))
    assert st2["clipped"].item() == 1
    plain, _ = value_loss(v2, old, ret, mask, clip=None)
    assert plain.item() == pytest.approx(0.5 * (0.01 + 1.0))


def test_explained_variance():
    ret = rows([1.0, 2.0, 3.0, 4.0])
    mask = rows([1, 1, 1, 1])
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros(4, dtype=torch.float64) + 2.5, ret, mask).item() == pytest.approx(0.0)


def test_kl_controller():
    fixed = KLController(0.05)
    assert fixed.update(10.0, 512) == 0.05
    ada = KLController(0.1, target=6.0, horizon=10000)
    # KL 12 -> error clipped to +0.2: coef * (1 + 0.2 * 512 / 10000)
    assert ada.update(12.0, 512) == pytest.approx(0.1 * (1 + 0.2 * 0.0512))
    c = ada.coef
    assert ada.update(3.0, 100) == pytest.approx(c * (1 - 0.2 * 0.01))
    restored = KLController(0.5, target=6.0)
    restored.load_state_dict(ada.state_dict())
    assert restored.coef == ada.coef


@pytest.mark.parametrize("case", ["all_empty", "one_token", "constant"])
def test_degenerate_batches_stay_finite(case):
    """Empty responses (no response token at all), a single token, and advantages with zero
    variance: every quantity PPO derives stays finite, and empty rows stay exactly 0."""
    b, s = 3, 5
    mask = torch.zeros(b, s, dtype=torch.float64)
    if case == "one_token":
        mask[1, 2] = 1
    elif case == "constant":
        mask[:, 1:4] = 1
    kl = torch.full((b, s), 0.3, dtype=torch.float64) * mask
    rewards = token_rewards(kl, rows(1.0, 1.0, 1.0), mask, 0.1)
    values = torch.full((b, s), 0.25, dtype=torch.float64) * mask
    adv, ret = gae(rewards, values, mask, 1.0, 0.95)
    if case == "constant":
        adv = torch.full_like(adv, 0.7) * mask  # zero variance over the masked tokens
    outs = [rewards, adv, ret, masked_whiten(adv, mask), masked_whiten(rewards, mask, shift_mean=False),
            masked_mean(adv, mask), explained_variance(values, ret, mask),
            policy_loss(values, values, adv, mask, 0.2)[0], value_loss(values, values, ret, mask, 0.2)[0]]
    for x in outs:
        assert torch.isfinite(x).all()
    assert (masked_whiten(adv, mask)[mask == 0] == 0).all()
    if case == "all_empty":
        assert rewards.abs().sum() == 0 and adv.abs().sum() == 0
    if case == "constant":
        assert masked_whiten(adv, mask).abs().max() < 1e-3


def test_empty_minibatches_are_recognised():
    from megarlhf.rollout.batch import minibatch_has_tokens

    mask = torch.zeros(6, 4)
    mask[4, 1] = 1
    assert [minibatch_has_tokens(mask, i, 2) for i in range(3)] == [False, False, True]


def test_leave_one_out_baseline_by_hand():
    from megarlhf.algos.ppo import leave_one_out

    s = torch.tensor([1.0, 2.0, 6.0, 10.0, 10.0, 13.0])
    out = leave_one_out(s, 3)
    # group 1: 1 - (2+6)/2 = -3, 2 - 3.5 = -1.5, 6 - 1.5 = 4.5; group 2: 10 - 11.5, 10 - 11.5, 13 - 10
    assert out.tolist() == [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]
    # a per-prompt offset disappears
    assert torch.equal(leave_one_out(s + torch.tensor([5.0] * 3 + [-7.0] * 3), 3), out)
    with pytest.raises(ValueError, match="groups of k=4"):
        leave_one_out(s, 4)
