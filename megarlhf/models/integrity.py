"""Checkpoint integrity: a manifest of every file's size and SHA-256, and a check that
checkpoint metadata unpickles nothing but torch's own checkpoint types.

    write_manifest(ckpt_dir)      # collective after the files are written, before the rename
    verify_checkpoint(ckpt_dir)   # sizes always; SHA-256 too with hashes=True (collective)
    check_metadata(ckpt_dir)      # torch's .metadata holds only allowed classes

Hashing is shared out over the ranks of the job (file ``i`` by rank ``i % world``), so a
checkpoint is hashed once in all, at the speed of the slowest rank's share.

torch.distributed.checkpoint stores its index (``.metadata``) as a pickle and reads it
with ``pickle.load``; :func:`check_metadata` reads it first with an unpickler that
refuses any class outside torch's checkpoint metadata, so a crafted checkpoint cannot run
code when it is loaded. Tensor payloads and megatron's ``common.pt`` are read with
``torch.load(weights_only=True)`` (torch's default).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

__all__ = ["MANIFEST_FILE", "write_manifest", "verify_checkpoint", "check_metadata",
           "UnsafeCheckpoint"]

MANIFEST_FILE = "manifest.json"
_META = "megarlhf.json"  # small, user-editable metadata: checked by parsing, not hashed
_CHUNK = 8 << 20


class UnsafeCheckpoint(pickle.UnpicklingError):
    """Checkpoint metadata that names a class outside the allowed set."""


def _world() -> tuple:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _files(ckpt_dir: str) -> List[str]:
    out = []
    for root, _, names in os.walk(ckpt_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), ckpt_dir)
            if rel not in (MANIFEST_FILE, _META) and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return h.hexdigest()
            h.update(block)


def _gather(obj):
    rank, world = _world()
    if world == 1:
        return [obj]
    out: List = [None] * world
    dist.all_gather_object(out, obj)
    return out


def write_manifest(ckpt_dir: str) -> Dict[str, Dict[str, object]]:
    """Collective over the job: hash every file of ``ckpt_dir`` (each rank its share) and
    write ``manifest.json`` there (rank 0). Call after every rank's files are complete."""
    rank, world = _world()
    names = _files(ckpt_dir)
    names = _gather(names)[0]  # rank 0's listing: one assignment of files to ranks
    mine = {n: {"bytes": os.path.getsize(os.path.join(ckpt_dir, n)),
                "sha256": _sha256(os.path.join(ckpt_dir, n))}
            for i, n in enumerate(names) if i % world == rank}
    entries: Dict[str, Dict[str, object]] = {}
    for part in _gather(mine):
        entries.update(part)
    if rank == 0:
        tmp = os.path.join(ckpt_dir, MANIFEST_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"algorithm": "sha256", "files": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(ckpt_dir, MANIFEST_FILE))
    return entries


def read_manifest(ckpt_dir: str) -> Optional[Dict[str, Dict[str, object]]]:
    """The manifest's entries, or None for a checkpoint written without one."""
    from megarlhf.models.checkpoint import CheckpointError

    path = os.path.join(ckpt_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
        return files
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint manifest ({e}); the checkpoint "
                              "cannot be verified") from e


def _problems(ckpt_dir: str, entries: Dict[str, Dict[str, object]], hash_these: List[str]) -> List[str]:
    out = []
    for name, e in entries.items():
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            out.append(f"{name} is missing")
            continue
        size = os.path.getsize(path)
        if size != e.get("bytes"):
            how = "truncated" if size < int(e.get("bytes", 0)) else "longer than written"
            out.append(f"{name} has {size} bytes, {e.get('bytes')} were written ({how})")
        elif name in hash_these and _sha256(path) != e.get("sha256"):
            out.append(f"{name}: SHA-256 differs from the one written (corrupted)")
    return out


def verify_checkpoint(ckpt_dir: str, hashes: bool = False, collective: bool = False) -> None:
    """Raise :class:`CheckpointError` naming every damaged file of ``ckpt_dir``.

    Sizes are always checked against the manifest; ``hashes`` also re-hashes file contents
    (each rank its share when ``collective``: then every rank of the job must call it, and
    all raise the same error). A checkpoint without a manifest (written by an older
    version) passes unchecked."""
    from megarlhf.models.checkpoint import CheckpointError

    entries = read_manifest(ckpt_dir)
    rank, world = _world() if collective else (0, 1)
    problems: List[str] = []
    if entries is not None:
        names = sorted(entries)
        share = [n for i, n in enumerate(names) if i % world == rank] if hashes else []
        problems = _problems(ckpt_dir, entries, share)
    if collective and world > 1:
        problems = sorted({p for part in _gather(problems) for p in part})
    if problems:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: " + "; ".join(problems[:8])
                              + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))


# -- metadata --------------------------------------------------------------------------------

_ALLOWED_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
_ALLOWED = {("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
            ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or module.startswith(_ALLOWED_MODULE_PREFIXES):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpoint(f"{module}.{name}")


def check_metadata(ckpt_dir: str) -> None:
    """Read torch's checkpoint index ``.metadata`` with an unpickler that allows only
    torch's checkpoint metadata classes, dtypes and sizes; raise :class:`CheckpointError`
    when it names anything else (the file is then never passed to ``pickle.load``)."""
    from megarlhf.models.checkpoint import CheckpointError

    path = os.path.join(ckpt_dir, ".metadata")
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir}: torch's checkpoint index .metadata is missing")
    with open(path, "rb") as f:
        data = f.read()
    try:
        _Restricted(io.BytesIO(data)).load()
    except UnsafeCheckpoint as e:
        raise CheckpointError(f"{path}: refusing to load: the checkpoint index names {e}, which "
                              "is not a checkpoint metadata class (a crafted or foreign file)") from None
    except Exception as e:  # truncated or garbled pickle
        raise CheckpointError(f"{path}: unreadable checkpoint index ({type(e).__name__}: {e})") from e
