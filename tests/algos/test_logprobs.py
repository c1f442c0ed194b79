"""Per-token log-probs and entropy, plain and vocab-parallel."""

import torch

from megarlhf.algos.logprobs import token_entropy, token_logprobs, vocab_start_of
from tests.conftest import launch


def test_matches_log_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 7, 50, generator=g)
    targets = torch.randint(0, 50, (2, 7), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(token_logprobs(logits, targets), expected, atol=1e-6)
    p = torch.softmax(logits, -1)
    assert torch.allclose(token_entropy(logits), -(p * p.log()).sum(-1), atol=1e-5)


def test_masked_padding_columns_change_nothing():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 30, generator=g)
    targets = torch.randint(0, 30, (4,), generator=g)
    padded = torch.cat([logits, torch.full((4, 10), torch.finfo(torch.float32).min)], -1)
    assert torch.allclose(token_logprobs(padded, targets), token_logprobs(logits, targets))
    ent = token_entropy(padded)
    assert torch.isfinite(ent).all() and torch.allclose(ent, token_entropy(logits), atol=1e-6)


def test_bf16_logits_are_upcast():
    logits = torch.randn(3, 64).bfloat16()
    t = torch.tensor([1, 2, 3])
    assert token_logprobs(logits, t).dtype == torch.float32


def test_vocab_start():
    assert vocab_start_of(0, 1280, 2) == 0 and vocab_start_of(1, 1280, 2) == 640


def test_vocab_parallel_values_and_gradients_match():
    out = launch("tests/algos/logprobs_worker.py", 2)
    assert "rank 0 ok" in out and "rank 1 ok" in out
