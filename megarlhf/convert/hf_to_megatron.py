"""Hugging Face Llama (safetensors or ``.bin``) -> megatron-core distributed checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir Llama-2-13b-hf --out ckpt/llama2-13b

The output loads at any TP x PP (megatron's ``torch_dist`` format stores each tensor
with its global shape). The layout of every tensor is taken from a megatron model built
on the ``meta`` device, so keys always match what the models ask for; the weights are
streamed: source tensors are memory-mapped, fused QKV matrices are computed one layer
at a time into a scratch file, so private memory stays near one layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Callable, Dict, List, Optional, Set

import torch

from megarlhf import platform
from megarlhf.convert.hf_config import ConversionError, model_config_from_hf, read_hf_config
from megarlhf.convert.tensor_io import HFTensorReader, Scratch
from megarlhf.data.chat import ChatTemplateError, read_hf_chat_template

__all__ = ["convert_hf_to_megatron", "main", "fuse_qkv", "split_qkv"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_IMPLS = ("local", "transformer_engine")
# Buffers some old checkpoints carry that are recomputed by every implementation.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
             num_groups: int) -> torch.Tensor:
    """HF ``q_proj [nh*d, h]``, ``k_proj``/``v_proj [ng*d, h]`` -> megatron ``linear_qkv``
    ``[ng*(nh/ng + 2)*d, h]``: per query group, its query heads, then its key, then its
    value head (so TP can split whole groups)."""
    hidden = q.shape[1]
    d = q.shape[0] // num_heads
    per = num_heads // num_groups
    qg = q.reshape(num_groups, per * d, hidden)
    kg = k.reshape(num_groups, d, hidden)
    vg = v.reshape(num_groups, d, hidden)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int):
    """Inverse of :func:`fuse_qkv`: returns ``(q, k, v)`` in HF layout."""
    hidden = qkv.shape[1]
    per = num_heads // num_groups
    d = qkv.shape[0] // (num_groups * (per + 2))
    g = qkv.reshape(num_groups, (per + 2) * d, hidden)
    q, k, v = torch.split(g, [per * d, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def _layer_sources(i: int) -> Dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight", "o": p + "self_attn.o_proj.weight",
        "gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight", "ln1": p + "input_layernorm.weight",
        "ln2": p + "post_attention_layernorm.weight",
    }


def expected_hf_tensors(model, kind: str) -> Dict[str, List[int]]:
    """Every tensor a Hugging Face Llama of this shape must hold, with its shape: no
    ``lm_head.weight`` when the embeddings are tied (``model.tie_word_embeddings``)."""
    h, f, d, V = model.hidden_size, model.ffn_hidden_size, model.kv_channels, model.vocab_size
    nh, ng = model.num_attention_heads, model.num_query_groups
    out: Dict[str, List[int]] = {"model.embed_tokens.weight": [V, h], "model.norm.weight": [h]}
    if kind == "reward":
        out["score.weight"] = [1, h]
    elif not model.tie_word_embeddings:
        out["lm_head.weight"] = [V, h]
    for i in range(model.num_layers):
        s = _layer_sources(i)
        out.update({s["q"]: [nh * d, h], s["k"]: [ng * d, h], s["v"]: [ng * d, h],
                    s["o"]: [h, nh * d], s["gate"]: [f, h], s["up"]: [f, h], s["down"]: [h, f],
                    s["ln1"]: [h], s["ln2"]: [h]})
    return out


def check_source(reader: HFTensorReader, expected: Dict[str, List[int]], tied: bool) -> None:
    """Missing, extra and misshapen tensors, each named with its file, before any work.
    ``tied``: the source declares tied embeddings, so an ``lm_head.weight`` it may also
    store is a copy of the embedding that transformers ignores too."""
    names = set(reader.names())
    missing = [n for n in expected if n not in names]
    if missing:
        raise ConversionError(f"{reader.hf_dir}: tensor {missing[0]!r} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(n for n in names - set(expected) if not n.endswith(_IGNORABLE_SUFFIXES)
                   and not (tied and n == "lm_head.weight"))
    if extra:
        raise ConversionError(f"{reader.hf_dir}: tensors with no megatron destination: {extra[:8]}"
                              + (f" and {len(extra) - 8} more" if len(extra) > 8 else ""))
    for name, shape in expected.items():
        got = list(reader.shape(name))
        if got != shape:
            raise ConversionError(f"{reader.file_of(name)}: tensor {name!r} has shape {got}, "
                                  f"expected {shape}")


def convert_hf_to_megatron(hf_dir: str, out_dir: str, model_type: Optional[str] = None,
                           dtype: Optional[str] = None, tokenizer: Optional[str] = None,
                           log: Callable[[str], None] = print,
                           transformer_impl: str = "local") -> Dict[str, object]:
    """Convert one HF folder; returns a summary (tensors, bytes, seconds, peak memory).

    ``transformer_impl`` is recorded in the checkpoint's metadata as the layers recipes
    build it with unless a config says otherwise; the weights are the same either way
    (megatron names the local layers' tensors as Transformer Engine's, and TE's FP8
    metadata starts fresh: see :func:`megarlhf.models.checkpoint.load_sharded`)."""
    t0 = time.perf_counter()
    if transformer_impl not in _IMPLS:
        raise ConversionError(f"transformer_impl={transformer_impl!r}: expected one of {_IMPLS}")
    hf_cfg = read_hf_config(hf_dir)
    model, facts = model_config_from_hf(hf_cfg, where=os.path.join(hf_dir, "config.json"),
                                        params_dtype=dtype)
    kind = facts["kind"]
    if model_type is not None and model_type != kind:
        if model_type == "reward":
            raise ConversionError(
                f"{hf_dir} is a causal LM ({facts['architecture']}); a reward model is trained "
                "from it by `megarlhf rm`, which replaces the LM head with a fresh scalar head. "
                "Convert it as --model-type causal.")
        raise ConversionError(f"{hf_dir} is a reward model ({facts['architecture']}): it has no "
                              "LM head to convert as --model-type causal")
    target_dtype = _DTYPES[platform.resolve_dtype(model.params_dtype)]
    reader = HFTensorReader(hf_dir)
    check_source(reader, expected_hf_tensors(model, kind), facts["tied"])
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"output folder {out_dir} exists and is not empty")
    os.makedirs(out_dir, exist_ok=True)

    # megatron-core is imported only once the source has been checked (it takes seconds).
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megarlhf.config.parallel import ParallelConfig
    from megarlhf.models.checkpoint import CheckpointMeta, write_meta
    from megarlhf.models.integrity import write_manifest
    from megarlhf.models.llama import build_model
    from megarlhf.parallel import init_single_process, initialize_model_parallel

    init_single_process()
    mp = initialize_model_parallel(ParallelConfig(), seed=0)
    meta_model = build_model(model, mp, kind=kind, meta=True)[0]
    sharded = meta_model.sharded_state_dict()
    apply_factories(sharded)

    # Beside the output (same file system), not inside it: megatron expects an empty folder.
    scratch = Scratch(os.path.dirname(out_dir))
    used: Set[str] = set()
    n_h, n_g, L = model.num_attention_heads, model.num_query_groups, model.num_layers

    def src(name: str, shape: Optional[List[int]] = None) -> torch.Tensor:
        used.add(name)  # names and shapes were checked by check_source
        return reader.get(name)

    h, f, d = model.hidden_size, model.ffn_hidden_size, model.kv_channels
    V = model.vocab_size

    def fill(sh: ShardedTensor) -> None:
        key = sh.key
        layer = sh.global_offset[0] if sh.prepend_axis_num else None
        s = _layer_sources(layer) if layer is not None else {}
        if key == "embedding.word_embeddings.weight":
            data = scratch.own(src("model.embed_tokens.weight", [V, h]), target_dtype)
        elif key == "decoder.final_layernorm.weight":
            data = scratch.own(src("model.norm.weight", [h]), target_dtype)
        elif key == "output_layer.weight" and kind == "reward":
            data = scratch.own(src("score.weight", [1, h]), target_dtype)
        elif key == "output_layer.weight":  # untied only: a tied model has no such tensor
            data = scratch.own(src("lm_head.weight", [V, h]), target_dtype)
        elif key == "decoder.layers.self_attention.linear_qkv.layer_norm_weight":
            data = scratch.own(src(s["ln1"], [h]), target_dtype)
        elif key == "decoder.layers.mlp.linear_fc1.layer_norm_weight":
            data = scratch.own(src(s["ln2"], [h]), target_dtype)
        elif key == "decoder.layers.self_attention.linear_qkv.weight":
            qkv = fuse_qkv(src(s["q"], [n_h * d, h]), src(s["k"], [n_g * d, h]),
                           src(s["v"], [n_g * d, h]), n_h, n_g)
            data = scratch.put(qkv.to(target_dtype))
            del qkv
        elif key == "decoder.layers.self_attention.linear_proj.weight":
            data = scratch.own(src(s["o"], [h, n_h * d]), target_dtype)
        elif key == "decoder.layers.mlp.linear_fc1.weight":
            # megatron stores SwiGLU's fc1 as two chunks along dim 0: gate, then up.
            part = sh.global_offset[sh.prepend_axis_num] // f
            data = scratch.own(src(s["gate" if part == 0 else "up"], [f, h]), target_dtype)
        elif key == "decoder.layers.mlp.linear_fc2.weight":
            data = scratch.own(src(s["down"], [h, f]), target_dtype)
        else:
            raise ConversionError(f"megatron key {key!r} has no Hugging Face source (unsupported "
                                  "model layout)")
        if tuple(data.shape) != tuple(sh.local_shape) and not sh.allow_shape_mismatch:
            raise ConversionError(f"{key} (layer {layer}): shape {tuple(data.shape)} does not "
                                  f"match megatron's {tuple(sh.local_shape)}")
        sh.data = data
        sh.dtype = data.dtype

    try:
        flat = list(nested_values(sharded))
        for item in flat:
            if isinstance(item, ShardedTensor):
                fill(item)
        # Embedding and LM head hold the real vocabulary only: megatron pads them with
        # zeros to whatever size the loading layout needs (allow_shape_mismatch).
        for name, item in list(sharded.items()):
            if isinstance(item, ShardedTensor) and item.allow_shape_mismatch:
                sharded[name] = ShardedTensor.from_rank_offsets(
                    item.key, item.data, replica_id=item.replica_id, allow_shape_mismatch=True)
        dist_checkpointing.save(sharded, out_dir)
    finally:
        scratch.cleanup()
    meta = CheckpointMeta(
        model=dataclasses.replace(model, transformer_impl=transformer_impl), kind=kind, tokenizer=tokenizer or _find_tokenizer(hf_dir),
        extra={"converted_from": os.path.abspath(hf_dir), "source_dtype": facts["source_dtype"],
               "source_architecture": facts["architecture"],
               # The whole source config.json: the export writes it back (token ids, RoPE
               # layout, every other key) with the model's shape.
               "hf_config": hf_cfg,
               **_chat_facts(hf_dir)},
        **({"chat_template": "jinja"} if read_hf_chat_template(hf_dir) else {}),
    )
    write_meta(out_dir, meta)
    _copy_tokenizer_files(hf_dir, out_dir)
    write_manifest(out_dir)
    n_bytes = sum(os.path.getsize(os.path.join(out_dir, x)) for x in os.listdir(out_dir)
                  if os.path.isfile(os.path.join(out_dir, x)))
    summary = dict(tensors=len(used), layers=L, kind=kind, out_bytes=n_bytes,
                   seconds=round(time.perf_counter() - t0, 3), dtype=model.params_dtype)
    log(f"converted {hf_dir} -> {out_dir}: {kind}, {L} layers, {len(used)} tensors, "
        f"{n_bytes / 2**20:.1f} MiB, {summary['seconds']} s")
    return summary


_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def _chat_facts(hf_dir: str) -> Dict[str, object]:
    """What the source says about chatting with it, for megarlhf.json: its chat template
    (``chat_template.jinja`` or ``tokenizer_config.json``'s: every recipe's default) and its
    generation settings (``generation_config.json``: their EOS ids also stop sampling)."""
    out: Dict[str, object] = {}
    try:
        jinja = read_hf_chat_template(hf_dir)
    except ChatTemplateError as e:
        raise ConversionError(str(e)) from e
    if jinja:
        out["chat_template_config"] = {"name": "jinja", "jinja": jinja}
    path = os.path.join(hf_dir, "generation_config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                gen = json.load(f)
        except (OSError, ValueError) as e:
            raise ConversionError(f"{path}: unreadable: {e}") from e
        if not isinstance(gen, dict):
            raise ConversionError(f"{path}: expected a JSON object")
        out["generation_config"] = gen
    return out


def _find_tokenizer(hf_dir: str) -> Optional[str]:
    for name in ("tokenizer.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(hf_dir, name)):
            return name  # relative: copied beside the checkpoint
    return None


def _copy_tokenizer_files(hf_dir: str, out_dir: str) -> None:
    for name in _TOKENIZER_FILES:
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(out_dir, name))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description="Convert a Hugging Face Llama checkpoint to a megatron-core distributed "
                    "checkpoint that loads at any TP x PP.")
    ap.add_argument("--hf-dir", required=True, help="folder with config.json and weights")
    ap.add_argument("--out", required=True, help="new (or empty) output folder")
    ap.add_argument("--model-type", choices=["causal", "reward"], default=None,
                    help="expected kind; default: from the source architecture")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                    help="stored dtype; default: float32 for fp32 sources, else bfloat16")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer reference to record (default: the one in --hf-dir)")
    ap.add_argument("--transformer-impl", choices=_IMPLS, default="local",
                    help="layer implementation recorded for the recipes to build: local (torch "
                         "layers, any machine) or transformer_engine (TE's fused layers and FP8, "
                         "GPUs); the weights are the same, and a role's model.transformer_impl "
                         "overrides it")
    args = ap.parse_args(argv)
    try:
        convert_hf_to_megatron(args.hf_dir, args.out, args.model_type, args.dtype, args.tokenizer,
                               transformer_impl=args.transformer_impl)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
