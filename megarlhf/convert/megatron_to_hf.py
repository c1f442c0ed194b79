"""megatron-core distributed checkpoint -> Hugging Face Llama (safetensors + config.json).

    python tools/convert_megatron_to_hf.py --ckpt ckpt/ppo/latest --out hf/ppo

Works from a checkpoint saved at any TP x PP: tensors are read by global shape and layer
index, one layer at a time, and written in safetensors shards of at most
``--max-shard-size`` (so memory stays near one shard). Causal checkpoints become
``LlamaForCausalLM``; reward checkpoints become ``LlamaForSequenceClassification`` with
``num_labels=1`` (the scalar head is its ``score`` layer). A model with tied embeddings
has no ``lm_head.weight``: its ``config.json`` says ``tie_word_embeddings: true``.

``config.json`` is the source's, recorded by the import (``megarlhf.json``'s
``extra.hf_config``), with the model's shape and the exported dtype; a model trained from
scratch gets a fresh one with the special-token ids of its tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from megarlhf.convert.hf_config import ConversionError, hf_config_from_model
from megarlhf.convert.hf_to_megatron import split_qkv
from megarlhf.data.tokenizer import TokenizerError, load_tokenizer
from megarlhf.models.checkpoint import tokenizer_path
from megarlhf.models.llama import ties_embeddings

__all__ = ["convert_megatron_to_hf", "main", "parse_size"]

_LAYER_KEYS = {
    "ln1": "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    "qkv": "decoder.layers.self_attention.linear_qkv.weight",
    "o": "decoder.layers.self_attention.linear_proj.weight",
    "ln2": "decoder.layers.mlp.linear_fc1.layer_norm_weight",
    "fc1": "decoder.layers.mlp.linear_fc1.weight",
    "fc2": "decoder.layers.mlp.linear_fc2.weight",
}


def parse_size(text: str) -> int:
    """``"5GB"`` -> bytes (decimal units as Hugging Face uses; ``GiB`` for binary)."""
    t = text.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for u, mult in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    return int(t)


class _ShardWriter:
    """Accumulates tensors and writes safetensors shards of at most ``max_bytes``."""

    def __init__(self, out_dir: str, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: List[Dict[str, int]] = []  # per shard: name -> bytes
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        idx = len(self.files)
        save_file(self.pending, os.path.join(self.out_dir, f".shard-{idx:05d}.safetensors"),
                  metadata={"format": "pt"})
        self.files.append({k: v.numel() * v.element_size() for k, v in self.pending.items()})
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> List[str]:
        self.flush()
        n = len(self.files)
        names = (["model.safetensors"] if n == 1 else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        weight_map = {}
        for i, (name, tensors) in enumerate(zip(names, self.files)):
            os.replace(os.path.join(self.out_dir, f".shard-{i:05d}.safetensors"),
                       os.path.join(self.out_dir, name))
            weight_map.update({k: name for k in tensors})
        if n > 1:
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f,
                          indent=2, sort_keys=True)
        return names


def convert_megatron_to_hf(ckpt_dir: str, out_dir: str, dtype: Optional[str] = None,
                           max_shard_size: str = "5GB",
                           log: Callable[[str], None] = print) -> Dict[str, object]:
    """Export one checkpoint; returns a summary."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megarlhf.models.checkpoint import CheckpointError, read_meta
    from megarlhf.models.integrity import check_metadata, verify_checkpoint
    from megarlhf.parallel import init_single_process

    t0 = time.perf_counter()
    meta = read_meta(ckpt_dir)
    m = meta.model
    out_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 None: None}[dtype]
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"output folder {out_dir} exists and is not empty")
    os.makedirs(out_dir, exist_ok=True)
    init_single_process()
    try:
        verify_checkpoint(ckpt_dir, hashes=True)
        check_metadata(ckpt_dir)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    try:
        stored = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    except Exception as e:
        raise ConversionError(f"{ckpt_dir}: cannot read megatron checkpoint metadata: {e}") from e

    def expect(key: str, shape: List[int]) -> ShardedTensor:
        if key not in stored:
            raise ConversionError(f"{ckpt_dir}: tensor {key!r} is missing")
        got = list(stored[key].global_shape)
        if got != shape:
            raise ConversionError(f"{ckpt_dir}: tensor {key!r} has global shape {got}, "
                                  f"expected {shape} for the model in {ckpt_dir}/megarlhf.json")
        return stored[key]

    h, f, d, L, V = m.hidden_size, m.ffn_hidden_size, m.kv_channels, m.num_layers, m.vocab_size
    nh, ng = m.num_attention_heads, m.num_query_groups
    qkv_rows = ng * (nh // ng + 2) * d
    layer_shapes = {"ln1": [h], "qkv": [qkv_rows, h], "o": [h, nh * d], "ln2": [h],
                    "fc1": [2 * f, h], "fc2": [h, f]}
    head_rows = 1 if meta.kind == "reward" else None
    tied = ties_embeddings(m, meta.kind)  # the LM head is the embedding: no tensor of its own
    for k, shape in layer_shapes.items():
        expect(_LAYER_KEYS[k], [L] + shape)
    for key in ("embedding.word_embeddings.weight",) + (() if tied else ("output_layer.weight",)):
        if key not in stored:
            raise ConversionError(f"{ckpt_dir}: tensor {key!r} is missing")
    emb_rows = stored["embedding.word_embeddings.weight"].global_shape[0]
    if emb_rows < V:
        raise ConversionError(f"{ckpt_dir}: embedding has {emb_rows} rows, fewer than the "
                              f"vocabulary size {V}")
    expect("decoder.final_layernorm.weight", [h])

    def read(request: Dict[str, ShardedTensor]) -> Dict[str, torch.Tensor]:
        try:
            # One layer of a stacked tensor at a time: coverage is partial by design.
            return dist_checkpointing.load(request, ckpt_dir, validate_access_integrity=False)
        except Exception as e:
            raise ConversionError(f"{ckpt_dir}: cannot read {sorted(request)}: {e}") from e

    def whole(key: str) -> ShardedTensor:
        meta_t = stored[key]
        shape = list(meta_t.global_shape)
        return ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=meta_t.dtype),
                                               replica_id=0)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(out_dtype) if out_dtype is not None else t

    writer = _ShardWriter(out_dir, parse_size(max_shard_size))
    got = read({"emb": whole("embedding.word_embeddings.weight")})
    writer.add("model.embed_tokens.weight", cast(got["emb"][:V].clone()))
    del got
    for i in range(L):
        request = {}
        for k, shape in layer_shapes.items():
            key = _LAYER_KEYS[k]
            request[k] = ShardedTensor.from_rank_offsets(
                key, torch.empty([1] + shape, dtype=stored[key].dtype), (0, i, L), replica_id=0)
        t = {k: v[0] for k, v in read(request).items()}
        q, k_, v = split_qkv(t["qkv"], nh, ng)
        gate, up = torch.split(t["fc1"], [f, f], dim=0)
        p = f"model.layers.{i}."
        for name, tensor in ((p + "input_layernorm.weight", t["ln1"]),
                             (p + "self_attn.q_proj.weight", q), (p + "self_attn.k_proj.weight", k_),
                             (p + "self_attn.v_proj.weight", v), (p + "self_attn.o_proj.weight", t["o"]),
                             (p + "post_attention_layernorm.weight", t["ln2"]),
                             (p + "mlp.gate_proj.weight", gate), (p + "mlp.up_proj.weight", up),
                             (p + "mlp.down_proj.weight", t["fc2"])):
            writer.add(name, cast(tensor.contiguous()))
        del t
    got = read({"norm": whole("decoder.final_layernorm.weight"),
                **({} if tied else {"head": whole("output_layer.weight")})})
    writer.add("model.norm.weight", cast(got["norm"]))
    if meta.kind == "reward":
        if list(got["head"].shape) != [head_rows, h]:
            raise ConversionError(f"{ckpt_dir}: reward head has shape {list(got['head'].shape)}, "
                                  f"expected [1, {h}]")
        writer.add("score.weight", cast(got["head"]))
    elif not tied:  # tied: transformers points lm_head at model.embed_tokens.weight on load
        writer.add("lm_head.weight", cast(got["head"][:V].clone()))
    del got
    files = writer.finish()

    stored_dtype = str(stored["decoder.layers.mlp.linear_fc2.weight"].dtype).replace("torch.", "")
    source = meta.extra.get("hf_config")
    ids = {} if source is not None else _token_ids(ckpt_dir, meta)
    cfg = hf_config_from_model(m, meta.kind, dtype or stored_dtype, source=source, **ids)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
    _copy_tokenizer(ckpt_dir, meta, out_dir)
    _write_chat_template(ckpt_dir, meta, out_dir)
    summary = dict(files=files, bytes=writer.total, kind=meta.kind,
                   seconds=round(time.perf_counter() - t0, 3))
    log(f"exported {ckpt_dir} -> {out_dir}: {meta.kind}, {len(files)} file(s), "
        f"{writer.total / 2**20:.1f} MiB, {summary['seconds']} s")
    return summary


def _token_ids(ckpt_dir: str, meta) -> Dict[str, int]:
    """BOS, EOS and padding ids of the checkpoint's tokenizer (none if it records none)."""
    path = tokenizer_path(meta, ckpt_dir)
    if path is None or not os.path.isfile(path):
        return {}  # a reference that did not travel with the checkpoint: nothing is copied either
    try:
        tok = load_tokenizer(path)
    except TokenizerError as e:
        raise ConversionError(f"{ckpt_dir}: the recorded tokenizer cannot be read: {e}") from e
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def _write_chat_template(ckpt_dir: str, meta, out_dir: str) -> None:
    """The chat template the model was imported or trained with, as ``chat_template.jinja``
    (a built-in or custom structure written out as Jinja that renders the same text), so
    that ``apply_chat_template`` formats conversations as megarlhf did. A template
    ``tokenizer_config.json`` carried from the source already holds is left there."""
    from megarlhf.recipes.pairs_common import tokenizer_of

    if not meta.tokenizer:
        return
    _, template = tokenizer_of(meta, ckpt_dir, require=False)
    if template is None:
        return
    source = template.jinja_source()
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    carried = None
    if os.path.isfile(config_path):
        with open(config_path) as f:
            tok_cfg = json.load(f)
        carried = tok_cfg.get("chat_template")
        if carried is not None and carried != source:  # a stale one would shadow the file
            del tok_cfg["chat_template"]
            with open(config_path, "w") as f:
                json.dump(tok_cfg, f, indent=2)
    if carried != source:
        with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(source)


def _copy_tokenizer(ckpt_dir: str, meta, out_dir: str) -> None:
    """The tokenizer files beside the checkpoint (a conversion keeps the source's there),
    else beside the tokenizer the checkpoint records (a trained model's); the model's
    generation settings from the metadata where no file carries them."""
    tokenizer = meta.tokenizer
    if tokenizer and not os.path.isabs(tokenizer):
        tokenizer = os.path.join(ckpt_dir, tokenizer)
    folders = [ckpt_dir] + ([os.path.dirname(tokenizer)] if tokenizer else [])
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        src = next((os.path.join(d, name) for d in folders if os.path.isfile(os.path.join(d, name))), None)
        if src is not None:
            shutil.copy2(src, os.path.join(out_dir, name))
    for name in ("tokenizer.model", "tokenizer.json"):  # a conversion's, beside the checkpoint
        if os.path.isfile(os.path.join(ckpt_dir, name)):
            shutil.copy2(os.path.join(ckpt_dir, name), os.path.join(out_dir, name))
    if tokenizer and os.path.isfile(tokenizer):
        base = os.path.basename(tokenizer)
        target = "tokenizer.json" if base.endswith(".json") else "tokenizer.model"
        if not os.path.exists(os.path.join(out_dir, target)):
            shutil.copy2(tokenizer, os.path.join(out_dir, target))
    gen = meta.extra.get("generation_config")
    if gen and not os.path.exists(os.path.join(out_dir, "generation_config.json")):
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description="Export a megarlhf (megatron-core distributed) checkpoint, saved at any "
                    "TP x PP, to Hugging Face safetensors + config.json.")
    ap.add_argument("--ckpt", required=True, help="checkpoint folder (with megarlhf.json)")
    ap.add_argument("--out", required=True, help="new (or empty) output folder")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="exported dtype; default: as stored")
    ap.add_argument("--max-shard-size", default="5GB",
                    help="largest safetensors file (e.g. 5GB, 500MB); default 5GB")
    args = ap.parse_args(argv)
    try:
        convert_megatron_to_hf(args.ckpt, args.out, args.dtype, args.max_shard_size)
    except Exception as e:  # CheckpointError and ConversionError carry the file and tensor
        from megarlhf.models.checkpoint import CheckpointError

        if isinstance(e, (ConversionError, CheckpointError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0
