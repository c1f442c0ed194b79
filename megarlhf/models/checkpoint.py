"""Model checkpoints: megatron-core distributed checkpoints plus a metadata file.

A checkpoint folder holds megatron's ``torch_dist`` files (any TP x PP layout can load
them) and ``megarlhf.json``: the model shape, its kind (causal or reward), the real
vocabulary size, tokenizer and chat-template references when known, and the megarlhf
version, so that later tools need no extra flags to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist

import megarlhf
from megarlhf import platform
from megarlhf.config.model import ModelConfig, RopeScaling
from megarlhf.models.integrity import check_metadata, verify_checkpoint, write_manifest

__all__ = [
    "META_FILE",
    "CheckpointMeta",
    "CheckpointError",
    "write_meta",
    "read_meta",
    "tokenizer_path",
    "model_sharded_state_dict",
    "save_model",
    "load_model",
    "load_sharded",
    "is_checkpoint",
]

META_FILE = "megarlhf.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be read as asked."""


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint is, so that it can be rebuilt without flags."""

    model: ModelConfig
    kind: str = "causal"
    tokenizer: Optional[str] = None
    """Path of the tokenizer (SentencePiece ``.model`` or HF ``tokenizer.json``), if known."""
    chat_template: Optional[str] = None
    """Chat template name or text, if known."""
    megarlhf_version: str = megarlhf.__version__
    format_version: int = FORMAT_VERSION
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """Free-form provenance (source checkpoint, step, recipe...)."""

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = dataclasses.asdict(self.model)
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any], where: str = "") -> "CheckpointMeta":
        try:
            model = dict(d["model"])
            if model.get("rope_scaling") is not None:
                model["rope_scaling"] = RopeScaling(**model["rope_scaling"])
            known = {f.name for f in dataclasses.fields(ModelConfig)}
            unknown = set(model) - known
            if unknown:
                raise CheckpointError(f"{where}: unknown model fields {sorted(unknown)} "
                                      f"(written by a newer megarlhf?)")
            fields = {k: v for k, v in d.items() if k != "model"}
            return cls(model=ModelConfig(**model), **fields)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: malformed checkpoint metadata: {e}") from e


def write_meta(ckpt_dir: str, meta: CheckpointMeta) -> None:
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = os.path.join(ckpt_dir, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta.to_json(), f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(ckpt_dir, META_FILE))


def tokenizer_path(meta: "CheckpointMeta", ckpt_dir: str) -> Optional[str]:
    """The tokenizer a checkpoint records, as a path (relative ones are inside the
    checkpoint folder); None when it records none."""
    if not meta.tokenizer:
        return None
    return meta.tokenizer if os.path.isabs(meta.tokenizer) else os.path.join(ckpt_dir, meta.tokenizer)


def read_meta(ckpt_dir: str) -> CheckpointMeta:
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint folder not found: {ckpt_dir}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir} is not a megarlhf checkpoint: {META_FILE} is missing")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata: {e}") from e
    return CheckpointMeta.from_json(d, where=path)


def is_checkpoint(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, META_FILE)) and os.path.isfile(
        os.path.join(ckpt_dir, "metadata.json"))


def _bare(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(chunks: Sequence[torch.nn.Module],
                             skip_prefixes: Iterable[str] = (), prefix: str = "") -> Dict[str, Any]:
    """megatron sharded state dict of this rank's chunks (the keys are layout-independent).

    ``skip_prefixes`` leaves out parameters, e.g. ``("output_layer.",)`` to initialise a
    reward model's head freshly while loading the rest from a causal-LM checkpoint.
    ``prefix`` keeps several models apart in one checkpoint (PPO's actor and critic).
    """
    skip = tuple(skip_prefixes)
    out: Dict[str, Any] = {}
    for i, chunk in enumerate(chunks):
        bare = _bare(chunk)
        # Replica ids come from the model's own data-parallel group (a PPO role may not
        # use megatron's global layout).
        dp_group = getattr(bare, "megarlhf_dp_group", None)
        ssd = bare.sharded_state_dict(prefix=prefix,
                                      metadata=None if dp_group is None else {"dp_cp_group": dp_group})
        if skip:
            ssd = {k: v for k, v in ssd.items() if not k[len(prefix):].startswith(skip)}
        out["model" if len(chunks) == 1 else f"model{i}"] = ssd
    return out


def synchronous_writer_queue() -> None:
    """Before a ``dist_checkpointing.save``: hand megatron's checkpoint writer a plain
    in-process queue for its results.

    megatron collects each rank's write results through a queue made by a spawned
    ``multiprocessing`` manager: a server process that must import torch to unpickle the
    first results (~2 s, during which the save waits, on every saving rank) and that
    outlives a SIGKILLed rank, keeping the job's output pipes open. Our saves are
    synchronous: the writer puts its results and reads them back in the saving process
    itself (``FileSystemWriterAsync.write_preloaded_data_multiproc`` then
    ``retrieve_write_results``), so a ``queue.Queue`` carries them with no process at all.
    An asynchronous save would need megatron's cross-process queue: it would fail loudly
    ("results_queue should not be empty"), not silently. Idempotent."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:  # not yet made
        filesystem_async._results_queue = queue.Queue()


def save_model(chunks: Sequence[torch.nn.Module], ckpt_dir: str, meta: CheckpointMeta) -> None:
    """Collective: every rank of the job calls it. Rank 0 writes the metadata."""
    from megatron.core import dist_checkpointing

    os.makedirs(ckpt_dir, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    synchronous_writer_queue()
    dist_checkpointing.save(model_sharded_state_dict(chunks), ckpt_dir)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_meta(ckpt_dir, meta)
    if dist.is_initialized():
        dist.barrier()
    write_manifest(ckpt_dir)  # collective


EXTRA_STATE = "_extra_state"


def load_sharded(sharded: Dict[str, Any], ckpt_dir: str) -> Dict[str, Any]:
    """megatron's ``dist_checkpointing.load`` of ``sharded`` from ``ckpt_dir``, accepting a
    checkpoint written by the other layer implementation.

    Transformer Engine modules carry an ``_extra_state`` entry (their FP8 scaling
    metadata) in places the local layers have none (TE's core attention and norms); a
    checkpoint of local layers (every converted one) lacks those, and megatron refuses a
    requested key the checkpoint does not hold. Here only ``_extra_state`` entries may be
    absent (the module keeps its initial FP8 metadata, as after a fresh start); any other
    absent key is an error naming it. Entries the checkpoint holds but the model does not
    ask for (TE's, loaded into local layers) are not read.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    try:
        loaded, _, absent = dist_checkpointing.load(sharded, ckpt_dir,
                                                    strict=StrictHandling.RETURN_UNEXPECTED)
    except Exception as e:
        raise CheckpointError(f"{ckpt_dir}: cannot load: {e}") from e
    absent = sorted(k for k in absent if not k.endswith(EXTRA_STATE))
    if absent:
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise CheckpointError(f"{ckpt_dir} does not hold {', '.join(absent[:5])}{more} (a checkpoint of "
                              "another model shape or kind?)")
    return loaded


def load_model(chunks: Sequence[torch.nn.Module], ckpt_dir: str,
               skip_prefixes: Iterable[str] = ()) -> List[str]:
    """Load weights into this rank's chunks from a checkpoint saved at any TP x PP.

    Returns the names of parameters that were not loaded (those under ``skip_prefixes``);
    anything else missing from the checkpoint is an error, except Transformer Engine's
    ``_extra_state`` (see :func:`load_sharded`): a checkpoint of either layer
    implementation loads into a model of either.
    """
    if not is_checkpoint(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} is not a megarlhf checkpoint (needs {META_FILE} and "
                              "megatron's metadata.json)")
    verify_checkpoint(ckpt_dir)  # sizes against the manifest (contents: on resume)
    check_metadata(ckpt_dir)
    skip = tuple(skip_prefixes)
    loaded = load_sharded(model_sharded_state_dict(chunks, skip), ckpt_dir)
    not_loaded: List[str] = []
    for i, chunk in enumerate(chunks):
        state = loaded["model" if len(chunks) == 1 else f"model{i}"]
        result = _bare(chunk).load_state_dict(state, strict=False)
        bad = [k for k in result.missing_keys if not k.startswith(skip) and not k.endswith(EXTRA_STATE)]
        if bad or result.unexpected_keys:
            raise CheckpointError(f"{ckpt_dir}: missing {bad}, unexpected {result.unexpected_keys}")
        not_loaded += [k for k in result.missing_keys if k.startswith(skip)]
    return not_loaded
