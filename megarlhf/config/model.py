"""Model shape and precision: typed, frozen dataclasses (OmegaConf structured configs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

__all__ = ["RopeScaling", "ModelConfig", "RuntimeConfig", "RUNTIME_FIELDS", "PRESETS", "preset",
           "padded_vocab_size", "with_runtime_of"]


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
    """A Llama-family decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention, input and
    output embeddings untied or tied."""

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
    tie_word_embeddings: bool = False
    """The LM head is the input embedding matrix (one tensor, as HF ``tie_word_embeddings``);
    with pipeline parallelism the last stage holds a copy kept equal to it. Reward and value
    models, whose scalar head replaces the LM head, are never tied."""
    # -- how the model runs (RUNTIME_FIELDS): a checkpoint records them, a recipe's
    # ``model:`` settings override them -------------------------------------------------
    params_dtype: str = "float32"
    """Parameter and compute dtype: ``float32``, ``bfloat16`` (megatron's mixed precision
    keeps fp32 master weights in the optimizer) or ``auto``: bf16 on GPUs and on CPUs with
    AMX bf16 units, fp32 elsewhere."""
    transformer_impl: str = "local"
    """Layer implementation: ``local`` (torch layers, runs anywhere) or
    ``transformer_engine`` (Transformer Engine's fused layers; needs TE and a GPU)."""
    attention_backend: str = "auto"
    """Core attention. Local layers: ``auto`` or ``unfused`` (megatron's: scores, mask,
    softmax as separate steps), ``sdpa`` (torch's fused ``scaled_dot_product_attention``).
    Transformer Engine layers: ``fused`` (cuDNN), ``flash`` (flash-attention), ``unfused``
    (TE's own unfused kernel) or ``auto`` (TE picks). TE takes the choice from process-wide
    settings: every TE model of one process must name the same one."""
    fp8: Optional[str] = None
    """FP8 for Transformer Engine layers (delayed scaling): ``hybrid`` (E4M3 forward, E5M2
    gradients), ``e4m3``, or none. Needs a GPU of compute capability 8.9+ (Ada, Hopper).
    The linear layers' GEMMs run in FP8 for training and log-prob passes; parameters stay
    in ``params_dtype``; generation runs in ``params_dtype``."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: how many steps of each tensor's absolute maximum are kept."""
    fp8_amax_compute_algo: str = "max"
    """Delayed scaling: ``max`` or ``most_recent`` over the amax history."""
    fp8_margin: int = 0
    """Delayed scaling: the scaling factor is lowered by 2^margin (headroom)."""
    recompute_granularity: Optional[str] = None
    """Activation recomputation: ``full`` (whole layers), ``selective`` (the attention
    core only) or none."""
    recompute_method: str = "uniform"
    """With ``full``: ``uniform`` (every layer, in groups of ``recompute_num_layers``) or
    ``block`` (only the first ``recompute_num_layers`` layers of each pipeline stage)."""
    recompute_num_layers: int = 1
    """With ``full``: layers per recomputed group (``uniform``) or layers recomputed per
    stage (``block``)."""
    bias_activation_fusion: bool = False
    """Fuse SwiGLU's activation into one kernel, compiled at run time by torch.compile
    (Triton): GPUs only, and the compute nodes need a C compiler. Checked before training
    starts."""

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self, padded_vocab: Optional[int] = None) -> int:
        """Parameter count of the causal LM (one embedding matrix if tied)."""
        v = padded_vocab or self.vocab_size
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        attn = h * (self.num_attention_heads + 2 * self.num_query_groups) * d + self.num_attention_heads * d * h
        mlp = 3 * h * f
        layer = attn + mlp + 2 * h
        embeddings = (1 if self.tie_word_embeddings else 2) * v * h
        return self.num_layers * layer + embeddings + h


# The fields of ModelConfig that say how a model runs, not what it is: a checkpoint
# records them, and every recipe can set them for the models it builds.
RUNTIME_FIELDS = ("params_dtype", "transformer_impl", "attention_backend", "fp8", "fp8_amax_history_len",
                  "fp8_amax_compute_algo", "fp8_margin", "recompute_granularity", "recompute_method",
                  "recompute_num_layers", "bias_activation_fusion")
# Optional fields switched off by the value "none" in a RuntimeConfig.
_NONE_OFF = ("fp8", "recompute_granularity")


@dataclass(frozen=True)
class RuntimeConfig:
    """How a model started from a checkpoint runs (its shape comes from the checkpoint):
    every runtime field of :class:`ModelConfig`, each meaning the same as there. A field
    left unset keeps the checkpoint's value; ``none`` switches FP8 or recomputation off."""

    params_dtype: Optional[str] = None
    """``float32``, ``bfloat16`` or ``auto``."""
    transformer_impl: Optional[str] = None
    """``local`` or ``transformer_engine``."""
    attention_backend: Optional[str] = None
    """Local layers: ``auto``, ``unfused``, ``sdpa``; Transformer Engine: ``fused``,
    ``flash``, ``unfused``, ``auto``."""
    fp8: Optional[str] = None
    """``hybrid``, ``e4m3`` or ``none`` (needs ``transformer_impl: transformer_engine``)."""
    fp8_amax_history_len: Optional[int] = None
    """Delayed-scaling amax history length."""
    fp8_amax_compute_algo: Optional[str] = None
    """``max`` or ``most_recent``."""
    fp8_margin: Optional[int] = None
    """Scaling-factor margin (powers of two)."""
    recompute_granularity: Optional[str] = None
    """``full``, ``selective`` or ``none``."""
    recompute_method: Optional[str] = None
    """``uniform`` or ``block`` (with ``full``)."""
    recompute_num_layers: Optional[int] = None
    """Layers per recomputed group (``uniform``) or per stage (``block``)."""
    bias_activation_fusion: Optional[bool] = None
    """Fused SwiGLU compiled at run time (GPUs with a C compiler)."""

    def apply(self, m: "ModelConfig") -> "ModelConfig":
        """``m`` with the fields this config sets."""
        changes: Dict[str, Any] = {}
        for name in RUNTIME_FIELDS:
            value = getattr(self, name)
            if value is not None:
                changes[name] = None if (name in _NONE_OFF and value == "none") else value
        return dataclasses.replace(m, **changes) if changes else m


def with_runtime_of(shape: "ModelConfig", runtime: "ModelConfig") -> "ModelConfig":
    """``shape`` (e.g. a checkpoint's model) run as ``runtime`` says: its runtime fields."""
    return dataclasses.replace(shape, **{name: getattr(runtime, name) for name in RUNTIME_FIELDS})


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
