"""What megatron-core does when it is imported, trimmed on CPU machines.

Importing megatron-core costs ~5 s of CPU per process here, and nearly half of it buys
nothing on a machine without a GPU:

- ``megatron.core.jit`` sets ``jit_fuser = torch.compile``, and every module that defines
  a fused kernel decorates it at import time: the first decoration imports TorchDynamo
  and Inductor (~1.5 s). None of those kernels is on a CPU run's path (the local Llama
  layers use none of them, and ``bias_activation_fusion`` is refused without a GPU);
- the dynamic inference context imports ``wandb`` for its own logging (~0.6 s); the
  dynamic engine does not run on CPU.

A job starts one process per rank, and the test suite starts hundreds, so
:func:`install` (called from the package's ``__init__``, before any megatron import can
happen) registers an import finder that, on a machine without a GPU, switches megatron's
fuser off with its own ``disable_jit_fuser()`` as soon as ``megatron.core.jit`` exists,
and hides ``wandb`` while ``megatron.core`` itself is being imported (it is importable
again afterwards: metrics logging imports it when asked to). On a GPU nothing changes.
This module imports neither torch nor megatron: it is loaded by every command, light
ones included.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Callable, Optional

__all__ = ["install", "trimmed"]

_JIT = "megatron.core.jit"
_CORE = "megatron.core"
_trimmed = {"jit_fuser": False, "wandb": False}


def trimmed() -> dict:
    """Which trims took effect in this process (for tests and diagnostics)."""
    return dict(_trimmed)


def _no_gpu() -> bool:
    from megarlhf import platform  # torch is being imported by megatron already

    return not platform.has_gpu()


class _Wrapped(importlib.abc.Loader):
    """A module's own loader, with something run before and after its code."""

    def __init__(self, loader, before: Callable[[], object], after: Callable[[object, object], None]):
        self.loader, self.before, self.after = loader, before, after

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        token = self.before()
        try:
            self.loader.exec_module(module)
        finally:
            self.after(module, token)


def _hide_wandb() -> bool:
    if "wandb" in sys.modules or not _no_gpu():
        return False
    sys.modules["wandb"] = None  # `import wandb` raises ImportError; megatron catches it
    return True


def _unhide_wandb(module, hidden: bool) -> None:
    if hidden and sys.modules.get("wandb", 0) is None:
        del sys.modules["wandb"]
        _trimmed["wandb"] = True


def _disable_fuser(module, _token) -> None:
    if _no_gpu() and hasattr(module, "disable_jit_fuser"):
        module.disable_jit_fuser()
        _trimmed["jit_fuser"] = True


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        if name not in (_CORE, _JIT):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        if name == _CORE:
            spec.loader = _Wrapped(spec.loader, _hide_wandb, _unhide_wandb)
        else:
            spec.loader = _Wrapped(spec.loader, lambda: None, _disable_fuser)
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
        return spec


def install() -> None:
    """Register the finder once, unless megatron-core is already imported (then it is too
    late to trim, and nothing is changed)."""
    if _JIT in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
