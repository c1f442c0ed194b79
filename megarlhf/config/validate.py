"""Cross-field checks. Every check runs before any process group is created and names the
fields and values that conflict."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

from megarlhf.config.model import ModelConfig
from megarlhf.config.parallel import ParallelConfig

__all__ = ["ConfigError", "check_model", "check_layout", "runtime_problems", "range_problems",
           "parallel_problems", "shared_process_problems", "fp8_shape_problems",
           "ATTENTION_BACKENDS"]

_DTYPES = ("float32", "bfloat16", "auto")
_IMPLS = ("local", "transformer_engine")
_FP8 = (None, "hybrid", "e4m3")
ATTENTION_BACKENDS = {"local": ("auto", "unfused", "sdpa"),
                      "transformer_engine": ("auto", "fused", "flash", "unfused")}
_ALL_BACKENDS = tuple(dict.fromkeys(b for bs in ATTENTION_BACKENDS.values() for b in bs))
_RECOMPUTE = ("full", "selective")
_RECOMPUTE_METHODS = ("uniform", "block")
_AMAX_ALGOS = ("max", "most_recent")


class ConfigError(ValueError):
    """A configuration that cannot run, with every problem found listed."""

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


def _raise(problems: List[str]) -> None:
    if problems:
        raise ConfigError(problems)


def range_problems(obj: Any, prefix: str, *, positive: Sequence[str] = (),
                   non_negative: Sequence[str] = (), fraction: Sequence[str] = (),
                   finite: Sequence[str] = ()) -> List[str]:
    """Numeric fields of ``obj`` out of range, each named ``prefix.field=value``: ``positive``
    (> 0), ``non_negative`` (>= 0), ``fraction`` (in [0, 1]) or just ``finite``. A field left
    unset (None) passes; NaN and infinities fail every check."""
    p: List[str] = []
    checks = ((positive, lambda x: x > 0, "must be > 0"), (non_negative, lambda x: x >= 0, "must be >= 0"),
              (fraction, lambda x: 0 <= x <= 1, "must be in [0, 1]"), (finite, lambda x: True, ""))
    for names, ok, rule in checks:
        for name in names:
            value = getattr(obj, name)
            if value is None:
                continue
            key = f"{prefix}.{name}" if prefix else name
            if isinstance(value, float) and not math.isfinite(value):
                p.append(f"{key}={value} must be a finite number")
            elif not ok(value):
                p.append(f"{key}={value} {rule}")
    return p


def parallel_problems(par: ParallelConfig, prefix: str = "parallel") -> List[str]:
    """Sizes of a layout that no world size can satisfy."""
    p: List[str] = []
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if tp < 1:
        p.append(f"{prefix}.tensor_model_parallel_size={tp} must be >= 1")
    if pp < 1:
        p.append(f"{prefix}.pipeline_model_parallel_size={pp} must be >= 1")
    vpp = par.virtual_pipeline_model_parallel_size
    if vpp is not None and vpp < 1:
        p.append(f"{prefix}.virtual_pipeline_model_parallel_size={vpp} must be >= 1")
    return p


def model_problems(m: ModelConfig, prefix: str = "model") -> List[str]:
    p: List[str] = []
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "vocab_size", "max_position_embeddings",
                 "make_vocab_size_divisible_by"):
        if getattr(m, name) <= 0:
            p.append(f"{prefix}.{name}={getattr(m, name)} must be positive")
    p += range_problems(m, prefix, positive=("rope_theta", "norm_eps", "init_method_std",
                                             "fp8_amax_history_len"))
    if m.rope_scaling is not None:
        p += range_problems(m.rope_scaling, f"{prefix}.rope_scaling", positive=(
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
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
    elif m.attention_backend not in ATTENTION_BACKENDS[m.transformer_impl]:
        p.append(f"{prefix}.attention_backend={m.attention_backend!r} is not one of "
                 f"{prefix}.transformer_impl={m.transformer_impl!r}'s: "
                 f"{', '.join(ATTENTION_BACKENDS[m.transformer_impl])}")
    if m.fp8 not in _FP8:
        p.append(f"{prefix}.fp8={m.fp8!r}: expected one of {_FP8}")
    if m.fp8 is not None and m.transformer_impl != "transformer_engine":
        p.append(f"{prefix}.fp8={m.fp8!r} needs {prefix}.transformer_impl='transformer_engine' "
                 f"(got {m.transformer_impl!r})")
    if m.fp8_amax_compute_algo not in _AMAX_ALGOS:
        p.append(f"{prefix}.fp8_amax_compute_algo={m.fp8_amax_compute_algo!r}: expected "
                 "'max' or 'most_recent'")
    p += range_problems(m, prefix, non_negative=("fp8_margin",), positive=("recompute_num_layers",))
    if m.recompute_granularity not in (None, *_RECOMPUTE):
        p.append(f"{prefix}.recompute_granularity={m.recompute_granularity!r}: expected "
                 "'full', 'selective' or null")
    if m.recompute_method not in _RECOMPUTE_METHODS:
        p.append(f"{prefix}.recompute_method={m.recompute_method!r}: expected 'uniform' or 'block'")
    if not isinstance(m.bias_activation_fusion, bool):
        p.append(f"{prefix}.bias_activation_fusion={m.bias_activation_fusion!r}: expected true or false")
    return p


def runtime_problems(r, prefix: str = "model") -> List[str]:
    """Values of a :class:`RuntimeConfig` (before a checkpoint's settings are known)."""
    allowed = {"params_dtype": _DTYPES, "transformer_impl": _IMPLS, "attention_backend": _ALL_BACKENDS,
               "fp8": ("hybrid", "e4m3", "none"), "fp8_amax_compute_algo": _AMAX_ALGOS,
               "recompute_granularity": (*_RECOMPUTE, "none"), "recompute_method": _RECOMPUTE_METHODS}
    p: List[str] = []
    for name, ok in allowed.items():
        value = getattr(r, name)
        if value is not None and value not in ok:
            p.append(f"{prefix}.{name}={value!r}: expected one of {', '.join(ok)} (or unset: the "
                     "checkpoint's)")
    if r.fp8 not in (None, "none") and r.transformer_impl not in (None, "transformer_engine"):
        p.append(f"{prefix}.fp8={r.fp8!r} needs {prefix}.transformer_impl='transformer_engine' "
                 f"(got {r.transformer_impl!r})")
    if r.transformer_impl in ATTENTION_BACKENDS and r.attention_backend is not None \
            and r.attention_backend not in ATTENTION_BACKENDS[r.transformer_impl]:
        p.append(f"{prefix}.attention_backend={r.attention_backend!r} is not one of "
                 f"{prefix}.transformer_impl={r.transformer_impl!r}'s: "
                 f"{', '.join(ATTENTION_BACKENDS[r.transformer_impl])}")
    p += range_problems(r, prefix, non_negative=("fp8_margin",),
                        positive=("fp8_amax_history_len", "recompute_num_layers"))
    return p


def shared_process_problems(models: Dict[str, ModelConfig]) -> List[str]:
    """Models built in the same processes (``{config prefix: model}``, e.g. PPO's roles
    on shared ranks): Transformer Engine takes its attention backend from process-wide
    settings (megatron-core sets ``NVTE_FLASH_ATTN``/``NVTE_FUSED_ATTN``/``NVTE_UNFUSED_ATTN``
    when it builds a model), so every TE model there must name the same one."""
    te = {prefix: m.attention_backend for prefix, m in models.items()
          if m.transformer_impl == "transformer_engine"}
    if len(set(te.values())) > 1:
        return ["Transformer Engine models sharing processes must use one attention backend: "
                + ", ".join(f"{prefix}.attention_backend={b!r}" for prefix, b in te.items())]
    return []


def fp8_shape_problems(m: ModelConfig, tp: int, prefix: str = "model", par_prefix: str = "parallel") -> List[str]:
    """FP8 GEMMs in Transformer Engine need every weight's input dimension divisible by 16
    and its output dimension by 8, on each tensor-parallel rank (TE's
    ``assert_dim_for_fp8_exec`` in transformer_engine/pytorch/utils.py)."""
    if m.fp8 is None or m.num_attention_heads <= 0 or m.hidden_size % m.num_attention_heads:
        return []
    d = m.kv_channels
    dims = {  # name: (per-rank size, multiple)
        f"{prefix}.hidden_size": (m.hidden_size, 16),
        f"{prefix}.ffn_hidden_size / {par_prefix}.tensor_model_parallel_size": (m.ffn_hidden_size / tp, 16),
        f"{prefix}.num_attention_heads x head size / {par_prefix}.tensor_model_parallel_size":
            (m.num_attention_heads * d / tp, 16),
        f"(query + 2 x key/value heads) x head size / {par_prefix}.tensor_model_parallel_size":
            ((m.num_attention_heads + 2 * m.num_query_groups) * d / tp, 8),
    }
    return [f"{prefix}.fp8={m.fp8!r}: {name} = {size:g} is not a multiple of {k} (FP8 GEMMs need it)"
            for name, (size, k) in dims.items() if size % k]


def layout_problems(m: ModelConfig, par: ParallelConfig, world_size: Optional[int],
                    prefix: str = "parallel", model_prefix: str = "model") -> List[str]:
    p = parallel_problems(par, prefix)
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
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
    if vpp is not None and pp == 1 and vpp > 1:
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
    if m.recompute_granularity == "full" and m.recompute_method == "block" \
            and m.recompute_num_layers > m.num_layers // stages:
        p.append(f"{model_prefix}.recompute_num_layers={m.recompute_num_layers} exceeds the "
                 f"{m.num_layers // stages} layers of a pipeline stage ({model_prefix}.recompute_method='block')")
    p += fp8_shape_problems(m, tp, model_prefix, prefix)
    return p


def check_model(m: ModelConfig, prefix: str = "model") -> None:
    _raise(model_problems(m, prefix))


def check_layout(m: ModelConfig, par: ParallelConfig, world_size: Optional[int] = None,
                 prefix: str = "parallel", model_prefix: str = "model") -> None:
    """Raise :class:`ConfigError` listing every conflict between a model and its layout."""
    _raise(model_problems(m, model_prefix) + layout_problems(m, par, world_size, prefix, model_prefix))
