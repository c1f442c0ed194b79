"""Pure helpers of the scaling benchmark (``tools/benchmark_scaling.py``): layouts, batch
plans, model FLOPs per phase, MFU and scaling efficiency. No process group, no model.

Units: a *row* is one sequence of ``seq_len`` tokens (a pair is two rows: chosen and
rejected); batches and micro-batches are counted in rows; FLOPs follow
:mod:`megarlhf.perf.flops` (model FLOPs: recomputation is not counted).

Scaling efficiency, both kinds, against the base layout (the fewest devices of a group):

    efficiency = (tokens/s / base tokens/s) / (devices / base devices)

Weak scaling keeps the batch per data-parallel replica fixed (the global batch grows with
DP), so this equals ``base step time / step time``; strong scaling keeps the global batch
fixed, so it equals ``base step time / (step time x devices / base devices)``.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from megarlhf.config.model import ModelConfig
from megarlhf.perf.flops import forward_flops_per_token, matmul_params, train_flops_per_token
from megarlhf.perf.plan import Layout

__all__ = [
    "PHASES", "TRAIN_PHASES", "RECOMPUTE", "SCALINGS", "Layout", "parse_layout", "parse_layouts",
    "parse_list", "recompute_granularity", "BatchPlan", "batch_plan", "train_flops_per_row_token",
    "generation_flops", "ppo_step_flops", "mfu", "mfu_basis", "efficiency", "add_efficiency",
    "median",
]

PHASES = ("sft", "rm", "dpo", "ppo", "generate")
TRAIN_PHASES = ("sft", "rm", "dpo")
PAIR_PHASES = ("rm", "dpo")
RECOMPUTE = ("none", "full", "selective")
SCALINGS = ("weak", "strong")


_LAYOUT = re.compile(r"(?:tp(\d+))?(?:pp(\d+))?(?:dp(\d+))?")


def parse_layout(text: str) -> Layout:
    """``tp2pp1dp4`` -> Layout(2, 1, 4); missing parts are 1 (``dp2`` = tp1pp1dp2), the
    order is fixed (tp, pp, dp)."""
    s = text.strip().lower()
    m = _LAYOUT.fullmatch(s)
    if not s or not m:
        raise ValueError(f"layout {text!r}: expected tpNppNdpN, e.g. tp2pp1dp2 (parts in that order, "
                         "a missing part is 1)")
    tp, pp, dp = (int(g) if g else 1 for g in m.groups())
    if min(tp, pp, dp) < 1:
        raise ValueError(f"layout {text!r}: sizes must be >= 1")
    return Layout(tp, pp, dp)


def parse_layouts(text: str) -> List[Layout]:
    """Comma-separated layouts, duplicates dropped, order kept."""
    out: List[Layout] = []
    for part in text.split(","):
        if part.strip():
            lay = parse_layout(part)
            if lay not in out:
                out.append(lay)
    if not out:
        raise ValueError("--layouts: no layout given")
    return out


def parse_list(text: str, kind=int, choices: Optional[Sequence] = None, what: str = "value") -> list:
    """``"1,4"`` -> [1, 4] (or strings), checked against ``choices``; order kept."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        v = kind(part)
        if choices is not None and v not in choices:
            raise ValueError(f"{what} {v!r}: expected one of {', '.join(map(str, choices))}")
        if v not in out:
            out.append(v)
    if not out:
        raise ValueError(f"no {what} given")
    return out


def recompute_granularity(name: str) -> Optional[str]:
    """Benchmark name -> ``ModelConfig.recompute_granularity`` (``none`` -> None)."""
    if name not in RECOMPUTE:
        raise ValueError(f"recompute {name!r}: expected one of {RECOMPUTE}")
    return None if name == "none" else name


@dataclass(frozen=True)
class BatchPlan:
    """Rows of one step: per data-parallel replica, in all, and microbatches per replica."""

    per_replica: int
    global_batch: int
    num_microbatches: int


def batch_plan(phase: str, scaling: str, layout: Layout, micro_batch: int,
               batch_per_replica: Optional[int], global_batch: Optional[int]) -> BatchPlan:
    """The batch of one run. Weak scaling: ``batch_per_replica`` rows per replica (the
    global batch is that x DP); strong: ``global_batch`` rows split over the replicas.
    Raises ValueError naming the flags when the numbers do not divide."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling {scaling!r}: expected one of {SCALINGS}")
    if scaling == "weak":
        if not batch_per_replica:
            raise ValueError("weak scaling needs --batch-per-replica")
        per = batch_per_replica
    else:
        if not global_batch:
            raise ValueError("strong scaling needs --global-batch")
        if global_batch % layout.dp:
            raise ValueError(f"--global-batch {global_batch} is not divisible by DP={layout.dp}")
        per = global_batch // layout.dp
    if per % micro_batch:
        raise ValueError(f"{per} rows per replica are not divisible by --micro-batch {micro_batch}")
    if phase in PAIR_PHASES and micro_batch % 2:
        raise ValueError(f"--micro-batch {micro_batch}: {phase} rows come in pairs (chosen, "
                         "rejected); use an even micro-batch")
    return BatchPlan(per, per * layout.dp, per // micro_batch)


def train_flops_per_row_token(cfg: ModelConfig, phase: str, seq_len: int) -> float:
    """Model FLOPs per trained token of an SFT, reward-model or DPO step (forward +
    backward; the reward model's head has one output; DPO's reference log-probs are
    precomputed, as in the recipe, and not part of the step)."""
    if phase not in TRAIN_PHASES:
        raise ValueError(f"phase {phase!r} is not a training step ({TRAIN_PHASES})")
    return train_flops_per_token(cfg, seq_len, head_outputs=1 if phase == "rm" else None)


def generation_flops(cfg: ModelConfig, prompt_len: int, new_tokens: int) -> float:
    """Model FLOPs to sample ``new_tokens`` after a ``prompt_len`` prompt with a KV cache,
    per sequence: positions ``0 .. prompt_len + new_tokens - 2`` go through the layers
    once (the last sampled token is never fed back), position ``p`` attending ``p + 1``
    cached keys (``4 x heads x head_dim`` FLOPs per key and layer); the vocabulary
    projection runs once per sampled token (only the last position's logits are made)."""
    if prompt_len < 1 or new_tokens < 1:
        raise ValueError("prompt_len and new_tokens must be >= 1")
    fed = prompt_len + new_tokens - 1
    layers = matmul_params(cfg, head_outputs=0)
    attention = 4.0 * cfg.num_layers * cfg.num_attention_heads * cfg.kv_channels * fed * (fed + 1) / 2
    head = 2.0 * cfg.hidden_size * cfg.vocab_size * new_tokens
    return 2.0 * layers * fed + attention + head


def ppo_step_flops(cfg: ModelConfig, tokens: float, seq_len: int, ppo_epochs: int = 1,
                   value_cfg: Optional[ModelConfig] = None) -> float:
    """Model FLOPs of one PPO step (an estimate) over ``tokens`` real (non-pad) tokens in
    rows of ``seq_len``: generation counted as one forward of every token by the actor;
    forwards of the reward model, reference, actor (old log-probs) and critic; and per
    PPO epoch a training step (3x forward) of the actor and of the critic. The reward
    model and critic have ``value_cfg``'s shape (default: the actor's) and a one-output
    head. Attention is counted over the whole row as in :mod:`megarlhf.perf.flops`."""
    vcfg = value_cfg or cfg
    policy = forward_flops_per_token(cfg, seq_len)
    value = forward_flops_per_token(vcfg, seq_len, head_outputs=1)
    per_token = (policy            # generation
                 + value + policy  # reward model, reference
                 + policy + value  # old log-probs, old values
                 + 3.0 * ppo_epochs * (policy + value))
    return per_token * tokens


def mfu(flops_per_s_per_device: Optional[float], peak_flops_per_s: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: achieved model FLOP/s per device over the device's peak."""
    if not flops_per_s_per_device or not peak_flops_per_s:
        return None
    return flops_per_s_per_device / peak_flops_per_s


def mfu_basis(probe: Dict) -> str:
    """What an MFU figure is measured against, in words: the dtype and shape of the GEMM
    probe (and its threads on CPU), or the given peak."""
    if probe.get("source") == "given":
        return f"given peak {probe['tflops']:.4g} TFLOP/s per device ({probe['dtype']})"
    n = probe["n"]
    where = f", {probe['threads']} thread(s)" if probe.get("device") == "cpu" else f", {probe.get('device')}"
    return (f"{probe['dtype']} GEMM probe {n}x{n} @ {n}x{n}{where}: "
            f"{probe['tflops']:.4g} TFLOP/s per device")


def efficiency(tokens_per_s: float, devices: int, base_tokens_per_s: float, base_devices: int) -> float:
    """Scaling efficiency against a base run (see the module docstring); 1.0 is linear."""
    if base_tokens_per_s <= 0 or devices <= 0 or base_devices <= 0:
        raise ValueError("throughputs and device counts must be positive")
    return (tokens_per_s / base_tokens_per_s) / (devices / base_devices)


def _group_key(row: Dict) -> Tuple:
    size = row["batch_per_replica"] if row["scaling"] == "weak" else row["global_batch"]
    return (row["phase"], row["scaling"], row["micro_batch"], row["recompute"], row["dtype"],
            row["seq_len"], size)


def add_efficiency(rows: List[Dict]) -> List[Dict]:
    """Set ``efficiency`` and ``efficiency_base`` (the base layout's name) on every
    measured row: within a group of rows that differ only in layout (same phase, scaling
    kind, micro-batch, recomputation, dtype, sequence length, and batch per replica for
    weak or global batch for strong scaling), the base is the row with the fewest devices
    (the first given on a tie). Rows that did not run get None. Returns ``rows``."""
    groups: Dict[Tuple, List[Dict]] = {}
    for row in rows:
        row["efficiency"], row["efficiency_base"] = None, None
        if row.get("status") == "ok":
            groups.setdefault(_group_key(row), []).append(row)
    for members in groups.values():
        base = min(members, key=lambda r: r["devices"])  # min keeps the first on a tie
        for row in members:
            row["efficiency"] = efficiency(row["tokens_per_s"], row["devices"], base["tokens_per_s"],
                                           base["devices"])
            row["efficiency_base"] = base["layout"]
    return rows


def median(values: Iterable[float]) -> float:
    vals = list(values)
    if not vals:
        raise ValueError("median of nothing")
    return statistics.median(vals)
