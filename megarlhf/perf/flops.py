"""Model FLOPs of a Llama-family decoder, from its shape (pure functions), and a GEMM probe.

Counting convention (as in PaLM and Megatron-LM's MFU): a matrix product of ``[m, k] x
[k, n]`` costs ``2mkn``; attention scores and their weighted sum cost ``4 s h`` per token
and layer in the forward pass (the full ``s x s`` square, not halved for the causal mask);
the backward pass costs twice the forward. Recomputed activations are not counted: these
are *model* FLOPs, so MFU does not reward recomputation. Norms, RoPE, softmax and the
optimizer are left out (well under 1% at any real size).
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from megarlhf.config.model import ModelConfig

__all__ = ["matmul_params", "forward_flops_per_token", "train_flops_per_token", "gemm_probe"]


def matmul_params(cfg: ModelConfig, head_outputs: Optional[int] = None) -> int:
    """Weights that take part in matrix products per token: every layer's projections and
    the output head (``head_outputs`` rows: the vocabulary, or 1 for a scalar head). The
    input embedding is a lookup and costs nothing."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_channels
    qkv = h * (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d
    proj = cfg.num_attention_heads * d * h
    layer = qkv + proj + 3 * h * f
    head = h * (cfg.vocab_size if head_outputs is None else head_outputs)
    return cfg.num_layers * layer + head


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, head_outputs: Optional[int] = None) -> float:
    """Forward FLOPs per token of a sequence of ``seq_len`` tokens."""
    attention = 4.0 * cfg.num_layers * seq_len * cfg.num_attention_heads * cfg.kv_channels
    return 2.0 * matmul_params(cfg, head_outputs) + attention


def train_flops_per_token(cfg: ModelConfig, seq_len: int, head_outputs: Optional[int] = None) -> float:
    """Forward + backward FLOPs per token (3x the forward)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len, head_outputs)


def gemm_probe(n: int = 2048, dtype: torch.dtype = torch.float32, seconds: float = 2.0,
               device: str = "cpu") -> float:
    """Measured FLOP/s of square ``n x n`` matrix products on ``device`` (the ceiling an
    MFU figure is stated against). Runs for about ``seconds`` after one warm-up product."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0:
            sync()
            if time.perf_counter() - t0 >= seconds:
                break
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t0)
