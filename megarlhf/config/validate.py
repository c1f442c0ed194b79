"""Cross-field checks. Every check runs before any process group is created and names the
fields and values that conflict."""

from __future__ import annotations

from typing import List, Optional

from megarlhf.config.model import ModelConfig
from megarlhf.config.parallel import ParallelConfig

__all__ = ["ConfigError", "check_model", "check_layout", "runtime_problems"]

_DTYPES = ("float32", "bfloat16", "auto")
_IMPLS = ("local", "transformer_engine")
_FP8 = (None, "hybrid", "e4m3")


class ConfigError(ValueError):
    """A configuration that cannot run, with every problem found listed."""

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


def _raise(problems: List[str]) -> None:
    if problems:
        raise ConfigError(problems)


def model_problems(m: ModelConfig, prefix: str = "model") -> List[str]:
    p: List[str] = []
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "vocab_size", "max_position_embeddings",
                 "make_vocab_size_divisible_by"):
        if getattr(m, name) <= 0:
            p.append(f"{prefix}.{name}={getattr(m, name)} must be positive")
    if m.num_attention_heads > 0 and m.hidden_size % m.num_attention_heads:
        p.append(f"{prefix}.hidden_size={m.hidden_size} is not divisible by "
                 f"{prefix}.num_attention_heads={m.num_attention_heads}")
    if m.num_query_groups > 0 and m.num_attention_heads % m.num_query_groups:
        p.append(f"{prefix}.num_attention_heads={m.num_attention_heads} is not divisible by "
                 f"{prefix}.num_query_groups={m.num_query_groups}")
    if m.params_dtype not in _DTYPES:
        p.append(f"{prefix}.params_dtype={m.params_dtype!r}: expected one of {_DTYPES}")
    if m.transformer_impl not in _IMPLS:
        p.append(f"{prefix}.transformer_impl={m.transformer_impl!r}: expected one of {_IMPLS}")
    if m.attention_backend not in ("unfused", "sdpa"):
        p.append(f"{prefix}.attention_backend={m.attention_backend!r}: expected 'unfused' or 'sdpa'")
    if m.fp8 not in _FP8:
        p.append(f"{prefix}.fp8={m.fp8!r}: expected one of {_FP8}")
    if m.fp8 is not None and m.transformer_impl != "transformer_engine":
        p.append(f"{prefix}.fp8={m.fp8!r} needs {prefix}.transformer_impl='transformer_engine' "
                 f"(got {m.transformer_impl!r})")
    if m.fp8_amax_compute_algo not in ("max", "most_recent"):
        p.append(f"{prefix}.fp8_amax_compute_algo={m.fp8_amax_compute_algo!r}: expected "
                 "'max' or 'most_recent'")
    if m.recompute_granularity not in (None, "full", "selective"):
        p.append(f"{prefix}.recompute_granularity={m.recompute_granularity!r}: expected "
                 "'full', 'selective' or null")
    return p


def runtime_problems(r, prefix: str = "model") -> List[str]:
    """Values of a :class:`RuntimeConfig` (before a checkpoint's settings are known)."""
    allowed = {"params_dtype": _DTYPES, "transformer_impl": _IMPLS, "fp8": ("hybrid", "e4m3", "none"),
               "recompute_granularity": ("full", "selective", "none")}
    p: List[str] = []
    for name, ok in allowed.items():
        value = getattr(r, name)
        if value is not None and value not in ok:
            p.append(f"{prefix}.{name}={value!r}: expected one of {', '.join(ok)} (or unset: the "
                     "checkpoint's)")
    if r.fp8 not in (None, "none") and r.transformer_impl not in (None, "transformer_engine"):
        p.append(f"{prefix}.fp8={r.fp8!r} needs {prefix}.transformer_impl='transformer_engine' "
                 f"(got {r.transformer_impl!r})")
    return p


def layout_problems(m: ModelConfig, par: ParallelConfig, world_size: Optional[int],
                    prefix: str = "parallel", model_prefix: str = "model") -> List[str]:
    p: List[str] = []
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if tp < 1:
        p.append(f"{prefix}.tensor_model_parallel_size={tp} must be >= 1")
    if pp < 1:
        p.append(f"{prefix}.pipeline_model_parallel_size={pp} must be >= 1")
    if p:
        return p
    if world_size is not None and world_size % (tp * pp):
        p.append(f"world size {world_size} is not divisible by {prefix}.tensor_model_parallel_size"
                 f"={tp} x {prefix}.pipeline_model_parallel_size={pp}")
    if m.num_attention_heads % tp:
        p.append(f"{model_prefix}.num_attention_heads={m.num_attention_heads} is not divisible by "
                 f"{prefix}.tensor_model_parallel_size={tp}")
    if m.num_query_groups % tp:
        p.append(f"{model_prefix}.num_query_groups={m.num_query_groups} is not divisible by "
                 f"{prefix}.tensor_model_parallel_size={tp}")
    if m.ffn_hidden_size % tp:
        p.append(f"{model_prefix}.ffn_hidden_size={m.ffn_hidden_size} is not divisible by "
                 f"{prefix}.tensor_model_parallel_size={tp}")
    vpp = par.virtual_pipeline_model_parallel_size
    if vpp is not None:
        if vpp < 1:
            p.append(f"{prefix}.virtual_pipeline_model_parallel_size={vpp} must be >= 1")
        elif pp == 1 and vpp > 1:
            p.append(f"{prefix}.virtual_pipeline_model_parallel_size={vpp} needs "
                     f"{prefix}.pipeline_model_parallel_size > 1")
    stages = pp * (vpp or 1)
    if m.num_layers % stages:
        what = f"{prefix}.pipeline_model_parallel_size={pp}"
        if vpp:
            what += f" x {prefix}.virtual_pipeline_model_parallel_size={vpp}"
        p.append(f"{model_prefix}.num_layers={m.num_layers} is not divisible by {what}")
    if par.sequence_parallel and tp == 1:
        p.append(f"{prefix}.sequence_parallel=true needs {prefix}.tensor_model_parallel_size > 1")
    return p


def check_model(m: ModelConfig, prefix: str = "model") -> None:
    _raise(model_problems(m, prefix))


def check_layout(m: ModelConfig, par: ParallelConfig, world_size: Optional[int] = None,
                 prefix: str = "parallel", model_prefix: str = "model") -> None:
    """Raise :class:`ConfigError` listing every conflict between a model and its layout."""
    _raise(model_problems(m, model_prefix) + layout_problems(m, par, world_size, prefix, model_prefix))
