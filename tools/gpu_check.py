#!/usr/bin/env python3
"""One-GPU check of the fast paths: bf16 and FP8 training speed (MFU), FP8 loss agreement
with bf16, the share of the linear layers' matrix products that ran in FP8, and rollout
generation speed.

    python tools/gpu_check.py --make-bundle             # where megarlhf is installed: writes tools/gpu_bundle/
    python tools/gpu_check.py --out gpu_check.json      # on the GPU machine (repository + bundle copied)
    python tools/gpu_check.py --cpu-smoke --out x.json  # the same code path on a tiny model, on CPU

The GPU machine needs Python, torch (with numpy) and nothing else, no network: the pure-
Python packages the check imports besides torch (megatron-core, omegaconf, PyYAML,
packaging) travel as files in the bundle, and are put on ``sys.path`` only where the
machine lacks them (megatron-core also where the installed one is of another major.minor
than the bundled one, which megarlhf is tested against). A Transformer Engine that is
installed but cannot be loaded, or an ``apex`` that is not NVIDIA apex with its CUDA
extensions, is hidden from megatron-core so that its fallbacks to torch take over
instead of its import failing.

What each item runs is decided up front by :func:`plan` from what the machine has (GPU,
compute capability, Transformer Engine, NVIDIA apex), through
:func:`megarlhf.platform.select_kernels`. An item that cannot run here is reported as
``{"status": "not run", "reason": ...}``, never guessed.

Items (the defaults are sized for a few minutes on one H100; steps and batch are flags):

* ``gemm_probe``: measured bf16 matrix-product ceiling (n=8192).
* ``train_local``: a ~1B Llama (megatron DDP + optimizer, megarlhf's ``train_step``) with
  local layers in bf16; step time, tokens/s, TFLOP/s, MFU against the datasheet peak and
  the probe, peak memory, loss curve.
* ``train_te_bf16``, ``train_te_fp8``: the same model, seed and data with Transformer
  Engine layers in bf16 and in FP8 (hybrid E4M3/E5M2, delayed scaling).
* ``fp8_loss_agreement``: FP8 losses within 1% of bf16 at every step.
* ``fp8_gemms``: does FP8 do the work? One profiled step of each TE run; every CUDA kernel
  is attributed to the module that launched it: forward kernels by a profiler range
  opened around each forward of the decoder's linear layers (QKV, attention projection,
  FC1, FC2) and of the output layer; backward kernels by the autograd node that launched
  them, linked to the forward op that made it (else by the node's name: Transformer
  Engine's ``_LinearBackward``, ``_LayerNormLinearBackward``...). Pass when kernels whose
  names show an FP8 type (cuBLASLt ``..._e4m3...``, ``nvjet_qq...``) carry at least 90%
  (:data:`FP8_SHARE_LIMIT`) of the linear layers' GEMM time, forward and backward, and
  the bf16 run, the control, shows no FP8 GEMM kernel. The output (vocabulary)
  projection, a bf16 megatron layer, and attention's own kernels do not count; the report
  states the share, the output layer's GEMM time, the control's share and the TE modules
  whose FP8 amax histories were written. "unproven" (or "fail" when nothing ran in FP8)
  when no GEMM could be attributed to the linear layers.
* ``generate``: megarlhf's rollout engine on a model of the same shape (bf16, 64 prompts
  of 128 tokens on 64 slots, 256 new tokens each), generated tokens/s and the mean
  decode-step time against its bandwidth floor (the weights and the KV cache read once, at
  the copy bandwidth measured on the device); on a GPU also with the decode step as CUDA
  graphs.

Exit status: 0 when every item that ran passed (items not run do not fail), 1 when one
failed or raised, 2 when the check could not start (megatron-core not importable). The
last line printed is the path of the JSON report.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
import traceback
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_BUNDLE = REPO / "tools" / "gpu_bundle"
BUNDLE_LIMIT_MB = 60
SEED = 1234

# --------------------------------------------------------------------------------------
# The bundle: what a machine with only torch lacks, as files
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bundled:
    """One distribution carried in the bundle."""

    distribution: str
    modules: Tuple[str, ...]
    """Top-level modules it installs (copied as they are, less caches and binaries)."""
    probe: str
    """Module whose presence means the machine has it already."""
    pinned: bool = False
    """Shadow an installed copy whose major.minor differs from the bundled one."""
    required: bool = True
    """``--make-bundle`` fails without it (else it is copied when installed)."""


# Found by importing everything the check uses in an interpreter whose path holds only
# torch and its dependencies (tests/tools/test_gpu_check.py does it again).
BUNDLE = (
    Bundled("megatron-core", ("megatron",), "megatron.core", pinned=True),
    Bundled("omegaconf", ("omegaconf",), "omegaconf"),
    # omegaconf 2.4 vendors its parser runtime; 2.3 imports this distribution.
    Bundled("antlr4-python3-runtime", ("antlr4",), "antlr4", required=False),
    Bundled("PyYAML", ("yaml",), "yaml"),
    Bundled("packaging", ("packaging",), "packaging"),
)
# Not copied: caches, tests, and compiled extensions. The ones in these packages are
# optional (PyYAML's libyaml loader, megatron's dataset index helpers), and would only
# load on the Python version and platform they were built for.
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "tests", "*.so", "*.pyd", "*.dylib")


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2 ** 20


def make_bundle(dest: Path, packages: Sequence[Bundled] = BUNDLE) -> Dict[str, Any]:
    """Copy ``packages`` (default :data:`BUNDLE`) from this environment into ``dest`` (one
    folder per distribution, its metadata and licence files beside it) with a
    ``manifest.json``."""
    import importlib.metadata as md

    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for b in packages:
        try:
            dist = md.distribution(b.distribution)
        except md.PackageNotFoundError:
            if b.required:
                raise SystemExit(f"--make-bundle: {b.distribution} is not installed here; run it in "
                                 "the environment megarlhf is installed in")
            continue
        target = dest / b.distribution
        if target.exists():
            shutil.rmtree(target)
        for module in b.modules:
            spec = importlib.util.find_spec(module)
            if spec is None:
                raise SystemExit(f"--make-bundle: {b.distribution} is installed but {module} is not importable")
            if spec.submodule_search_locations:  # a package (a namespace package may span folders)
                for location in spec.submodule_search_locations:
                    shutil.copytree(location, target / module, ignore=_SKIP, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(spec.origin, target)
        # What it is and under which licence, as a <name>-<version>.dist-info folder beside
        # its modules: importlib.metadata finds it there (datasets asks for its
        # dependencies' versions at import).
        info = target / f"{re.sub(r'[-_.]+', '_', b.distribution)}-{dist.version}.dist-info"
        for f in dist.files or []:
            if re.match(r"(LICEN[CS]E|COPYING|NOTICE|METADATA$)", f.name, re.I) and ".dist-info" in str(f):
                info.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f.locate(), info / f.name)
        if not (info / "METADATA").is_file():
            info.mkdir(parents=True, exist_ok=True)
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {b.distribution}\n"
                                           f"Version: {dist.version}\n")
        copied.append({"distribution": b.distribution, "version": dist.version,
                       "modules": list(b.modules), "path": b.distribution})
    manifest = {"made_with_python": ".".join(map(str, sys.version_info[:3])), "packages": copied,
                "size_mb": round(_size_mb(dest), 2)}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def bundle_command(dest: Path, packages: Sequence[Bundled] = BUNDLE) -> int:
    """``--make-bundle``: make the bundle and say what went in."""
    manifest = make_bundle(dest, packages)
    for p in manifest["packages"]:
        print(f"bundled {p['distribution']} {p['version']}")
    print(f"{dest}: {manifest['size_mb']:.1f} MB")
    if manifest["size_mb"] > BUNDLE_LIMIT_MB:
        print(f"warning: the bundle is over {BUNDLE_LIMIT_MB} MB", file=sys.stderr)
    return 0


def _installed_version(b: Bundled) -> Optional[str]:
    """The version this machine has of ``b`` (``unknown`` without metadata), or None."""
    import importlib.metadata as md

    try:
        if importlib.util.find_spec(b.probe) is None:
            return None
    except ImportError:  # the parent package is missing
        return None
    try:
        return md.version(b.distribution)
    except md.PackageNotFoundError:
        return "unknown"


def _major_minor(version: str) -> Tuple[str, ...]:
    return tuple(version.split(".")[:2])


def use_bundle(bundle: Path, packages: Sequence[Bundled] = BUNDLE) -> Dict[str, str]:
    """Put the bundle's ``packages`` (default :data:`BUNDLE`) on ``sys.path`` where this
    machine lacks them (and a pinned one where its version differs). Returns where each
    package will come from."""
    manifest_path = bundle / "manifest.json"
    bundled = {}
    if manifest_path.is_file():
        bundled = {p["distribution"]: p for p in json.loads(manifest_path.read_text())["packages"]}
    sources = {}
    for b in packages:
        have, entry = _installed_version(b), bundled.get(b.distribution)
        if entry is None or (have is not None and not (
                b.pinned and _major_minor(have) != _major_minor(entry["version"]))):
            if have is not None or b.required:
                sources[b.distribution] = "missing" if have is None else f"installed {have}"
            continue
        sys.path.insert(1, str(bundle / entry["path"]))  # after the repository, before site-packages
        sources[b.distribution] = (f"bundle {entry['version']}" if have is None else
                                   f"bundle {entry['version']} (installed {have} shadowed)")
    return sources


def _hide_module(name: str) -> None:
    """Make ``import name`` raise ImportError (what megatron-core's fallbacks catch)."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    sys.modules[name] = None  # type: ignore[assignment]


def inspect_machine():
    """This machine's :class:`~megarlhf.platform.Hardware`, after hiding a Transformer
    Engine that cannot be used and an apex that is not usable NVIDIA apex. Returns
    (hardware, notes)."""
    from megarlhf import platform

    hw = platform.detect_hardware()
    notes = {}
    if hw.transformer_engine != "ok" and importlib.util.find_spec("transformer_engine") is not None:
        _hide_module("transformer_engine")
        notes["transformer_engine"] = "installed but unusable here: hidden from megatron-core"
    apex_ok, apex_reason = platform.nvidia_apex_status()
    if not apex_ok and importlib.util.find_spec("apex") is not None:
        _hide_module("apex")
        notes["apex"] = f"{apex_reason}: hidden from megatron-core"
    return hw, notes


# --------------------------------------------------------------------------------------
# Pure decisions: what runs, peaks, kernel names, verdicts (tested on CPU)
# --------------------------------------------------------------------------------------

TRAIN_RUNS = (("train_local", "local", None),
              ("train_te_bf16", "transformer_engine", None),
              ("train_te_fp8", "transformer_engine", "hybrid"))
ITEMS = ("gemm_probe", "train_local", "generate", "train_te_bf16", "train_te_fp8",
         "fp8_loss_agreement", "fp8_gemms")
TITLES = {"gemm_probe": "GEMM probe", "train_local": "train, local layers",
          "generate": "rollout generation", "train_te_bf16": "train, TE layers bf16",
          "train_te_fp8": "train, TE layers FP8", "fp8_loss_agreement": "FP8 vs bf16 loss",
          "fp8_gemms": "FP8 share of GEMMs"}
FAILED = ("fail", "error", "unproven")


def not_run(reason: str) -> Dict[str, Any]:
    return {"status": "not run", "reason": reason}


def plan(hw, smoke: bool) -> Dict[str, Dict[str, Any]]:
    """What each item runs on ``hw`` (a :class:`megarlhf.platform.Hardware`): layers,
    FP8 recipe, dtype and fused-kernel provider, or why it is not run."""
    from megarlhf.platform import select_kernels

    if hw.gpu is None and not smoke:
        why = "no CUDA GPU is visible (--cpu-smoke runs the same code path on a tiny model)"
        return {name: not_run(why) for name in ITEMS}
    # bf16 needs Ampere (8.0) or newer on GPUs; on CPU it always runs.
    dtype = "bfloat16" if hw.gpu is None or tuple(hw.capability) >= (8, 0) else "float32"
    out: Dict[str, Dict[str, Any]] = {
        "gemm_probe": {"status": "planned", "device": "cuda" if hw.gpu else "cpu", "dtype": dtype}}
    for name, impl, fp8 in TRAIN_RUNS:
        try:
            k = select_kernels(impl, fp8, hw)
        except RuntimeError as e:
            out[name] = not_run(str(e))
            continue
        out[name] = {"status": "planned", "layers": k.layers, "fp8": k.fp8, "dtype": dtype, "fused": k.fused}
    out["generate"] = dict(out["train_local"])
    blocked = [out[n]["reason"] for n in ("train_te_fp8", "train_te_bf16") if out[n]["status"] == "not run"]
    for name in ("fp8_loss_agreement", "fp8_gemms"):
        out[name] = not_run(blocked[0]) if blocked else {"status": "planned"}
    return {name: out[name] for name in ITEMS}


# Dense (no sparsity) datasheet peaks in TFLOP/s, bf16 and FP8, by device-name pattern
# (first match wins). H100 SXM reports itself as "H100 80GB HBM3".
DATASHEET = (
    (r"H100.*(PCIe|PCIE)", 756.0, 1513.0),
    (r"H100.*NVL", 835.0, 1671.0),
    (r"H100|H200", 989.0, 1979.0),
    (r"A100", 312.0, None),
    (r"L40S", 362.0, 733.0),
)


def datasheet_peak(device_name: Optional[str]) -> Optional[Dict[str, Optional[float]]]:
    """{"bf16": TFLOP/s, "fp8": TFLOP/s or None} for a known GPU, else None."""
    for pattern, bf16, fp8 in DATASHEET:
        if device_name and re.search(pattern, device_name):
            return {"bf16": bf16, "fp8": fp8}
    return None


# A GEMM by its kernel name on a GPU (cuBLASLt ``sm90_xmma_gemm_...``, ``nvjet_...``,
# CUTLASS ``...gemm...``), by its operator on CPU, where the profiled "kernels" are the
# leaf aten operators (``aten::matmul`` is left out: it only dispatches to ``aten::mm``).
_GEMM_NAME = re.compile(r"gemm|gemv|nvjet|xmma|(?<!aten::)matmul|^aten::(mm|addmm|bmm|baddbmm|_scaled_mm)$", re.I)
# cuBLASLt names carry the input types (sm90_xmma_gemm_e4m3bf16_..., nvjet_qq... where q
# is an 8-bit float); Transformer Engine's casts name __nv_fp8_e4m3 / e5m2 types.
_FP8_NAME = re.compile(r"fp8|e4m3|e5m2|nvjet_(sm\d+_)?q", re.I)

# What FP8 must carry: this share of the GEMM time of the decoder's linear layers.
FP8_SHARE_LIMIT = 0.90
# Profiler ranges opened around every forward of the modules of each role (see
# :func:`mark_roles`); a kernel inside one belongs to that role.
LINEAR_RANGE = "megarlhf.linear_layer"
OUTPUT_RANGE = "megarlhf.output_layer"
ROLE_OF_RANGE = {LINEAR_RANGE: "linear", OUTPUT_RANGE: "output"}
# The autograd engine's event around one node's backward (its child is the node itself).
EVALUATE = "autograd::engine::evaluate_function: "
# Backward nodes by role, the fallback where a backward kernel cannot be linked to the
# forward op that made its node. Transformer Engine's autograd Functions
# (transformer_engine/pytorch/module/{linear,layernorm_linear,layernorm_mlp}.py) are only
# the decoder's linear layers here; megatron's output layer is its ColumnParallelLinear
# (megatron/core/tensor_parallel/layers.py). With local layers every linear layer is that
# megatron Function too, so the names cannot tell them apart: no fallback there.
BACKWARD_NODES = {
    "transformer_engine": {"_LinearBackward": "linear", "_LayerNormLinearBackward": "linear",
                           "_LayerNormMLPBackward": "linear",
                           "LinearWithGradAccumulationAndAsyncCommunicationBackward": "output"},
    "local": {},
}


@dataclasses.dataclass(frozen=True)
class KernelRecord:
    """One profiled kernel (on CPU: one leaf aten operator) and where it was launched."""

    name: str
    seconds: float
    """Device time (on CPU: the operator's own CPU time)."""
    chain: Tuple[str, ...] = ()
    """The profiler events around its launch, innermost first: the launching op, its
    parents, up to the outermost range. Empty when the profiler linked it to no op."""
    forward_chain: Tuple[str, ...] = ()
    """Backward work: the ``chain`` of the forward op whose autograd node launched it."""
    device_ranges: Tuple[str, ...] = ()
    """A kernel linked to no op: the ranges whose GPU-side span holds it, innermost first."""


@dataclasses.dataclass(frozen=True)
class GemmTime:
    """The kernel time of one profiled step by where it ran, in seconds. GEMMs and FP8
    are told by kernel name; the role (linear layers, output layer, elsewhere) by
    :func:`kernel_role`."""

    linear_gemm_s: float
    """GEMMs of the decoder's linear layers (QKV, attention projection, FC1, FC2),
    forward and backward."""
    linear_fp8_gemm_s: float
    """Of which kernels with an FP8 type."""
    output_gemm_s: float
    """GEMMs of the output (vocabulary) projection."""
    output_fp8_gemm_s: float
    other_gemm_s: float
    """GEMMs elsewhere (attention's own, unattributed ones)."""
    other_kernel_s: float
    """Every kernel that is not a GEMM (norms, casts, attention, optimizer...)."""
    unattributed_s: float
    """Kernels linked to no op and inside no range (counted in the two above)."""
    gemm_kernels: int
    fp8_gemm_kernels: int
    """FP8 GEMM kernels anywhere in the step (the bf16 control must have none)."""
    fp8_other_kernels: int
    """Non-GEMM kernels whose name shows an FP8 type (casts, transposes, amax)."""
    linear_gemm_kernels: int
    output_gemm_kernels: int
    linear_gemm_by_route: Dict[str, float]
    """Seconds of linear-layer GEMMs by how they were attributed: ``range`` (launched
    inside the layer's forward range), ``forward_link`` (by an autograd node made in it),
    ``node_name`` (by the node's name), ``device_span`` (by the range's GPU-side span)."""
    top_linear_non_fp8_gemms: Tuple[str, ...]
    top_output_gemms: Tuple[str, ...]
    top_other_gemms: Tuple[str, ...]
    top_fp8_gemms: Tuple[str, ...]
    top_fp8_other: Tuple[str, ...]

    @property
    def fp8_share(self) -> Optional[float]:
        """FP8 kernels' share of the linear layers' GEMM time; None when none was attributed."""
        if not self.linear_gemm_kernels or self.linear_gemm_s <= 0:
            return None
        return self.linear_fp8_gemm_s / self.linear_gemm_s

    def as_dict(self) -> Dict[str, Any]:
        out = {k: (round(v, 6) if isinstance(v, float) else list(v) if isinstance(v, tuple) else v)
               for k, v in dataclasses.asdict(self).items()}
        out["linear_gemm_by_route"] = {k: round(v, 6) for k, v in self.linear_gemm_by_route.items()}
        out["fp8_share"] = None if self.fp8_share is None else round(self.fp8_share, 4)
        return out


def kernel_role(record: KernelRecord, backward_nodes: Dict[str, str]) -> Tuple[Optional[str], str]:
    """(role, route): which marked module a kernel belongs to (``linear``, ``output`` or
    None) and how that was found. A range around the launch decides first, then a range
    around the forward op of the backward node that launched it, then that node's name in
    ``backward_nodes`` (``{node name: role}``), then the GPU-side span of a range."""
    for route, names in (("range", record.chain), ("forward_link", record.forward_chain)):
        for name in names:
            if name in ROLE_OF_RANGE:
                return ROLE_OF_RANGE[name], route
    for name in record.chain:
        node = name[len(EVALUATE):] if name.startswith(EVALUATE) else name
        if node in backward_nodes:
            return backward_nodes[node], "node_name"
    for name in record.device_ranges:
        if name in ROLE_OF_RANGE:
            return ROLE_OF_RANGE[name], "device_span"
    linked = record.chain or record.forward_chain or record.device_ranges
    return None, "elsewhere" if linked else "unattributed"


def gemm_time(records: Iterable[KernelRecord], backward_nodes: Optional[Dict[str, str]] = None,
              top: int = 5) -> GemmTime:
    """Sum the kernel time of one profiled step by role and kind (see :class:`GemmTime`)."""
    seconds: Dict[str, float] = collections.defaultdict(float)
    counts: Dict[str, int] = collections.defaultdict(int)
    routes: Dict[str, float] = collections.defaultdict(float)
    names: Dict[str, Dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for r in records:
        role, route = kernel_role(r, backward_nodes or {})
        is_gemm, is_fp8 = bool(_GEMM_NAME.search(r.name)), bool(_FP8_NAME.search(r.name))
        if route == "unattributed":
            seconds["unattributed"] += r.seconds
        if not is_gemm:
            seconds["other_kernel"] += r.seconds
            if is_fp8:
                counts["fp8_other"] += 1
                names["fp8_other"][r.name] += r.seconds
            continue
        counts["gemm"] += 1
        if is_fp8:
            counts["fp8_gemm"] += 1
            names["fp8"][r.name] += r.seconds
        where = role or "other"
        seconds[f"{where}_gemm"] += r.seconds
        counts[f"{where}_gemm"] += 1
        if is_fp8 and role:
            seconds[f"{role}_fp8_gemm"] += r.seconds
        if role == "linear":
            routes[route] += r.seconds
            if not is_fp8:
                names["linear_non_fp8"][r.name] += r.seconds
        else:
            names[where][r.name] += r.seconds

    def most(kind):
        return tuple(n[:200] for n, _ in sorted(names[kind].items(), key=lambda kv: -kv[1])[:top])

    return GemmTime(
        linear_gemm_s=seconds["linear_gemm"], linear_fp8_gemm_s=seconds["linear_fp8_gemm"],
        output_gemm_s=seconds["output_gemm"], output_fp8_gemm_s=seconds["output_fp8_gemm"],
        other_gemm_s=seconds["other_gemm"], other_kernel_s=seconds["other_kernel"],
        unattributed_s=seconds["unattributed"], gemm_kernels=counts["gemm"], fp8_gemm_kernels=counts["fp8_gemm"],
        fp8_other_kernels=counts["fp8_other"], linear_gemm_kernels=counts["linear_gemm"],
        output_gemm_kernels=counts["output_gemm"], linear_gemm_by_route=dict(routes),
        top_linear_non_fp8_gemms=most("linear_non_fp8"), top_output_gemms=most("output"),
        top_other_gemms=most("other"), top_fp8_gemms=most("fp8"), top_fp8_other=most("fp8_other"))


def loss_agreement(reference: Sequence[float], other: Sequence[float], tolerance: float = 0.01) -> Dict[str, Any]:
    """Pass when ``|other - reference| / |reference|`` stays within ``tolerance`` at every step."""
    if len(reference) != len(other) or not reference:
        return {"status": "fail", "reason": f"{len(reference)} reference and {len(other)} FP8 losses"}
    if not all(math.isfinite(x) for x in list(reference) + list(other)):
        return {"status": "fail", "reason": "a loss is not finite", "tolerance": tolerance}
    diffs = [abs(o - r) / abs(r) for r, o in zip(reference, other)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    return {"status": "pass" if diffs[worst] <= tolerance else "fail",
            "max_relative_difference": round(diffs[worst], 6), "at_step": worst + 1,
            "tolerance": tolerance, "steps": len(diffs)}


def fp8_gemm_verdict(fp8_run: Dict[str, Any], bf16_run: Optional[Dict[str, Any]],
                     limit: float = FP8_SHARE_LIMIT) -> Dict[str, Any]:
    """Did FP8 do the work of the linear layers? Pass when kernels with an FP8 type carry at
    least ``limit`` of the GEMM time of the decoder's linear layers in the FP8 run's
    profiled step (``profile``: :meth:`GemmTime.as_dict`), and the bf16 control run shows
    no FP8 GEMM kernel (else the names prove nothing). Also reported: the TE modules whose
    FP8 amax histories were written."""
    p = fp8_run.get("profile") or {}
    control = (bf16_run or {}).get("profile") or {}
    amax = fp8_run.get("fp8_meta") or {}
    share = p.get("fp8_share")
    evidence = {"fp8_share": share, "limit": limit, "bf16_control_fp8_share": control.get("fp8_share"),
                "bf16_control_fp8_gemm_kernels": control.get("fp8_gemm_kernels"),
                "fp8_run": {k: p.get(k) for k in (
                    "linear_gemm_s", "linear_fp8_gemm_s", "output_gemm_s", "output_fp8_gemm_s", "other_gemm_s",
                    "other_kernel_s", "unattributed_s", "gemm_kernels", "fp8_gemm_kernels", "fp8_other_kernels",
                    "linear_gemm_kernels", "linear_gemm_by_route", "top_linear_non_fp8_gemms", "top_fp8_gemms")},
                "te_modules": amax.get("te_modules"), "te_modules_in_fp8": amax.get("ran_in_fp8"),
                "te_modules_with_amax": amax.get("nonzero_amax_history")}
    if control.get("fp8_gemm_kernels"):
        return {"status": "fail", "reason": "the bf16 control run shows FP8 GEMM kernels too: the kernel names "
                "cannot tell the runs apart", **evidence}
    if share is None:
        if not p:
            why = f"the step was not profiled ({fp8_run.get('profile_error', 'no profile')})"
        elif not p.get("gemm_kernels"):
            why = "no GEMM kernel was profiled"
        else:
            why = (f"none of its {p['gemm_kernels']} GEMM kernels was attributed to the linear layers "
                   f"({p.get('unattributed_s', 0) * 1e3:.1f} ms of kernels were linked to no op: the profiler "
                   "did not link kernels to the ops and ranges that launched them)")
        if (p.get("gemm_kernels") and not p.get("fp8_gemm_kernels") and not p.get("fp8_other_kernels")
                and not amax.get("nonzero_amax_history")):
            return {"status": "fail", "reason": "no FP8 kernel ran and no FP8 amax was recorded: the FP8 run "
                    f"fell back to bf16; {why}", "top_gemms": p.get("top_other_gemms"), **evidence}
        return {"status": "unproven", "reason": f"the FP8 share of the linear layers is unknown: {why}",
                "top_gemms": p.get("top_other_gemms"), **evidence}
    if share >= limit:
        return {"status": "pass", **evidence}
    return {"status": "fail", "reason": f"FP8 kernels carry {share:.1%} of the linear layers' GEMM time, under "
            f"the {limit:.0%} limit (see top_linear_non_fp8_gemms)", **evidence}


def provider(qualname: str) -> str:
    """Who supplies a module or function: ``transformer_engine``, ``apex`` or ``torch``."""
    if qualname.startswith("transformer_engine") or ".extensions.transformer_engine." in qualname:
        return "transformer_engine"
    if qualname.startswith(("apex.", "amp_C")):
        return "apex"
    return "torch"


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    """The model and workload of one check."""

    model: Any  # megarlhf.config.ModelConfig
    seq: int
    micro_batch: int
    microbatches: int
    steps: int
    warmup: int
    lr: float
    gen_batch: int
    prompt_len: int
    new_tokens: int
    gemm_n: int
    gemm_seconds: float

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.micro_batch * self.microbatches


def synthetic_tokens(rows: int, length: int, vocab: int, seed: int):
    """``[rows, length]`` token ids a model learns quickly, so that loss curves move: each
    token follows its predecessor through a fixed random permutation 3 times in 4, else
    it is drawn uniformly from the first eighth of the vocabulary."""
    import torch

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    noise = torch.randint(0, max(vocab // 8, 2), (rows, length), generator=g)
    follow = torch.rand(rows, length, generator=g) < 0.75
    out = torch.empty(rows, length, dtype=torch.long)
    out[:, 0] = noise[:, 0]
    for t in range(1, length):
        out[:, t] = torch.where(follow[:, t], perm[out[:, t - 1]], noise[:, t])
    return out


def make_batches(shape: Shape, count: int) -> List[list]:
    """``count`` steps of microbatches (:class:`~megarlhf.data.batch.LMBatch`, on the host)."""
    import torch

    from megarlhf.data.batch import LMBatch

    b, s = shape.micro_batch, shape.seq
    ids = synthetic_tokens(count * shape.microbatches * b, s + 1, shape.model.vocab_size, SEED)
    positions = torch.arange(s).expand(b, s)
    steps = []
    for i in range(count):
        micro = []
        for j in range(shape.microbatches):
            rows = ids[(i * shape.microbatches + j) * b:(i * shape.microbatches + j + 1) * b]
            micro.append(LMBatch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), torch.ones(b, s),
                                 None, positions))
        steps.append(micro)
    return steps


def _qualname(obj) -> str:
    """``module.Name`` of a class or function, else of the object's class."""
    target = obj if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)) else type(obj)
    return f"{target.__module__ or ''}.{target.__qualname__}"


def _torch_optimizer(optimizer):
    """The optimizer doing the arithmetic under megatron's wrappers."""
    while True:
        if getattr(optimizer, "chained_optimizers", None):
            optimizer = optimizer.chained_optimizers[0]
            continue
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            return optimizer
        optimizer = inner


def observed_kernels(chunks, optimizer) -> Dict[str, str]:
    """The classes actually in use (not what was planned): layers, norms, attention,
    optimizer and megatron's multi-tensor applier."""
    from megatron.core.optimizer import clip_grads

    from megarlhf.models.llama import unwrap

    model = unwrap(chunks[0])
    layer = model.decoder.layers[0]
    seen = {"qkv_linear": layer.self_attention.linear_qkv, "attention": layer.self_attention.core_attention,
            "input_norm": layer.input_layernorm, "mlp_fc1": layer.mlp.linear_fc1,
            "final_norm": model.decoder.final_layernorm}
    out = {k: _qualname(v) for k, v in seen.items()}
    if optimizer is not None:
        out["optimizer"] = _qualname(_torch_optimizer(optimizer))
        out["multi_tensor_applier"] = _qualname(clip_grads.multi_tensor_applier)
    return out


def fp8_meta_evidence(chunks) -> Dict[str, int]:
    """Transformer Engine modules that ran under FP8 and wrote their amax histories
    (delayed scaling keeps one per module: zero until an FP8 cast has measured a tensor)."""
    import torch

    modules = in_fp8 = nonzero = 0
    for chunk in chunks:
        for m in chunk.modules():
            meta = getattr(m, "fp8_meta", None)
            if not isinstance(meta, dict):
                continue
            modules += 1
            in_fp8 += bool(getattr(m, "fp8", False))
            for key in ("scaling_fwd", "scaling_bwd"):
                history = getattr(meta.get(key), "amax_history", None)
                if isinstance(history, torch.Tensor) and bool((history != 0).any()):
                    nonzero += 1
                    break
    return {"te_modules": modules, "ran_in_fp8": in_fp8, "nonzero_amax_history": nonzero}


def role_modules(chunks) -> Dict[str, list]:
    """The modules of each marked role: the decoder's linear layers (QKV, attention
    projection, FC1, FC2 of every layer) and the output layer, under their range names."""
    from megarlhf.models.llama import unwrap

    linear, output = [], []
    for chunk in chunks:
        model = unwrap(chunk)
        for layer in model.decoder.layers:
            linear += [layer.self_attention.linear_qkv, layer.self_attention.linear_proj,
                       layer.mlp.linear_fc1, layer.mlp.linear_fc2]
        if getattr(model, "output_layer", None) is not None:
            output.append(model.output_layer)
    return {LINEAR_RANGE: linear, OUTPUT_RANGE: output}


@contextlib.contextmanager
def mark_roles(modules: Dict[str, Sequence[Any]]):
    """Within the block, every forward of a module in ``modules`` (``{range name:
    modules}``) runs inside a profiler range of that name, opened by a forward pre-hook
    and closed by a forward hook (also when the forward raises)."""
    from torch.profiler import record_function

    open_ranges: List[Any] = []  # forwards nest, so one stack serves every module

    def opener(name):
        def pre_hook(module, args):
            r = record_function(name)
            r.__enter__()
            open_ranges.append(r)
        return pre_hook

    def close(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    handles = []
    try:
        for name, mods in modules.items():
            for m in mods:
                handles += [m.register_forward_pre_hook(opener(name)),
                            m.register_forward_hook(close, always_call=True)]
        yield
    finally:
        for h in handles:
            h.remove()


_BACKWARD_SCOPE = 1  # at::RecordScope::BACKWARD_FUNCTION: the event of an autograd node running


def _is_backward_event(e) -> bool:
    return e.scope == _BACKWARD_SCOPE or e.name.startswith(EVALUATE)


def kernel_records(events, on_gpu: bool, ranges: Sequence[str] = tuple(ROLE_OF_RANGE)) -> List[KernelRecord]:
    """The kernels of a torch.profiler run (its ``events()``) with the chain of profiler
    events around each launch.

    On a GPU, torch links each device kernel to the CPU op that launched it (through
    kineto's correlation ids: ``FunctionEvent.kernels``); its chain is that op and its
    ``cpu_parent``s. Kernels linked to no op (launched outside any recorded op) are
    placed by the GPU-side spans kineto records for each range. On CPU the "kernels" are
    the leaf aten operators, with their own CPU time.

    Backward work runs under the autograd engine's node events (on the GPU in the engine's
    own thread, outside every forward range). A node carries the sequence number and
    thread of the forward op that created it; the chain of the last forward op recorded
    with that number on that thread (the one that made the node, or an op inside it)
    becomes the record's ``forward_chain``.
    """
    from torch.autograd import DeviceType

    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    chains: Dict[int, Tuple[Any, ...]] = {}

    def chain(e) -> Tuple[Any, ...]:
        todo = []
        while e is not None and id(e) not in chains:
            todo.append(e)
            e = e.cpu_parent
        tail = chains[id(e)] if e is not None else ()
        for x in reversed(todo):
            tail = chains[id(x)] = (x,) + tail
        return tail

    forward_ops = {}
    for e in sorted(cpu, key=lambda e: e.time_range.start):  # the last one recorded wins
        if e.sequence_nr >= 0 and not _is_backward_event(e):
            forward_ops[(e.sequence_nr, e.thread)] = e

    def names(evs) -> Tuple[str, ...]:
        return tuple(x.name for x in evs)

    def forward_chain(evs) -> Tuple[str, ...]:
        node = next((x for x in evs if _is_backward_event(x)), None)
        if node is None or node.sequence_nr < 0:
            return ()
        op = forward_ops.get((node.sequence_nr, node.fwd_thread))
        return names(chain(op)) if op is not None else ()

    records = []
    if not on_gpu:
        for e in cpu:
            if e.name.startswith("aten::"):
                evs = chain(e)
                records.append(KernelRecord(e.name, e.self_cpu_time_total / 1e6, names(evs), forward_chain(evs)))
        return records
    linked: Dict[Tuple[str, float], int] = collections.Counter()
    for e in cpu:
        for k in e.kernels:
            if k.name in ranges:  # a range's GPU-side span, which torch links like a kernel
                continue
            evs = chain(e)
            records.append(KernelRecord(k.name, k.duration / 1e6, names(evs), forward_chain(evs)))
            linked[(k.name, round(k.duration, 3))] += 1  # microseconds, to the nanosecond
    device = [e for e in events if e.device_type != DeviceType.CPU]
    spans = sorted({(d.time_range.start, d.time_range.end, d.name) for d in device if d.name in ranges},
                   key=lambda s: (s[1] - s[0], s))
    for d in device:
        start, end = d.time_range.start, d.time_range.end
        if d.name in ranges:
            continue
        key = (d.name, round(end - start, 3))
        if linked[key]:  # already recorded through its op
            linked[key] -= 1
            continue
        inside = tuple(name for s, t, name in spans if s <= start and end <= t)
        records.append(KernelRecord(d.name, (end - start) / 1e6, device_ranges=inside))
    return records


def profile_kernels(step: Callable[[], None], on_gpu: bool,
                    modules: Optional[Dict[str, Sequence[Any]]] = None) -> List[KernelRecord]:
    """The kernels one call of ``step`` launched (the leaf operators on CPU), each with
    where it was launched (:func:`kernel_records`); ``modules`` (``{range name:
    modules}``) are marked with ranges meanwhile."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with mark_roles(modules or {}), profile(activities=activities) as prof:
        step()
        if on_gpu:
            torch.cuda.synchronize()
    return kernel_records(prof.events(), on_gpu)


def _rate(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) if seconds else float("nan")


def mfu(tflops: float, peak: Optional[float]) -> Optional[float]:
    return round(tflops / peak, 4) if peak else None


def train_item(shape: Shape, entry: Dict[str, Any], batches, ctx: Dict[str, Any]) -> Dict[str, Any]:
    """Build the model of ``entry`` (layers, FP8, dtype), train ``shape.steps`` steps on
    ``batches`` and time them; then profile one more step."""
    from megarlhf import platform
    from megarlhf.config import ParallelConfig
    from megarlhf.models.llama import build_model
    from megarlhf.parallel import initialize_model_parallel
    from megarlhf.perf.flops import train_flops_per_token
    from megarlhf.recipes.common import lm_forward_step
    from megarlhf.train.optim import OptimConfig, build_optimizer, wrap_ddp
    from megarlhf.train.step import train_step

    plat = platform.current()
    cfg = dataclasses.replace(shape.model, transformer_impl=entry["layers"], fp8=entry["fp8"],
                              params_dtype=entry["dtype"])
    mp = initialize_model_parallel(ParallelConfig(), seed=SEED)  # the same weights for every run
    _reset_peak(plat)
    chunks = build_model(cfg, mp)
    for c in chunks:  # lm_forward_step returns token sums; megatron divides by the count
        c.config.calculate_per_token_loss = True
    ddp = wrap_ddp(chunks, mp)
    optimizer = build_optimizer(ddp, OptimConfig(lr=shape.lr), mp)
    forward_step = lm_forward_step(mp, cfg, plat.device)

    def one_step(micro):
        res = train_step(ddp, optimizer, mp, forward_step, micro, shape.seq, shape.micro_batch)
        loss_sum = sum(float(o["lm_loss"][0]) for o in res["outputs"])
        tokens = sum(float(o["lm_loss"][1]) for o in res["outputs"])
        return loss_sum / tokens, float(res["grad_norm"] or 0.0)

    losses, grad_norms, seconds = [], [], []
    for i in range(shape.steps):
        plat.synchronize()
        t0 = time.perf_counter()
        loss, grad_norm = one_step(batches[i])
        plat.synchronize()
        seconds.append(time.perf_counter() - t0)
        losses.append(round(loss, 6))
        grad_norms.append(round(grad_norm, 4))
    timed = seconds[shape.warmup:]
    step_s = _rate(timed)
    tflops = train_flops_per_token(cfg, shape.seq) * shape.tokens_per_step / step_s / 1e12
    peak = datasheet_peak(ctx["hw"].gpu)
    probe = (ctx.get("gemm_probe") or {}).get("tflops")
    out: Dict[str, Any] = {
        "status": "ok", "steps": shape.steps, "timed_steps": len(timed),
        "step_s": round(step_s, 5), "tokens_per_step": shape.tokens_per_step,
        "tokens_per_s": round(shape.tokens_per_step / step_s, 1), "tflops": round(tflops, 3),
        "mfu_vs_datasheet_bf16": mfu(tflops, peak and peak["bf16"]),
        "mfu_vs_measured_gemm": mfu(tflops, probe),
        "losses": losses, "grad_norms": grad_norms,
    }
    if entry["fp8"]:
        out["mfu_vs_datasheet_fp8"] = mfu(tflops, peak and peak["fp8"])
    out["peak_memory_gib"] = round(plat.max_memory_allocated() / 2 ** 30, 3)
    out["kernels_in_use"] = observed_kernels(chunks, optimizer)
    try:
        records = profile_kernels(lambda: one_step(batches[shape.steps]), plat.is_gpu, role_modules(chunks))
        out["profile"] = gemm_time(records, BACKWARD_NODES[entry["layers"]]).as_dict()
    except Exception as e:  # the profiler is evidence, not the measurement
        out["profile_error"] = f"{type(e).__name__}: {e}"
    if entry["layers"] == "transformer_engine":
        out["fp8_meta"] = fp8_meta_evidence(chunks)
    return out


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def copy_bandwidth(device, mib: int) -> float:
    """Bytes per second the device's memory moves in a large copy (each byte read once and
    written once: ``2 x size / time``), best of 5: the floor's bandwidth, measured rather
    than taken from a datasheet."""
    import torch

    from megarlhf import platform

    src = torch.empty(mib * 2 ** 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(5):
        platform.current().synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        platform.current().synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() / best


def decode_floor_bytes(chunk, cfg, slots: int, mean_positions: float) -> int:
    """What one decode step must read at least: every weight once, and each slot's keys
    and values up to its position (``mean_positions`` on average)."""
    weights = sum(p.numel() * p.element_size() for p in chunk.parameters())
    kv_per_position = 2 * cfg.num_layers * cfg.num_query_groups * (cfg.hidden_size // cfg.num_attention_heads)
    return int(weights + slots * mean_positions * kv_per_position * next(chunk.parameters()).element_size())


def generate_item(shape: Shape, entry: Dict[str, Any], ctx: Dict[str, Any]) -> Dict[str, Any]:
    """Time megarlhf's rollout engine: ``gen_batch`` random prompts of ``prompt_len``
    tokens on as many slots, ``new_tokens`` sampled tokens each (no stop token), median of
    3 runs; the mean decode-step time against its bandwidth floor (weights + KV cache read
    once at the copy bandwidth measured here); on a GPU again with the decode step as CUDA
    graphs (the same tokens expected)."""
    import torch

    from megarlhf import platform
    from megarlhf.config import ParallelConfig
    from megarlhf.models.llama import build_model
    from megarlhf.parallel import initialize_model_parallel
    from megarlhf.rollout.engine import MegatronEngine, SamplingParams

    plat = platform.current()
    cfg = dataclasses.replace(shape.model, transformer_impl=entry["layers"], params_dtype=entry["dtype"],
                              max_position_embeddings=max(shape.model.max_position_embeddings,
                                                          shape.prompt_len + shape.new_tokens))
    mp = initialize_model_parallel(ParallelConfig(), seed=SEED)
    _reset_peak(plat)
    chunks = build_model(cfg, mp)
    g = torch.Generator().manual_seed(SEED)
    prompts = torch.randint(0, cfg.vocab_size, (shape.gen_batch, shape.prompt_len), generator=g).tolist()
    params = SamplingParams(max_new_tokens=shape.new_tokens, temperature=1.0, seed=1)

    def timed(engine):
        engine.generate(prompts, dataclasses.replace(params, max_new_tokens=min(8, shape.new_tokens)))  # warm-up
        seconds, steps = [], []
        for _ in range(3):
            plat.synchronize()
            t0 = time.perf_counter()
            out = engine.generate(prompts, params)
            plat.synchronize()
            seconds.append(time.perf_counter() - t0)
            steps.append(engine.last_stats)
        # the decode-step time of the median run, from a timed run (it waits for the device
        # around each pass)
        engine.timing = True
        engine.generate(prompts, params)
        engine.timing = False
        st = engine.last_stats
        return out, _rate(seconds), st["decode_s"] / max(st["decode_steps"], 1)

    out, s, step_s = timed(MegatronEngine(chunks, mp, cfg.vocab_size, max_batch=shape.gen_batch))
    generated = sum(len(r) for r in out.response_ids)
    bandwidth = copy_bandwidth(plat.device, 1024 if plat.is_gpu else 256)
    floor_bytes = decode_floor_bytes(chunks[0], cfg, shape.gen_batch, shape.prompt_len + shape.new_tokens / 2)
    res = {"status": "ok", "batch": shape.gen_batch, "slots": shape.gen_batch, "prompt_len": shape.prompt_len,
           "new_tokens": shape.new_tokens, "generated_tokens": generated, "seconds": round(s, 4),
           "tokens_per_s": round(generated / s, 1), "decode_step_ms": _sig(step_s * 1e3),
           "copy_bandwidth_gbs": round(bandwidth / 1e9, 1), "decode_floor_mb": _sig(floor_bytes / 1e6),
           "decode_floor_ms": _sig(floor_bytes / bandwidth * 1e3),
           "decode_step_vs_floor": round(step_s / (floor_bytes / bandwidth), 2)}
    if plat.is_gpu:
        g_out, g_s, g_step = timed(MegatronEngine(chunks, mp, cfg.vocab_size, max_batch=shape.gen_batch,
                                                  cuda_graphs=True))
        res["cuda_graphs"] = {"tokens_per_s": round(generated / g_s, 1), "decode_step_ms": _sig(g_step * 1e3),
                              "decode_step_vs_floor": round(g_step / (floor_bytes / bandwidth), 2),
                              "same_tokens": g_out.response_ids == out.response_ids}
    res["peak_memory_gib"] = round(plat.max_memory_allocated() / 2 ** 30, 3)
    return res


def gemm_item(shape: Shape, entry: Dict[str, Any], ctx: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from megarlhf.perf.flops import gemm_probe

    flops = gemm_probe(n=shape.gemm_n, dtype=getattr(torch, entry["dtype"]), seconds=shape.gemm_seconds,
                       device=entry["device"])
    return {"status": "ok", "n": shape.gemm_n, "tflops": round(flops / 1e12, 3)}


def _reset_peak(plat) -> None:
    import torch

    if plat.is_gpu:
        torch.cuda.reset_peak_memory_stats(plat.device)


def _release(plat) -> None:
    import torch

    gc.collect()
    if plat.is_gpu:
        torch.cuda.empty_cache()


def run_item(items: Dict[str, Dict[str, Any]], name: str, fn: Callable[[Dict[str, Any]], Dict[str, Any]]) -> None:
    """Run one planned item in place; an exception becomes its ``error`` (the other items
    still run)."""
    from megarlhf import platform

    entry = items[name]
    if entry["status"] != "planned":
        return
    print(f"gpu_check: {TITLES[name]} ...", flush=True)
    t0 = time.perf_counter()
    try:
        entry.update(fn(entry))
    except Exception as e:
        entry.update(status="error", error=f"{type(e).__name__}: {e}",
                     traceback=traceback.format_exc()[-4000:])
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    _release(platform.current())


# --------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------


def environment(hw, sources: Dict[str, str], notes: Dict[str, str]) -> Dict[str, Any]:
    import torch

    env: Dict[str, Any] = {
        "python": ".".join(map(str, sys.version_info[:3])), "torch": torch.__version__,
        "cuda": torch.version.cuda, "device": hw.gpu or "cpu",
        "compute_capability": ".".join(map(str, hw.capability)) if hw.gpu else None,
        "datasheet_tflops": datasheet_peak(hw.gpu),
        "packages": sources, "transformer_engine": hw.transformer_engine,
        "nvidia_apex": "ok" if hw.nvidia_apex else _apex_reason(), "notes": notes,
    }
    if hw.transformer_engine == "ok":
        import transformer_engine

        env["transformer_engine_version"] = getattr(transformer_engine, "__version__", "unknown")
    try:
        import megatron.core
        from megatron.core import package_info

        env["megatron_core"] = package_info.__version__
        env["megatron_core_path"] = os.path.dirname(megatron.core.__file__)
    except Exception as e:
        env["megatron_core"] = f"not importable: {type(e).__name__}: {e}"
    return env


def _apex_reason() -> str:
    from megarlhf import platform

    return platform.nvidia_apex_status()[1]


def kernels_summary(items: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, str]]:
    """Per training run: who supplied layers, attention, norms, optimizer, multi-tensor ops."""
    out = {}
    for name, _, _ in TRAIN_RUNS:
        seen = items[name].get("kernels_in_use")
        if seen:
            out[name] = {k: ("fused into the next linear" if v.endswith(".IdentityOp") else provider(v))
                         for k, v in seen.items()}
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json", help="JSON report path")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run every item that can run on CPU, on a tiny model (what CI exercises)")
    ap.add_argument("--make-bundle", nargs="?", const=str(DEFAULT_BUNDLE), metavar="DIR",
                    help="copy the packages the check needs besides torch into DIR (default "
                         f"{DEFAULT_BUNDLE.relative_to(REPO)}) and exit")
    ap.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle to use where packages are missing")
    shape = ap.add_argument_group("shape (defaults: ~1B Llama on GPU; tiny with --cpu-smoke)")
    for flag in ("layers", "hidden", "ffn", "heads", "kv-heads", "vocab", "seq", "micro-batch", "microbatches",
                 "steps", "warmup", "gen-batch", "prompt-len", "new-tokens", "gemm-n", "lr"):
        key = flag.replace("-", "_")
        shape.add_argument(f"--{flag}", type=float if key == "lr" else int, default=None,
                           metavar="LR" if key == "lr" else "N",
                           help=f"default {GPU_SHAPE[key]} ({SMOKE_SHAPE[key]} with --cpu-smoke)")
    return ap.parse_args(argv)


GPU_SHAPE = dict(layers=16, hidden=2048, ffn=5632, heads=16, kv_heads=16, vocab=32000, seq=2048, micro_batch=2,
                 microbatches=2, steps=20, warmup=3, lr=1e-4, gen_batch=64, prompt_len=128, new_tokens=256,
                 gemm_n=8192, gemm_seconds=2.0)
SMOKE_SHAPE = dict(layers=2, hidden=64, ffn=172, heads=4, kv_heads=2, vocab=512, seq=32, micro_batch=2,
                   microbatches=2, steps=3, warmup=1, lr=1e-3, gen_batch=2, prompt_len=8, new_tokens=8,
                   gemm_n=256, gemm_seconds=0.2)


def shape_values(args: argparse.Namespace) -> Dict[str, Any]:
    """The shape's numbers: the GPU or smoke defaults, with the flags given on top."""
    v = dict(SMOKE_SHAPE if args.cpu_smoke else GPU_SHAPE)
    v.update({k: val for k, val in vars(args).items() if k in v and val is not None})
    if v["steps"] <= v["warmup"]:
        raise SystemExit(f"--steps={v['steps']} must exceed --warmup={v['warmup']}")
    return v


def build_shape(v: Dict[str, Any]) -> Shape:
    from megarlhf.config import ModelConfig

    model = ModelConfig(num_layers=v["layers"], hidden_size=v["hidden"], ffn_hidden_size=v["ffn"],
                        num_attention_heads=v["heads"], num_query_groups=v["kv_heads"], vocab_size=v["vocab"],
                        max_position_embeddings=v["seq"])
    return Shape(model=model, seq=v["seq"], micro_batch=v["micro_batch"], microbatches=v["microbatches"],
                 steps=v["steps"], warmup=v["warmup"], lr=v["lr"], gen_batch=v["gen_batch"],
                 prompt_len=v["prompt_len"], new_tokens=v["new_tokens"], gemm_n=v["gemm_n"],
                 gemm_seconds=v["gemm_seconds"])


def describe_shape(v: Dict[str, Any], params: Optional[int]) -> Dict[str, Any]:
    size = ("" if params is None else f", {params / 1e9:.2f}B params" if params >= 1e8
            else f", {params / 1e6:.2f}M params")
    return {"description": f"Llama {v['layers']}L h{v['hidden']} ffn{v['ffn']} heads {v['heads']}/{v['kv_heads']}kv "
                           f"vocab {v['vocab']}{size}, seq {v['seq']}",
            "parameters": params, "tokens_per_step": v["seq"] * v["micro_batch"] * v["microbatches"],
            **{k: v[k] for k in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab", "seq", "micro_batch",
                                 "microbatches", "steps", "warmup", "lr")}, "seed": SEED}


def import_problem() -> Optional[str]:
    """Why the modules the check runs cannot be imported here, or None."""
    try:
        import megatron.core  # noqa: F401  (needs numpy)
        import megarlhf.models.llama  # noqa: F401  (omegaconf, PyYAML)
        import megarlhf.rollout.engine  # noqa: F401
        import megarlhf.train.step  # noqa: F401
    except Exception as e:  # a missing or broken package raises many kinds of errors
        return (f"the packages the check runs cannot be imported ({type(e).__name__}: {e}); make the "
                "bundle with `python tools/gpu_check.py --make-bundle` where megarlhf is installed and "
                "copy it along (torch and numpy must be installed here)")
    return None


def run_check(shape: Shape, items: Dict[str, Dict[str, Any]], hw) -> None:
    """Run every planned item, in place."""
    from megarlhf.config import ParallelConfig
    from megarlhf.parallel import DistEnv, init_distributed, initialize_model_parallel

    init_distributed(DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=29500,
                             source="single"))
    initialize_model_parallel(ParallelConfig(), seed=SEED)
    ctx: Dict[str, Any] = {"hw": hw}
    run_item(items, "gemm_probe", lambda e: gemm_item(shape, e, ctx))
    ctx["gemm_probe"] = items["gemm_probe"]
    batches = make_batches(shape, shape.steps + 1)  # + the profiled step
    for name, _, _ in TRAIN_RUNS:
        run_item(items, name, lambda e: train_item(shape, e, batches, ctx))
        if name == "train_local":
            run_item(items, "generate", lambda e: generate_item(shape, e, ctx))
    te_bf16, te_fp8 = items["train_te_bf16"], items["train_te_fp8"]
    for name, needs in (("fp8_loss_agreement", (te_bf16, te_fp8)), ("fp8_gemms", (te_fp8,))):
        if items[name]["status"] == "planned" and any(run["status"] != "ok" for run in needs):
            items[name] = {"status": "error", "error": "a Transformer Engine training run failed (see it)"}
    run_item(items, "fp8_loss_agreement", lambda e: loss_agreement(te_bf16["losses"], te_fp8["losses"]))
    run_item(items, "fp8_gemms", lambda e: fp8_gemm_verdict(te_fp8, te_bf16))


def _fmt(x: Optional[float], pattern: str) -> str:
    return "n/a" if x is None else pattern.format(x)


def result_line(name: str, e: Dict[str, Any]) -> str:
    if e["status"] == "not run":
        if name.startswith("fp8_") and e["reason"].startswith("model."):
            return "not run with the Transformer Engine runs (see above)"
        return e["reason"]
    if e["status"] == "error":
        return e["error"].splitlines()[0][:160]
    if name == "gemm_probe":
        return f"{e['tflops']:.3g} TFLOP/s ({e['n']}x{e['n']} {e['dtype']} on {e['device']})"
    if name.startswith("train"):
        mfus = [f"{_fmt(e['mfu_vs_datasheet_bf16'], '{:.1%}')} of the bf16 datasheet peak",
                f"{_fmt(e['mfu_vs_measured_gemm'], '{:.1%}')} of the GEMM probe"]
        if "mfu_vs_datasheet_fp8" in e:
            mfus.append(f"{_fmt(e['mfu_vs_datasheet_fp8'], '{:.1%}')} of the FP8 datasheet peak")
        return (f"{e['step_s'] * 1e3:.1f} ms/step, {e['tokens_per_s']:.0f} tok/s, {e['tflops']:.3g} TFLOP/s, "
                f"MFU {', '.join(mfus)}; loss {e['losses'][0]:.3f} -> {e['losses'][-1]:.3f}; "
                f"peak memory {e['peak_memory_gib']:.1f} GiB")
    if name == "generate":
        graphs = e.get("cuda_graphs")
        return (f"{e['tokens_per_s']:.0f} tok/s ({e['batch']} slots x {e['new_tokens']} new tokens after "
                f"{e['prompt_len']}-token prompts, {e['seconds']:.2f} s); decode step {e['decode_step_ms']:.2f} ms, "
                f"{e['decode_step_vs_floor']:.1f}x its floor ({e['decode_floor_mb']:.0f} MB at "
                f"{e['copy_bandwidth_gbs']:.0f} GB/s)"
                + (f"; as CUDA graphs {graphs['decode_step_ms']:.2f} ms ({graphs['decode_step_vs_floor']:.1f}x), "
                   f"same tokens: {graphs['same_tokens']}" if graphs else ""))
    if name == "fp8_loss_agreement":
        if "max_relative_difference" not in e:
            return e.get("reason", "")
        return (f"max relative difference {e['max_relative_difference']:.3%} at step {e['at_step']} of "
                f"{e['steps']} (limit {e['tolerance']:.0%})")
    if name == "fp8_gemms":
        run = e.get("fp8_run") or {}
        share = e.get("fp8_share")
        line = ("FP8 GEMMs: " + ("no GEMM attributed to the linear layers" if share is None else
                                 f"{share:.1%} of the linear layers' GEMM time") + f" (limit {e['limit']:.0%})")
        if run.get("output_gemm_s") is not None:
            output_fp8 = run.get("output_fp8_gemm_s") or 0.0
            line += f"; output layer {run['output_gemm_s'] * 1e3:.1f} ms " + (
                f"{output_fp8 / run['output_gemm_s']:.0%} FP8" if output_fp8 else "bf16")
        line += f"; bf16 control {_fmt(e.get('bf16_control_fp8_share'), '{:.1%}')}"
        line += f"; TE modules with amax {e.get('te_modules_with_amax')}/{e.get('te_modules')}"
        return line + (f"; {e['reason']}" if e.get("reason") else "")
    return ""


def print_report(report: Dict[str, Any]) -> None:
    env, m = report["environment"], report["model"]
    print(f"\ngpu_check ({report['mode']}): {env['device']}"
          + (f" (sm {env['compute_capability']})" if env["compute_capability"] else "")
          + f", torch {env['torch']}, megatron-core {env['megatron_core']}, Transformer Engine: "
          f"{env['transformer_engine']}, NVIDIA apex: {env['nvidia_apex']}")
    print(f"model: {m['description']}; {m['tokens_per_step']} tokens per training step")
    if report["setup_error"]:
        print(f"setup error: {report['setup_error']}")
    print("| item | status | result |\n|---|---|---|")
    for name, e in report["items"].items():
        print(f"| {TITLES[name]} | {e['status']} | {result_line(name, e)} |")
    for run, seen in report["kernels"].items():
        print(f"kernels in {run}: " + ", ".join(f"{k} {v}" for k, v in seen.items()))
    print(f"total {report['seconds']:.0f} s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.make_bundle:
        return bundle_command(Path(args.make_bundle))

    t_start = time.perf_counter()
    v = shape_values(args)
    if args.cpu_smoke:  # the CPU code path, also on a machine that has a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    sources = use_bundle(Path(args.bundle))
    # The report states which optional kernel packages are missing; no need to warn.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed.*")
    hw, notes = inspect_machine()
    items = plan(hw, smoke=args.cpu_smoke)
    problem = import_problem()
    shape = None if problem else build_shape(v)
    if problem:
        items = {name: not_run("the check could not start (see setup_error)") for name in ITEMS}
    report: Dict[str, Any] = {"tool": "gpu_check", "mode": "cpu-smoke" if args.cpu_smoke else "gpu" if hw.gpu
                              else "no-gpu", "setup_error": problem, "environment": environment(hw, sources, notes),
                              "model": describe_shape(v, shape and shape.model.num_parameters()), "items": items}
    print(f"gpu_check: {report['model']['description']}", flush=True)
    if shape is not None and any(e["status"] == "planned" for e in items.values()):
        try:
            run_check(shape, items, hw)
        except Exception as e:  # before any item ran: the process group, the data
            for entry in items.values():
                if entry["status"] == "planned":
                    entry.update(status="error", error=f"{type(e).__name__}: {e}",
                                 traceback=traceback.format_exc()[-4000:])
    report["kernels"] = kernels_summary(items)
    code = 2 if problem else 1 if any(e["status"] in FAILED for e in items.values()) else 0
    report["exit_code"] = code
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    print(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
