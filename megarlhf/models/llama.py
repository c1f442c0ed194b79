"""Llama-family models on megatron-core's ``GPTModel``.

    chunks = build_model(cfg.model, mp, kind="causal")   # one chunk, or several with VPP

A model is a list of megatron ``GPTModel`` chunks for this pipeline rank (one chunk
unless virtual pipelining is on). ``kind`` is ``causal`` (LM head over the vocabulary)
or ``reward`` (a scalar head: one value per token, see :mod:`megarlhf.models.heads`).

Padded vocabulary: megatron pads the output layer to a multiple of
``make_vocab_size_divisible_by x TP``. A forward hook on the output layer sets the padded
logits to the dtype's most negative value, so padded ids never get probability mass,
are never sampled or chosen by argmax, and every log-softmax equals the one over the real
vocabulary. The hook works on vocab-parallel shards and on gathered logits alike.

Tied embeddings (``tie_word_embeddings``, causal models only): megatron's own sharing
(``share_embeddings_and_output_weights``). On one stage the output layer has no weight
and projects with the embedding matrix (:func:`output_weight`). With pipeline parallelism
the last stage holds a copy: megatron zeroes it and all-reduces it with the first stage's
embedding over the layout's ``embd`` group (first and last stage of each pipeline) when
the model is built, ``finalize_model_grads`` all-reduces the two gradients over the same
group before every optimizer step, and the checkpoint stores the embedding once (the
copy is saved as a replica of ``embedding.word_embeddings.weight``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import List, Optional

import torch
import torch.nn.functional as F

from megarlhf import platform
from megarlhf.config.model import ModelConfig, padded_vocab_size
from megarlhf.config.validate import ConfigError, check_layout
from megarlhf.parallel import ModelParallel, scope_fp8_amax

__all__ = [
    "KINDS",
    "transformer_config",
    "build_model",
    "unwrap",
    "llama3_inv_freq",
    "padded_vocab",
    "sequence_multiple",
    "model_sequence_multiple",
    "sequence_multiple_of",
    "check_row_length",
    "packed_model",
    "packing_problems",
    "pad_to",
    "ties_embeddings",
    "output_weight",
]

KINDS = ("causal", "reward")


def padded_vocab(cfg: ModelConfig, tp: int) -> int:
    return padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)


def ties_embeddings(cfg: ModelConfig, kind: str) -> bool:
    """Whether a model of ``kind`` built from ``cfg`` shares its embedding and LM head: a
    reward or value model's scalar head replaces the LM head and is never tied, even when
    its trunk comes from a tied causal checkpoint."""
    return cfg.tie_word_embeddings and kind == "causal"


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The ``[padded vocab / TP, hidden]`` matrix the last stage of a causal ``GPTModel``
    projects hidden states with: the output layer's own weight, or with tied embeddings
    megatron's shared one (the embedding on a single stage, its copy on the last stage)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def sequence_multiple(tp: int, sequence_parallel: bool, fp8: bool) -> int:
    """What every padded row length (tokens per sequence of a batch) must be a multiple of.

    Each rank's GEMMs see ``batch x sequence`` tokens, the sequence split over the TP ranks
    under sequence parallelism (megatron scatters it: a multiple of TP). FP8 GEMMs in
    Transformer Engine need the tokens of each rank's input to be a multiple of 8
    (``assert_dim_for_fp8_exec``, transformer_engine/pytorch/utils.py, on the per-rank
    input before the sequence-parallel gather) and its backward uses them as the inner
    dimension of the weight-gradient GEMM, so rows are padded to 16 per rank, whatever the
    batch size. Without FP8, 8 (tensor-core friendly shapes)."""
    per_rank = 16 if fp8 else 8
    return per_rank * tp if sequence_parallel else per_rank


def model_sequence_multiple(cfg: ModelConfig, par) -> int:
    """:func:`sequence_multiple` of a model config run at layout ``par`` (a ParallelConfig)."""
    return sequence_multiple(par.tp, par.sequence_parallel, cfg.fp8 is not None)


def check_row_length(seq_length: int, model_cfg, par, key: str = "train.seq_length") -> int:
    """The row-length multiple of ``model_cfg`` at layout ``par``
    (:func:`model_sequence_multiple`). With FP8 or sequence parallelism, ``seq_length`` (the
    longest row) must be one of them; else rows are rounded up to 8 within it."""
    multiple = model_sequence_multiple(model_cfg, par)
    if (model_cfg.fp8 is not None or par.sequence_parallel) and seq_length % multiple:
        raise ConfigError([f"{key}={seq_length} is not a multiple of {multiple}: rows are padded to "
                           f"multiples of {multiple} with fp8={model_cfg.fp8!r}, sequence_parallel="
                           f"{par.sequence_parallel}, tensor_model_parallel_size={par.tp}"])
    return multiple


def sequence_multiple_of(chunks) -> int:
    """:func:`sequence_multiple` of built model chunks (read from their megatron config)."""
    from megatron.core.utils import get_model_config

    c = get_model_config(chunks[0])
    return sequence_multiple(c.tensor_model_parallel_size, c.sequence_parallel, c.fp8 is not None)


def pad_to(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-length // multiple) * multiple


PACKING_UNFUSED = ("train.packing=true needs model.attention_backend=sdpa (or auto) with local layers: megatron's "
                   "unfused attention takes no packed sequences; set one of them")


def packing_problems(runtime, prefix: str = "model") -> List[str]:
    """What a configured model (a ``RuntimeConfig`` or ``ModelConfig``) says against packed
    sequences: megatron's local unfused attention takes none (Transformer Engine layers
    take them as they are: megatron hands TE's attention the ``thd`` layout)."""
    local = runtime.transformer_impl != "transformer_engine"
    if local and runtime.attention_backend == "unfused":
        return [PACKING_UNFUSED.replace("model.", f"{prefix}.")]
    return []


def packed_model(model_cfg: ModelConfig, packing: bool, say=None, prefix: str = "model",
                 strict: bool = True) -> ModelConfig:
    """``model_cfg`` as packed sequences (megatron's ``thd`` layout) need it: local layers
    attend through ``sdpa`` (``auto`` resolves to it, reported through ``say``), unfused
    attention is refused naming the fix (``strict=False``: returned as it is, for a caller
    that reports :func:`packing_problems` itself); Transformer Engine layers as they are."""
    if not packing:
        return model_cfg
    problems = packing_problems(model_cfg, prefix)
    if problems:
        if not strict:
            return model_cfg
        raise ConfigError(problems)
    if model_cfg.transformer_impl == "transformer_engine":
        return model_cfg  # TE's own attention takes the packed layout
    if model_cfg.attention_backend != "sdpa":
        if say is not None:
            say(f"attention: sdpa (train.packing=true; {prefix}.attention_backend was {model_cfg.attention_backend})")
        model_cfg = dataclasses.replace(model_cfg, attention_backend="sdpa")
    return model_cfg


def transformer_config(cfg: ModelConfig, mp: ModelParallel):
    """megatron ``TransformerConfig`` for a Llama model under layout ``mp``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    plat = platform.current()
    bf16 = platform.resolve_dtype(cfg.params_dtype) == "bfloat16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    par = mp.config
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        autocast_dtype=dtype,
        # Full-size weights are initialised on the host and then split, so every TP
        # layout starts from the same weights for the same seed. GPUs init in place.
        use_cpu_initialization=not plat.is_gpu,
        # The fused CUDA kernels (softmax, RoPE, bias-activation) exist only on GPUs.
        masked_softmax_fusion=plat.is_gpu and cfg.transformer_impl == "transformer_engine",
        apply_rope_fusion=False,
        # Compiled at run time (torch.compile / Triton, a C compiler on the node): only when
        # asked for, and checked before training starts (platform.kernel_problems).
        bias_activation_fusion=cfg.bias_activation_fusion,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_backend=_megatron_attention_backend(cfg),
    )
    if cfg.recompute_granularity == "full":
        kwargs.update(recompute_granularity="full", recompute_method=cfg.recompute_method,
                      recompute_num_layers=cfg.recompute_num_layers)
    elif cfg.recompute_granularity == "selective":
        kwargs.update(recompute_granularity="selective")
    if cfg.fp8 is not None:
        kwargs.update(
            fp8=cfg.fp8,
            fp8_recipe="delayed",
            fp8_margin=cfg.fp8_margin,
            fp8_amax_history_len=cfg.fp8_amax_history_len,
            fp8_amax_compute_algo=cfg.fp8_amax_compute_algo,
        )
    return TransformerConfig(**kwargs)


_NVTE_ATTENTION = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


def _megatron_attention_backend(cfg: ModelConfig):
    """megatron's ``AttnBackend`` for ``cfg``. Transformer Engine layers: the configured one
    (megatron turns it into TE's process-wide ``NVTE_*_ATTN`` switches when it builds the
    model). Local layers choose their attention by spec and read no switch: ``local``,
    with the switches kept as they were around the build (:func:`_te_switches_kept`)."""
    from megatron.core.transformer.enums import AttnBackend

    if cfg.transformer_impl == "transformer_engine":
        return AttnBackend[cfg.attention_backend]
    return AttnBackend.local


@contextlib.contextmanager
def _te_switches_kept(active: bool):
    """Build a local-layer model without touching TE's attention switches: megatron's
    language model sets (and asserts) ``NVTE_FLASH_ATTN`` / ``NVTE_FUSED_ATTN`` /
    ``NVTE_UNFUSED_ATTN`` for whatever backend its config names, which would clash with a
    Transformer Engine model of the same process (a PPO role) built before or after."""
    if not active:
        yield
        return
    saved = {k: os.environ.pop(k, None) for k in _NVTE_ATTENTION}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def llama3_inv_freq(dim: int, theta: float, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position_embeddings: int) -> torch.Tensor:
    """RoPE inverse frequencies with Llama 3.1 scaling (HF ``rope_type: llama3``).

    Wavelengths shorter than ``L / high_freq_factor`` are kept, longer than
    ``L / low_freq_factor`` divided by ``factor``, and smoothly interpolated between.
    """
    # An explicit host device: models are also built under a meta-device context.
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    old = original_max_position_embeddings
    low_wl, high_wl = old / low_freq_factor, old / high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return torch.where(medium, smoothed, scaled)


def _mask_padded_vocab_hook(vocab_size: int, padded: int, tp_size: int, tp_rank: int):
    shard = padded // tp_size

    def hook(module, inputs, output):
        logits, bias = output
        last = logits.shape[-1]
        if last == padded:  # gathered over TP
            start = 0
        elif last == shard:  # this rank's vocabulary shard
            start = tp_rank * shard
        else:  # not a vocabulary projection (never expected)
            return output
        first_pad = vocab_size - start
        if first_pad >= last:
            return output
        logits = logits.clone() if logits.requires_grad else logits
        logits[..., max(first_pad, 0):] = torch.finfo(logits.dtype).min
        return logits, bias

    return hook


def _build_chunk(cfg: ModelConfig, mp: ModelParallel, tconfig, kind: str,
                 vp_stage: Optional[int]) -> torch.nn.Module:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    from megarlhf.models.heads import ScalarHead
    from megarlhf.models.specs import block_spec

    vpp = mp.config.vpp
    first = mp.is_first_stage and (vp_stage in (None, 0))
    last = mp.is_last_stage and (vp_stage is None or vp_stage == vpp - 1)
    n_here = get_num_layers_to_build(tconfig, vp_stage=vp_stage, pp_rank=mp.pp_rank)
    padded = padded_vocab(cfg, mp.config.tp)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=block_spec(cfg, n_here),
        vocab_size=padded,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=first,
        post_process=last,
        parallel_output=True,
        share_embeddings_and_output_weights=ties_embeddings(cfg, kind),
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
        pg_collection=mp.pg_collection,
        vp_stage=vp_stage,
    )
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        inv = llama3_inv_freq(cfg.kv_channels, cfg.rope_theta, rs.factor, rs.low_freq_factor,
                              rs.high_freq_factor, rs.original_max_position_embeddings)
        model.rotary_pos_emb.inv_freq = inv.to(model.rotary_pos_emb.inv_freq.device)
        model.rotary_pos_emb_cache.clear()
    if last:
        if kind == "reward":
            model.output_layer = ScalarHead(tconfig, cfg.hidden_size, mp.tp_group, init_seed=mp.seed)
        else:
            model.output_layer.register_forward_hook(
                _mask_padded_vocab_hook(cfg.vocab_size, padded, mp.config.tp, mp.tp_rank))
    if cfg.fp8 is not None:
        scope_fp8_amax(model, mp)  # a layout apart from megatron's globals (PPO roles)
    model.megarlhf_kind = kind
    model.megarlhf_dp_group = mp.dp_group if mp.ranks is not None else None
    model.megarlhf_layout = f"tp{mp.config.tp}-pp{mp.config.pp}-dp{mp.dp_size}"
    return model


def build_model(cfg: ModelConfig, mp: ModelParallel, kind: str = "causal",
                wrap_bf16: bool = True, meta: bool = False) -> List[torch.nn.Module]:
    """The model chunks of this rank (one per virtual pipeline stage), on this platform's
    device; bf16 models are wrapped in megatron's ``Float16Module``.

    ``meta=True`` builds shapes only (no memory): enough for ``sharded_state_dict()``,
    which is how the converters learn megatron's checkpoint layout for any model size.
    """
    if kind not in KINDS:
        raise ValueError(f"model kind {kind!r}: expected one of {KINDS}")
    check_layout(cfg, mp.config)
    if not meta:  # a clear error before building (recipes check earlier, naming their keys)
        problems = platform.models_problems({"model": cfg})
        if problems:
            raise RuntimeError("; ".join(problems))
    tconfig = transformer_config(cfg, mp)
    if meta:
        tconfig = dataclasses.replace(tconfig, use_cpu_initialization=True, perform_initialization=False)
    plat = platform.current()
    vpp = mp.config.virtual_pipeline_model_parallel_size
    stages = [None] if vpp is None else list(range(vpp))
    chunks = []
    local = cfg.transformer_impl == "local"
    for vp_stage in stages:
        if meta:
            with torch.device("meta"), _te_switches_kept(local):
                chunk = _build_chunk(cfg, mp, tconfig, kind, vp_stage)
            chunks.append(chunk)
            continue
        with _te_switches_kept(local):
            chunk = _build_chunk(cfg, mp, tconfig, kind, vp_stage)
        chunk.to(plat.device)
        if tconfig.bf16 and wrap_bf16:
            from megatron.core.transformer.module import Float16Module

            chunk = Float16Module(tconfig, chunk)
        chunks.append(chunk)
    return chunks


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The bare ``GPTModel`` under DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def num_parameters(chunks: List[torch.nn.Module]) -> int:
    """Parameters held by this rank."""
    return sum(p.numel() for c in chunks for p in c.parameters())


def describe(cfg: ModelConfig, mp: ModelParallel) -> str:
    return (f"Llama {cfg.num_layers}L h{cfg.hidden_size} ffn{cfg.ffn_hidden_size} "
            f"heads {cfg.num_attention_heads}/{cfg.num_query_groups}kv vocab {cfg.vocab_size}"
            f"(padded {padded_vocab(cfg, mp.config.tp)}), {cfg.num_parameters() / 1e6:.1f}M params, "
            f"{platform.resolve_dtype(cfg.params_dtype)}, TP{mp.config.tp} PP{mp.config.pp} DP{mp.dp_size}")

