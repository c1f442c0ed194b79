"""Zero-copy access to Hugging Face checkpoint files, and a scratch area for tensors that
must be computed (fused QKV, dtype changes).

Every tensor handed to the checkpoint writer is backed by a memory-mapped file, not by
process memory: source tensors are mapped straight out of ``*.safetensors`` files (or
``*.bin`` files through ``torch.load(mmap=True, weights_only=True)``), and computed ones
are written to a scratch file one at a time and mapped back. So the converter's private
memory stays near one layer whatever the model size; file pages are cache the kernel can
drop.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

from megarlhf.convert.hf_config import ConversionError

__all__ = ["HFTensorReader", "Scratch", "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        try:
            self._f = open(path, "rb")
            (n,) = struct.unpack("<Q", self._f.read(8))
            if n <= 0 or n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(self._f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise ConversionError(f"{path}: not a readable safetensors file: {e}") from e
        self._data_start = 8 + n
        self.entries: Dict[str, Tuple[str, List[int], Tuple[int, int]]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            self.entries[name] = (info["dtype"], list(info["shape"]), tuple(info["data_offsets"]))
        size = os.fstat(self._f.fileno()).st_size
        for name, (_, _, (a, b)) in self.entries.items():
            if self._data_start + b > size:
                raise ConversionError(f"{path}: tensor {name!r} runs past the end of the file "
                                      "(truncated download?)")
        # ACCESS_COPY: private, writable-in-memory mapping; the file is never modified.
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def get(self, name: str) -> torch.Tensor:
        dtype_name, shape, (a, b) = self.entries[name]
        if dtype_name not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype_name}")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        count = (b - a) // torch.empty((), dtype=dtype).element_size()
        offset = self._data_start + a
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        if offset % torch.empty((), dtype=dtype).element_size():
            # Misaligned data cannot be viewed in place: copy (rare; small tensors).
            raw = bytes(self._mm[offset:offset + (b - a)])
            return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
        return torch.frombuffer(self._mm, dtype=dtype, count=count, offset=offset).reshape(shape)


class HFTensorReader:
    """Names -> lazily mapped tensors over all weight files of a Hugging Face folder."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._where: Dict[str, object] = {}
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        if files:
            for fname in files:
                sf = _SafetensorsFile(os.path.join(hf_dir, fname))
                for name in sf.entries:
                    self._where[name] = sf
        else:
            bins = sorted(f for f in os.listdir(hf_dir)
                          if f.endswith(".bin") and f.startswith("pytorch_model"))
            if not bins:
                raise ConversionError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weight files")
            for fname in bins:
                path = os.path.join(hf_dir, fname)
                try:
                    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except Exception as e:
                    raise ConversionError(f"{path}: cannot load with weights_only=True: {e}") from e
                if not isinstance(sd, dict):
                    raise ConversionError(f"{path}: expected a state dict, got {type(sd).__name__}")
                for name, t in sd.items():
                    if not isinstance(t, torch.Tensor):
                        raise ConversionError(f"{path}: entry {name!r} is not a tensor")
                    self._where[name] = (path, t)

    def names(self) -> List[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ConversionError(f"{self.hf_dir}: tensor {name!r} is missing")
        src = self._where[name]
        if isinstance(src, _SafetensorsFile):
            return src.get(name)
        return src[1]  # type: ignore[index]

    def shape(self, name: str) -> List[int]:
        src = self._where[name]
        if isinstance(src, _SafetensorsFile):
            return src.entries[name][1]
        return list(src[1].shape)  # type: ignore[index]

    def file_of(self, name: str) -> str:
        src = self._where[name]
        return src.path if isinstance(src, _SafetensorsFile) else src[0]  # type: ignore[index]


def _owns_storage(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.untyped_storage().size() == t.numel() * t.element_size()


class Scratch:
    """Writes computed tensors to files and maps them back (one tensor in memory at a time)."""

    def __init__(self, parent: str):
        os.makedirs(parent, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix=".convert-scratch-", dir=parent)
        self._n = 0

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """A file-backed copy of ``t`` (then ``t`` can be freed)."""
        t = t.contiguous()
        path = os.path.join(self.dir, f"{self._n:06d}.bin")
        self._n += 1
        with open(path, "wb") as f:
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        return torch.from_file(path, shared=False, size=t.numel(), dtype=t.dtype).reshape(t.shape)

    def own(self, t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``t`` itself when it is a mapped tensor with its own storage in ``dtype``,
        otherwise a scratch copy (the checkpoint writer would otherwise clone views)."""
        if dtype is not None and t.dtype != dtype:
            return self.put(t.to(dtype))
        return t if _owns_storage(t) else self.put(t)

    def cleanup(self) -> None:
        for f in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, f))
        os.rmdir(self.dir)
