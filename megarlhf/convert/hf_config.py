"""Hugging Face Llama ``config.json`` <-> :class:`ModelConfig`.

Reads both the transformers 4 layout (``rope_theta``, ``rope_scaling``) and the
transformers 5 layout (``rope_parameters``). An export writes back the source's own
``config.json`` when the checkpoint recorded it (its RoPE layout, special-token ids and
every other key as they came in, the shape from the model); otherwise the transformers 4
layout, which both read.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

from megarlhf.config.model import ModelConfig, RopeScaling
from megarlhf.models.llama import ties_embeddings

__all__ = ["ConversionError", "read_hf_config", "model_config_from_hf", "hf_config_from_model",
           "HF_CAUSAL_ARCH", "HF_REWARD_ARCH"]

HF_CAUSAL_ARCH = "LlamaForCausalLM"
HF_REWARD_ARCH = "LlamaForSequenceClassification"
_SUPPORTED_TYPES = ("llama",)


class ConversionError(RuntimeError):
    """A checkpoint that cannot be converted, with the file and tensor or field named."""


def read_hf_config(hf_dir: str) -> Dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"Hugging Face folder not found: {hf_dir}")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir}: no config.json (is this a Hugging Face model folder?)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: unreadable: {e}") from e


def _rope(cfg: Dict[str, Any], where: str) -> Tuple[float, Optional[RopeScaling]]:
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = {**legacy, **{k: v for k, v in params.items() if k != "rope_theta"}}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ConversionError(f"{where}: rope type {rope_type!r} is not supported "
                              "(supported: default, llama3)")
    try:
        return theta, RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConversionError(f"{where}: llama3 rope scaling lacks field {e}") from e


def model_config_from_hf(cfg: Dict[str, Any], where: str = "config.json",
                         params_dtype: Optional[str] = None) -> Tuple[ModelConfig, Dict[str, Any]]:
    """A :class:`ModelConfig` and facts about the source (kind, tied embeddings, dtype)."""
    mtype = cfg.get("model_type")
    if mtype not in _SUPPORTED_TYPES:
        raise ConversionError(f"{where}: model_type {mtype!r} is not supported "
                              f"(supported: {', '.join(_SUPPORTED_TYPES)})")
    archs = cfg.get("architectures") or [HF_CAUSAL_ARCH]
    arch = archs[0]
    if arch not in (HF_CAUSAL_ARCH, HF_REWARD_ARCH):
        raise ConversionError(f"{where}: architecture {arch!r} is not supported "
                              f"(supported: {HF_CAUSAL_ARCH}, {HF_REWARD_ARCH})")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConversionError(f"{where}: {flag}=true is not supported (Llama has no biases)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{where}: hidden_act {act!r} is not supported (Llama uses silu)")
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        fields = dict(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(cfg["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(cfg.get("num_key_value_heads") or heads),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        )
    except KeyError as e:
        raise ConversionError(f"{where}: required field {e} is missing") from e
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) != hidden // heads:
        raise ConversionError(f"{where}: head_dim={head_dim} differs from hidden_size/"
                              f"num_attention_heads={hidden // heads}; not supported")
    theta, scaling = _rope(cfg, where)
    src_dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if params_dtype is None:
        params_dtype = "float32" if src_dtype == "float32" else "bfloat16"
    kind = "reward" if arch == HF_REWARD_ARCH else "causal"
    if kind == "reward" and int(cfg.get("num_labels", len(cfg.get("id2label") or {0: 0}))) != 1:
        raise ConversionError(f"{where}: a reward model must have num_labels=1")
    tied = bool(cfg.get("tie_word_embeddings", False))
    # A sequence classifier has no LM head to tie: its score layer stays its own.
    model = ModelConfig(rope_theta=theta, rope_scaling=scaling, params_dtype=params_dtype,
                        tie_word_embeddings=tied and kind == "causal", **fields)
    facts = dict(kind=kind, tied=tied, source_dtype=src_dtype, architecture=arch)
    return model, facts


def hf_config_from_model(m: ModelConfig, kind: str, dtype: str,
                         bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
                         pad_token_id: Optional[int] = None,
                         source: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The ``config.json`` of model ``m`` of ``kind`` exported in ``dtype``.

    ``source``: the ``config.json`` the checkpoint was converted from (recorded at import).
    The export starts from it, so special-token ids, the RoPE layout (transformers 5's
    ``rope_parameters`` or 4's ``rope_theta``/``rope_scaling``) and every other key come
    back as they came in; the shape, RoPE values, tying, architecture and dtype are the
    model's. Without it, the transformers 4 layout. Token ids given here are written (over
    the source's)."""
    tied = ties_embeddings(m, kind)
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    if source is not None:
        cfg = _onto_source(m, kind, dtype, tied, source)
        cfg.update({k: v for k, v in ids.items() if v is not None})
        return cfg
    cfg: Dict[str, Any] = {
        "architectures": [HF_REWARD_ARCH if kind == "reward" else HF_CAUSAL_ARCH],
        "model_type": "llama",
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.kv_channels,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "initializer_range": m.init_method_std,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if m.rope_scaling is not None:
        cfg["rope_scaling"] = _llama3_fields(m.rope_scaling)
    cfg.update({k: v for k, v in ids.items() if v is not None})
    if kind == "reward":
        cfg.update(_REWARD_FIELDS)
    return cfg


_REWARD_FIELDS = {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
_SCALING_KEYS = ("type", "factor", "low_freq_factor", "high_freq_factor",
                 "original_max_position_embeddings")


def _llama3_fields(rs: RopeScaling) -> Dict[str, Any]:
    return {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings}


def _kept(old: Any, new: Any) -> Any:
    """``new``, or the source's ``old`` where it is the same number (``10000`` stays an
    integer, ``1e-05`` keeps its spelling)."""
    same = (isinstance(old, (int, float)) and not isinstance(old, bool)
            and isinstance(new, (int, float)) and float(old) == float(new))
    return old if same else new


def _rope_onto(rope: Optional[Dict[str, Any]], m: ModelConfig, theta_inside: bool) -> Dict[str, Any]:
    """The source's RoPE dict (``rope_parameters``, or ``rope_scaling`` when
    ``theta_inside`` is false) with the model's values; keys it does not describe stay."""
    out = {k: v for k, v in (rope or {}).items() if k not in _SCALING_KEYS + ("rope_type",)}
    if theta_inside:
        out["rope_theta"] = _kept((rope or {}).get("rope_theta"), m.rope_theta)
    if m.rope_scaling is None:
        out["rope_type"] = "default"
    else:
        out.update({k: _kept((rope or {}).get(k), v) for k, v in _llama3_fields(m.rope_scaling).items()})
    return out


def _onto_source(m: ModelConfig, kind: str, dtype: str, tied: bool,
                 source: Dict[str, Any]) -> Dict[str, Any]:
    cfg = json.loads(json.dumps(source))  # a deep copy: the recorded one stays as it was
    shape = {
        "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups, "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_position_embeddings, "rms_norm_eps": m.norm_eps,
    }
    if "head_dim" in cfg:  # else transformers derives it: hidden / heads, as megarlhf does
        shape["head_dim"] = m.kv_channels
    cfg.update({k: _kept(cfg.get(k), v) for k, v in shape.items()})
    if "rope_parameters" in cfg:  # transformers 5
        cfg["rope_parameters"] = _rope_onto(cfg["rope_parameters"], m, theta_inside=True)
    else:  # transformers 4: rope_theta (default 10,000) beside an optional rope_scaling
        if "rope_theta" in cfg or m.rope_theta != 10000.0:
            cfg["rope_theta"] = _kept(cfg.get("rope_theta"), m.rope_theta)
        if m.rope_scaling is not None or cfg.get("rope_scaling"):
            cfg["rope_scaling"] = _rope_onto(cfg.get("rope_scaling"), m, theta_inside=False)
    if tied or "tie_word_embeddings" in cfg:  # absent means untied to transformers
        cfg["tie_word_embeddings"] = tied
    arch = HF_REWARD_ARCH if kind == "reward" else HF_CAUSAL_ARCH
    if (cfg.get("architectures") or [None])[0] != arch:  # a reward model from a causal LM
        cfg["architectures"] = [arch]
        if kind == "reward":
            cfg.update(_REWARD_FIELDS)
    dtype_keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
    cfg.update({k: dtype for k in dtype_keys})
    return cfg
