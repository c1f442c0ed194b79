"""Advantage estimators against references written from each paper's formula with Python
lists (one loop per group or row), and garbage off the mask changing nothing."""

import math
import random
import statistics

import pytest
import torch

from megarlhf.algos.advantages import ESTIMATORS, AdvantageInputs, estimate_advantages, returns_to_go

K, GROUPS, S = 4, 3, 10


def batch(seed=0, k=K, groups=GROUPS, with_values=False):
    """Random responses (a contiguous run of tokens after a prompt), scores, KL and values,
    plus the same as Python lists for the references."""
    rng = random.Random(seed)
    n = k * groups
    mask = torch.zeros(n, S, dtype=torch.float64)
    kl = torch.zeros(n, S, dtype=torch.float64)
    values = torch.zeros(n, S, dtype=torch.float64)
    rows = []
    for i in range(n):
        start, length = rng.randint(0, 3), rng.randint(1, 6)
        k_row = [rng.uniform(-0.3, 0.5) for _ in range(length)]
        v_row = [rng.uniform(-1, 1) for _ in range(length)]
        mask[i, start:start + length] = 1
        kl[i, start:start + length] = torch.tensor(k_row, dtype=torch.float64)
        values[i, start:start + length] = torch.tensor(v_row, dtype=torch.float64)
        rows.append((start, length, k_row, v_row))
    scores = [rng.choice([0.0, 1.0]) if seed % 2 else rng.uniform(-2, 2) for _ in range(n)]
    noise = torch.randn(n, S, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * (1 - mask)
    x = AdvantageInputs(scores=torch.tensor(scores, dtype=torch.float64), kl=kl + noise, mask=mask,
                        values=(values + 5 * noise) if with_values else None, kl_coef=0.05, group_size=k,
                        gamma=1.0, lam=0.95)
    return x, scores, rows


def on_tokens(adv, rows):
    return [adv[i, start:start + length].tolist() for i, (start, length, _, _) in enumerate(rows)]


def assert_zero_off_mask(t, x):
    assert t[x.mask == 0].abs().max() == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_is_the_group_normalised_score_on_every_token(seed):
    x, scores, rows = batch(seed)
    out = estimate_advantages("grpo", x)
    for g in range(GROUPS):
        r = scores[g * K:(g + 1) * K]
        mean, std = statistics.mean(r), statistics.stdev(r)
        for j in range(K):
            i = g * K + j
            want = (r[j] - mean) / (std + x.eps)
            assert on_tokens(out.advantages, rows)[i] == pytest.approx([want] * rows[i][1], abs=1e-12)
    assert out.returns is None
    assert_zero_off_mask(out.advantages, x)


@pytest.mark.parametrize("seed", [0, 1])
def test_dr_grpo_drops_the_std(seed):
    x, scores, rows = batch(seed)
    out = estimate_advantages("dr_grpo", x)
    for i in range(len(scores)):
        g = i // K
        want = scores[i] - statistics.mean(scores[g * K:(g + 1) * K])
        assert on_tokens(out.advantages, rows)[i] == pytest.approx([want] * rows[i][1], abs=1e-12)
    assert_zero_off_mask(out.advantages, x)


@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_is_the_kl_penalised_reward_minus_the_others_mean(seed):
    x, scores, rows = batch(seed)
    out = estimate_advantages("rloo", x)
    seq = [scores[i] - x.kl_coef * sum(rows[i][2]) for i in range(len(scores))]
    for i in range(len(scores)):
        g = i // K
        others = [seq[j] for j in range(g * K, (g + 1) * K) if j != i]
        want = seq[i] - sum(others) / len(others)
        assert on_tokens(out.advantages, rows)[i] == pytest.approx([want] * rows[i][1], abs=1e-12)
    assert_zero_off_mask(out.advantages, x)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_is_the_globally_whitened_return_to_go(gamma):
    x, scores, rows = batch(3)
    x = AdvantageInputs(**{**x.__dict__, "gamma": gamma})
    out = estimate_advantages("reinforce_pp", x)
    returns = []
    for i, (start, length, k_row, _) in enumerate(rows):
        r = [-x.kl_coef * k for k in k_row]
        r[-1] += scores[i]
        g, acc = [0.0] * length, 0.0
        for t in reversed(range(length)):
            acc = r[t] + gamma * acc
            g[t] = acc
        returns.append(g)
    flat = [v for g in returns for v in g]
    mean, var = statistics.mean(flat), statistics.variance(flat)
    for i, g in enumerate(returns):
        want = [(v - mean) / math.sqrt(var + 1e-8) for v in g]
        assert on_tokens(out.advantages, rows)[i] == pytest.approx(want, abs=1e-9)
    assert_zero_off_mask(out.advantages, x)


def test_gae_with_gamma_one_and_lambda_one_is_return_minus_value():
    """GAE(1, 1) telescopes to G_t - V_t (Schulman et al. 2016, eq. 18)."""
    x, scores, rows = batch(4, with_values=True)
    x = AdvantageInputs(**{**x.__dict__, "lam": 1.0})
    out = estimate_advantages("gae", x)
    for i, (start, length, k_row, v_row) in enumerate(rows):
        r = [-x.kl_coef * k for k in k_row]
        r[-1] += scores[i]
        want = [sum(r[t:]) - v_row[t] for t in range(length)]
        assert on_tokens(out.advantages, rows)[i] == pytest.approx(want, abs=1e-12)
        assert on_tokens(out.returns, rows)[i] == pytest.approx([sum(r[t:]) for t in range(length)], abs=1e-12)
    assert_zero_off_mask(out.advantages, x)
    assert_zero_off_mask(out.returns, x)


def test_returns_to_go_by_hand():
    r = torch.tensor([[0.0, 1.0, 2.0, 9.0]])
    m = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert returns_to_go(r, m, 0.5).tolist() == [[0.0, 2.0, 2.0, 0.0]]


def test_what_each_estimator_needs_is_checked():
    x, _, _ = batch(0)
    with pytest.raises(ValueError, match="needs the critic's values"):
        estimate_advantages("gae", x)
    for name in ("grpo", "dr_grpo", "rloo"):
        with pytest.raises(ValueError, match="groups of >= 2"):
            estimate_advantages(name, AdvantageInputs(**{**x.__dict__, "group_size": 1}))
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        estimate_advantages("ppo", x)
    assert {n for n, e in ESTIMATORS.items() if e.needs_critic} == {"gae"}
    assert {n for n, e in ESTIMATORS.items() if not e.kl_in_reward} == {"grpo", "dr_grpo"}


def test_a_group_of_equal_scores_gives_zero_advantage():
    """Nothing to learn from a prompt every sample solved (or failed): no NaN from std 0."""
    x, _, _ = batch(0)
    x = AdvantageInputs(**{**x.__dict__, "scores": torch.ones(K * GROUPS, dtype=torch.float64)})
    for name in ("grpo", "dr_grpo"):
        assert estimate_advantages(name, x).advantages.abs().max() == 0
