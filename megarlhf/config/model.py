"""Model shape and precision: typed, frozen dataclasses (OmegaConf structured configs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

__all__ = ["RopeScaling", "ModelConfig", "RuntimeConfig", "PRESETS", "preset", "padded_vocab_size"]


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style RoPE frequency scaling (``rope_type: llama3`` in HF configs)."""

    factor: float = 8.0
    """Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are
    stretched by this factor."""
    low_freq_factor: float = 1.0
    """Lower bound of the smoothly interpolated band (as in HF ``rope_scaling``)."""
    high_freq_factor: float = 4.0
    """Upper bound of the smoothly interpolated band."""
    original_max_position_embeddings: int = 8192
    """Context length the model was pre-trained with before scaling."""


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention, untied
    input and output embeddings."""

    preset: Optional[str] = None
    """Name of a shape preset (``tiny``, ``llama2-7b`` ...). Its fields are the defaults;
    fields given beside it override them. Informational once resolved."""
    num_layers: int = 4
    """Transformer layers."""
    hidden_size: int = 256
    """Model width."""
    ffn_hidden_size: int = 688
    """Width of the SwiGLU MLP (per branch)."""
    num_attention_heads: int = 8
    """Query heads."""
    num_query_groups: int = 2
    """Key/value heads (grouped-query attention); equal to the heads for plain MHA."""
    vocab_size: int = 4096
    """Real vocabulary size (the tokenizer's). Padded internally for TP; padded rows are
    never sampled and never change a log-prob."""
    max_position_embeddings: int = 512
    """Longest sequence the model is used with (RoPE tables are built for it)."""
    rope_theta: float = 10000.0
    """RoPE base frequency (Llama 2: 10,000; Llama 3: 500,000)."""
    rope_scaling: Optional[RopeScaling] = None
    """Llama 3.1-style RoPE scaling, or none."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_method_std: float = 0.02
    """Std of the normal initialisation of fresh weights."""
    make_vocab_size_divisible_by: int = 128
    """The padded vocabulary is a multiple of this times the TP size (as in Megatron-LM)."""
    params_dtype: str = "float32"
    """Parameter and compute dtype: ``float32``, ``bfloat16`` (megatron's mixed precision
    keeps fp32 master weights in the optimizer) or ``auto``: bf16 on GPUs and on CPUs with
    AMX bf16 units, fp32 elsewhere."""
    transformer_impl: str = "local"
    """Layer implementation: ``local`` (torch layers, runs anywhere) or
    ``transformer_engine`` (needs Transformer Engine and a GPU)."""
    fp8: Optional[str] = None
    """FP8 recipe for Transformer Engine layers: ``hybrid`` (E4M3 forward, E5M2 backward),
    ``e4m3``, or none."""
    attention_backend: str = "unfused"
    """Core attention of the local layers: ``unfused`` (megatron's: scores, mask, softmax
    as separate steps) or ``sdpa`` (torch's fused ``scaled_dot_product_attention``)."""
    fp8_amax_history_len: int = 1024
    """Delayed-scaling amax history length."""
    fp8_amax_compute_algo: str = "max"
    """``max`` or ``most_recent`` over the amax history."""
    fp8_margin: int = 0
    """Scaling-factor margin (powers of two) for FP8."""
    recompute_granularity: Optional[str] = None
    """Activation recomputation: ``full``, ``selective`` or none."""

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self, padded_vocab: Optional[int] = None) -> int:
        """Parameter count of the causal LM (untied embeddings)."""
        v = padded_vocab or self.vocab_size
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        attn = h * (self.num_attention_heads + 2 * self.num_query_groups) * d + self.num_attention_heads * d * h
        mlp = 3 * h * f
        layer = attn + mlp + 2 * h
        return self.num_layers * layer + 2 * v * h + h


@dataclass(frozen=True)
class RuntimeConfig:
    """How a model started from a checkpoint runs (its shape comes from the checkpoint).
    Each field left unset keeps the checkpoint's value; ``none`` switches FP8 or
    recomputation off."""

    params_dtype: Optional[str] = None
    """``float32``, ``bfloat16`` or ``auto``."""
    transformer_impl: Optional[str] = None
    """``local`` or ``transformer_engine``."""
    fp8: Optional[str] = None
    """``hybrid``, ``e4m3`` or ``none`` (needs ``transformer_impl: transformer_engine``)."""
    recompute_granularity: Optional[str] = None
    """``full``, ``selective`` or ``none``."""

    def apply(self, m: "ModelConfig") -> "ModelConfig":
        """``m`` with the fields this config sets."""
        changes: Dict[str, Any] = {}
        for name in ("params_dtype", "transformer_impl", "fp8", "recompute_granularity"):
            value = getattr(self, name)
            if value is not None:
                changes[name] = None if value == "none" else value
        return dataclasses.replace(m, **changes) if changes else m


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's vocabulary padding: the next multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


_LLAMA2_BASE: Dict[str, Any] = dict(
    vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0, norm_eps=1e-5,
    params_dtype="bfloat16",
)
_LLAMA3_BASE: Dict[str, Any] = dict(
    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, norm_eps=1e-5,
    params_dtype="bfloat16",
)

PRESETS: Dict[str, Dict[str, Any]] = {
    # Tests and the demo: 4.9M parameters, GQA on.
    "tiny": dict(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=8,
                 num_query_groups=2, vocab_size=4096, max_position_embeddings=512),
    "llama2-7b": dict(_LLAMA2_BASE, num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                      num_attention_heads=32, num_query_groups=32),
    "llama2-13b": dict(_LLAMA2_BASE, num_layers=40, hidden_size=5120, ffn_hidden_size=13824,
                       num_attention_heads=40, num_query_groups=40),
    "llama2-70b": dict(_LLAMA2_BASE, num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                       num_attention_heads=64, num_query_groups=8),
    "llama3-8b": dict(_LLAMA3_BASE, num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                      num_attention_heads=32, num_query_groups=8),
    "llama3-70b": dict(_LLAMA3_BASE, num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                       num_attention_heads=64, num_query_groups=8),
}
# Tulu 2 13B is Llama 2 13B with an extended context.
PRESETS["tulu2-13b"] = dict(PRESETS["llama2-13b"], max_position_embeddings=8192)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise KeyError(f"model.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
    fields = dict(PRESETS[name], preset=name)
    fields.update(overrides)
    if isinstance(fields.get("rope_scaling"), dict):
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return ModelConfig(**fields)


def model_fields() -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(ModelConfig)}
