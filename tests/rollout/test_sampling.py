"""Sampling on the device: Philox4x32-10 against Random123's known answers and an
independent integer implementation, the uniforms' distribution and independence, and
inverse-CDF picking (frequencies, truncation, greedy, log-probs)."""

import math
from types import SimpleNamespace

import pytest
import torch

from megarlhf.rollout.sampling import filter_logits, philox4x32, philox_uniforms, pick

# Random123's kat_vectors, the three philox4x32 10-round lines: counter, key, expected.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def reference_philox(ctr, key, rounds=10):
    """Philox4x32 from the paper's round function with Python's unbounded integers."""
    m = 0xFFFFFFFF
    c, k = list(ctr), list(key)
    for r in range(rounds):
        if r:
            k = [(k[0] + 0x9E3779B9) & m, (k[1] + 0xBB67AE85) & m]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & m, (p0 >> 32) ^ c[3] ^ k[1], p0 & m]
    return tuple(c)


def as_tensors(words):
    return tuple(torch.tensor(w, dtype=torch.int64) for w in words)


@pytest.mark.parametrize("ctr, key, want", KAT)
def test_philox_known_answers(ctr, key, want):
    got = philox4x32(as_tensors(ctr), as_tensors(key))
    assert tuple(int(w) for w in got) == want
    assert reference_philox(ctr, key) == want


def test_philox_matches_the_integer_reference_on_random_words():
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2 ** 32, (500, 6), generator=g, dtype=torch.int64)
    got = philox4x32(tuple(words[:, i] for i in range(4)), (words[:, 4], words[:, 5]))
    for r in range(0, 500, 7):
        want = reference_philox(words[r, :4].tolist(), words[r, 4:].tolist())
        assert tuple(int(w[r]) for w in got) == want


def test_uniforms_are_uniform_and_uncorrelated():
    u = philox_uniforms(seed=12345, index=torch.arange(2000), steps=128)  # 256,000 draws
    assert u.dtype == torch.float64 and u.min() >= 0 and u.max() < 1
    flat = u.flatten()
    n = flat.numel()
    # Kolmogorov-Smirnov: the 1% critical value is 1.63 / sqrt(n)
    s = flat.sort().values
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (grid - s).abs().max().item() < 1.63 / math.sqrt(n)
    # chi-square on 100 bins: 99 degrees of freedom, 0.1% critical value 148.2
    counts = torch.bincount((flat * 100).long(), minlength=100).double()
    assert ((counts - n / 100) ** 2 / (n / 100)).sum().item() < 148.2
    # neighbours along a stream and across prompts: correlation ~ N(0, 1/n), |r| < 4 sigma
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1])):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(r) < 4 / math.sqrt(a.numel())
    # 53 bits: no two of 256,000 draws coincide
    assert s.unique().numel() == n


def test_a_stream_depends_only_on_seed_and_prompt_index():
    big = philox_uniforms(7, torch.arange(100, 164), 40)
    one = philox_uniforms(7, torch.tensor([130]), 40)
    assert torch.equal(big[30], one[0])
    assert torch.equal(philox_uniforms(7, torch.tensor([130]), 10)[0], one[0, :10])  # a prefix
    assert not torch.equal(philox_uniforms(8, torch.tensor([130]), 40), one)
    assert not torch.equal(big[0], big[1])
    # index above 2^32 uses the counter's third word
    far = philox_uniforms(7, torch.tensor([130 + 2 ** 32]), 40)
    assert not torch.equal(far, one)


def params(**kw):
    base = dict(greedy=False, temperature=1.0, top_k=0, top_p=1.0)
    return SimpleNamespace(**{**base, **kw})


def test_inverse_cdf_frequencies_follow_the_distribution():
    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, -3.0])
    n = 40000
    u = philox_uniforms(3, torch.arange(n), 1)[:, 0]
    new, s_lp, p_lp = pick(logits.expand(n, -1), params(), u)
    freq = torch.bincount(new, minlength=5).double() / n
    probs = torch.softmax(logits.double(), -1)
    assert (freq - probs).abs().max().item() < 4 * math.sqrt(0.25 / n)
    assert torch.allclose(s_lp, torch.log_softmax(logits, -1)[new]) and torch.equal(s_lp, p_lp)


def test_truncation_temperature_and_greedy():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).expand(2000, -1)
    u = philox_uniforms(5, torch.arange(2000), 1)[:, 0]
    new, s_lp, p_lp = pick(logits, params(top_k=2, temperature=0.5), u)
    assert set(new.tolist()) == {0, 1}
    filt = torch.log_softmax(filter_logits(logits[:1], 0.5, 2, 1.0), -1)[0]
    assert torch.allclose(s_lp, filt[new]) and torch.allclose(p_lp, torch.log_softmax(logits[0], -1)[new])
    new, _, _ = pick(logits, params(top_p=0.5), u)  # the first token holds 66% alone
    assert set(new.tolist()) == {0}
    new, s_lp, p_lp = pick(logits[:3], params(greedy=True), u[:3])
    assert new.tolist() == [0, 0, 0] and s_lp.tolist() == [0, 0, 0]
    # an edge uniform never lands on an id that truncation removed
    new, _, _ = pick(logits[:2], params(top_k=1), torch.tensor([0.0, 1.0 - 2 ** -53], dtype=torch.float64))
    assert new.tolist() == [0, 0]
    # ... also when removed ids come first and last: the pick is the id that raised the CDF
    middle = torch.tensor([[-1.0, 3.0, 2.0, 0.0, -1.0]]).expand(2, -1)
    edges = torch.tensor([0.0, 1.0 - 2 ** -53], dtype=torch.float64)
    assert pick(middle, params(top_k=1), edges)[0].tolist() == [1, 1]
    assert pick(middle, params(top_k=2), edges)[0].tolist() == [1, 2]
