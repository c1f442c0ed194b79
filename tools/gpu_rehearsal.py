#!/usr/bin/env python3
"""A rehearsal of the flagship job on one GPU machine: the real recipes, as real processes
with real checkpoints, at a small Llama shape with Transformer Engine (TE) layers and FP8.

    python tools/gpu_rehearsal.py --make-bundle                 # where megarlhf is installed
    python tools/gpu_rehearsal.py --out rehearsal.json          # on the GPU machine: < 10 min, one H100/H200
    python tools/gpu_rehearsal.py --cpu --out rehearsal.json    # the same sequence on CPU, tiny (in `make test`)

On a GPU machine with no network: make the bundle here, copy the repository with it
(``tools/gpu_bundle/``) there, e.g. ``rsync -a --exclude .venv --exclude runs ./ gpu:megarlhf/``,
then on the GPU machine ``cd megarlhf && python tools/gpu_rehearsal.py --out rehearsal.json``.
Nothing is installed and nothing is downloaded.

The sequence (each item prints a row as it ends; each runs ``python -m megarlhf.cli ...``,
the conversion tools or a worker process of this tool; with ``--cpu`` those processes
fork from a server that has imported the stack once, ``megarlhf.forked``):

  sft              ``megarlhf sft`` a few steps on the built-in task, fresh small Llama; saves
  convert          its checkpoint -> Hugging Face (tools/convert_megatron_to_hf.py) -> megatron
                   (tools/convert_hf_to_megatron.py, recording TE layers with
                   ``--transformer-impl`` where the converter has it) -> Hugging Face again: the
                   two exports' tensors must be bit-identical
  logits_local     logits of the converted checkpoint with local layers vs ``transformers``
  logits_te        the same with TE layers (bf16, and FP8 where it runs) vs ``transformers``
                   (vs the local layers where transformers is not importable); relative L2
                   distance within 1e-5 in fp32, 2e-2 in bf16, 0.15 in FP8
  rm, dpo          ``megarlhf rm`` and ``megarlhf dpo`` a few steps from the SFT checkpoint on the
                   task's preference pairs
  ppo_resume       ``megarlhf ppo`` colocated, 5 steps, saving at step 3; a second run resumes
                   from that step-3 checkpoint; steps 4-5 of both must agree (metrics.jsonl:
                   losses, KL, scores...): bit-exact on CPU, within 1e-2 (relative) on GPU,
                   the largest difference reported.
                   2 processes (DP=2: megatron's distributed optimizer) on CPU and on 2+ GPUs;
                   DP=1 (the plain optimizer) on one GPU
  generate         tokens/s of the rollout engine (megarlhf/rollout/engine.py) on the SFT model
  ppo_partitioned  ``megarlhf ppo placement=partitioned``: the reward model on its own ranks
                   (2+ GPUs, or 2 processes on CPU), a few steps

Kernels: every recipe runs with TE layers and FP8 (``hybrid``) in bf16 where the machine
allows, else TE layers in bf16 (no FP8: compute capability < 8.9), else local layers in
bf16, and each row says which and why (``--cpu``: local layers in fp32). An item that
needs what the machine lacks is reported ``not run`` with the reason, never guessed; the
others still run.

Shapes. GPU: Llama 8 layers, hidden 1024, FFN 2816, 16 heads / 4 KV heads, the task's
384-piece vocabulary (91M parameters; every GEMM dimension a multiple of 16, as FP8 needs),
rows of 128 tokens. The arithmetic, 6 x parameters per trained token and 2 x per forward
token: SFT 40 steps x 64 rows x 128 tokens = 0.33M tokens = 1.8e14 FLOP; RM, DPO (with its
reference pass) and PPO (5 + 2 + 3 steps of 64 prompts, 64 new tokens each) bring it to about
5e14 FLOP: seconds at even 10% of an H100's 989 TFLOP/s bf16 peak. The wall time is the 11
process starts (CUDA, TE and megatron-core imports, model builds, checkpoints of ~1 GB) at
some 20-30 s each: 4-6 minutes (the report's ``estimate`` redoes this sum).
CPU (``--cpu``): 2 layers, hidden 64, a handful of steps of everything, about 3 minutes on
2 cores.

What the GPU machine needs: Python 3.10+, torch with CUDA, and these packages with compiled
parts, which the bundle cannot carry: numpy, sentencepiece, pyarrow, pandas, psutil,
safetensors, xxhash (torch images carry numpy; for the others, ``pip download`` their wheels
for that Python on a networked machine and ``pip install`` them there). Transformer Engine
for the TE and FP8 items; transformers for the logit comparisons against Hugging Face
(without it logits_local is not run and logits_te compares TE with local layers).
Everything else the recipes import (megatron-core, omegaconf, PyYAML, datasets and its
pure-Python dependencies, tqdm, protobuf's pure-Python implementation) is in the bundle,
used only where the machine lacks it (megatron-core also where the machine's is of another
release line). An installed protobuf, with its compiled extension, tokenizes ~10x faster
than the bundled one (~0.3 vs ~3 ms a text). The rehearsal checks all of this first and
says what is missing.

Exit status: 0 when every item that ran passed (``not run`` does not fail), 1 when one
failed, 2 when the rehearsal could not start (a package missing). The last line printed is
the path of the JSON report. The runs' folders (``--work``, default a new folder beside the
report) are removed at the end when everything passed, unless ``--keep`` or ``--work``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

# torch, megatron-core and megarlhf are imported inside the functions that use them: on a
# bare GPU machine they are importable only once use_bundle() has put the bundle on the
# path, and each worker process imports only what its item needs.

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
SEED = 1234


def _load_gpu_check():
    """tools/gpu_check.py as a module (tools/ is not a package): its bundle functions,
    machine inspection and environment summary are shared, not copied."""
    if "gpu_check" in sys.modules:
        return sys.modules["gpu_check"]
    spec = importlib.util.spec_from_file_location("gpu_check", TOOLS / "gpu_check.py")
    module = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()
Bundled = gpu_check.Bundled

# --------------------------------------------------------------------------------------
# The bundle: gpu_check's packages plus what the recipes import
# --------------------------------------------------------------------------------------

# Found by running the whole --cpu rehearsal in an interpreter whose path holds only torch
# with its dependencies and the binary packages below (tests/tools/test_gpu_rehearsal.py
# does it again). ``datasets`` reads its dependencies' versions from their metadata at
# import: make_bundle writes each package's ``<name>-<version>.dist-info`` beside it.
BUNDLE = gpu_check.BUNDLE + (
    Bundled("datasets", ("datasets",), "datasets"),
    Bundled("dill", ("dill",), "dill"),
    Bundled("multiprocess", ("multiprocess", "_multiprocess"), "multiprocess"),
    Bundled("huggingface-hub", ("huggingface_hub",), "huggingface_hub"),
    Bundled("tqdm", ("tqdm",), "tqdm"),
    # megarlhf's SentencePiece tokenizer asks for protobuf output (piece offsets); without
    # its compiled extension protobuf runs its pure-Python implementation.
    Bundled("protobuf", ("google",), "google.protobuf"),
    # huggingface_hub's HTTP stack (datasets imports the hub; nothing is downloaded). Its
    # 2.x releases import httpx2, httpcore2, h11, anyio, idna and truststore; 1.x httpx and
    # 0.x requests instead: each is copied where installed, none is required.
    Bundled("httpx2", ("httpx2",), "httpx2", required=False),
    Bundled("httpcore2", ("httpcore2",), "httpcore2", required=False),
    Bundled("httpx", ("httpx",), "httpx", required=False),
    Bundled("httpcore", ("httpcore",), "httpcore", required=False),
    Bundled("h11", ("h11",), "h11", required=False),
    Bundled("anyio", ("anyio",), "anyio", required=False),
    Bundled("sniffio", ("sniffio",), "sniffio", required=False),
    Bundled("idna", ("idna",), "idna", required=False),
    Bundled("certifi", ("certifi",), "certifi", required=False),
    Bundled("truststore", ("truststore",), "truststore", required=False),
    Bundled("requests", ("requests",), "requests", required=False),
    Bundled("urllib3", ("urllib3",), "urllib3", required=False),
)
# Compiled packages the recipes import: the machine must have them (the bundle copies no
# binaries). import name -> distribution.
MACHINE_PACKAGES = {"numpy": "numpy", "sentencepiece": "sentencepiece", "pyarrow": "pyarrow",
                    "pandas": "pandas", "psutil": "psutil", "safetensors": "safetensors",
                    "xxhash": "xxhash"}


def import_problems() -> List[str]:
    """What the recipes need and cannot import here, grouped by what to do about it."""
    fixes = {"machine": "install them on this machine (they have compiled parts the bundle cannot carry)",
             "bundle": "make the bundle with `python tools/gpu_rehearsal.py --make-bundle` where megarlhf is "
                       "installed and copy it along"}
    modules = [(m, "machine") for m in MACHINE_PACKAGES]
    modules += [(m, "bundle") for m in ("megatron.core", "omegaconf", "yaml", "datasets", "tqdm", "google.protobuf")]
    failed: Dict[str, List[str]] = {"machine": [], "bundle": []}
    for module, where in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # a missing or broken package raises many kinds of errors
            failed[where].append(module if isinstance(e, ModuleNotFoundError) else f"{module} ({type(e).__name__}: {e})")
    return [f"cannot import {', '.join(names)}: {fixes[where]}" for where, names in failed.items() if names]


# --------------------------------------------------------------------------------------
# Sizes and kernel choices
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The model and the workload of every item."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    max_positions: int
    seq: int
    """Row length of SFT, RM and DPO (the task's examples are at most 128 tokens)."""
    num_sft: int
    num_preference: int
    num_prompts: int
    num_eval: int
    sft_steps: int
    sft_batch: int
    sft_micro: int
    sft_lr: float
    eval_prompts: int
    eval_new_tokens: int
    pair_steps: int
    """Steps of RM and of DPO."""
    pair_batch: int
    pair_micro: int
    rm_eval_pairs: int
    ppo_prompts: int
    ppo_new_tokens: int
    ppo_minibatch: int
    ppo_micro: int
    ppo_lr: float
    partitioned_steps: int
    logits_batch: int
    logits_seq: int
    gen_batch: int
    gen_new_tokens: int
    timeout_s: int
    """Longest any one process may run."""


GPU_SIZES = Sizes(layers=8, hidden=1024, ffn=2816, heads=16, kv_heads=4, max_positions=512, seq=128,
                  num_sft=3072, num_preference=512, num_prompts=512, num_eval=128,
                  sft_steps=40, sft_batch=64, sft_micro=16, sft_lr=1e-3, eval_prompts=64, eval_new_tokens=48,
                  pair_steps=10, pair_batch=32, pair_micro=8, rm_eval_pairs=64,
                  ppo_prompts=64, ppo_new_tokens=64, ppo_minibatch=16, ppo_micro=16, ppo_lr=1e-5,
                  partitioned_steps=3, logits_batch=4, logits_seq=128, gen_batch=64, gen_new_tokens=256,
                  timeout_s=600)
CPU_SIZES = Sizes(layers=2, hidden=64, ffn=176, heads=4, kv_heads=2, max_positions=128, seq=128,
                  num_sft=256, num_preference=64, num_prompts=64, num_eval=16,
                  sft_steps=4, sft_batch=16, sft_micro=8, sft_lr=2e-3, eval_prompts=8, eval_new_tokens=16,
                  pair_steps=3, pair_batch=8, pair_micro=4, rm_eval_pairs=16,
                  ppo_prompts=8, ppo_new_tokens=16, ppo_minibatch=4, ppo_micro=4, ppo_lr=1e-3,
                  partitioned_steps=2, logits_batch=2, logits_seq=64, gen_batch=8, gen_new_tokens=32,
                  timeout_s=300)
PPO_STEPS, PPO_SAVE_AT = 5, 3


@dataclasses.dataclass(frozen=True)
class Variant:
    """How a model runs: layer implementation, FP8 recipe, dtype."""

    layers: str
    fp8: Optional[str]
    dtype: str

    def describe(self) -> str:
        layers = "TE layers" if self.layers == "transformer_engine" else "local layers"
        return f"{layers}, {'FP8 ' + self.fp8 if self.fp8 else {'bfloat16': 'bf16', 'float32': 'fp32'}[self.dtype]}"


# The model-block keys the rehearsal sets for a variant (None: left unset). sft's `model:`
# is a full ModelConfig; rm's and dpo's `model:` and each PPO role's `<role>.model:` are
# RuntimeConfigs, whose unset keys keep the checkpoint's. TE layers run cuDNN's fused
# attention, as the flagship configs do.
MODEL_KEYS: Tuple[Tuple[str, Callable[[Variant], Optional[str]]], ...] = (
    ("transformer_impl", lambda v: v.layers),
    ("attention_backend", lambda v: "fused" if v.layers == "transformer_engine" else None),
    ("fp8", lambda v: v.fp8),
    ("params_dtype", lambda v: v.dtype),
)


def model_overrides(prefix: str, v: Variant) -> List[str]:
    """Dotted overrides that make the model block at ``prefix`` run ``v``."""
    return [f"{prefix}.{key}={value}" for key, value in ((k, f(v)) for k, f in MODEL_KEYS) if value is not None]


# --------------------------------------------------------------------------------------
# Planning: what runs here (pure: tested on hardware written out by hand)
# --------------------------------------------------------------------------------------

ITEMS = ("sft", "convert", "logits_local", "logits_te", "rm", "rm_packed", "dpo", "ppo_resume", "generate",
         "ppo_partitioned")
TITLES = {"sft": "SFT", "convert": "HF -> megatron -> HF", "logits_local": "logits, local layers vs HF",
          "logits_te": "logits, TE layers", "rm": "reward model", "rm_packed": "reward model, packed rows",
          "dpo": "DPO",
          "ppo_resume": "PPO colocated, resume", "generate": "generation", "ppo_partitioned": "PPO partitioned"}
TE_ONLY = ("logits_te",)
"""Items that exist to test Transformer Engine: not run without it (the others fall back)."""
NEEDS = {"convert": ("sft",), "logits_local": ("convert",), "logits_te": ("convert",), "rm": ("sft",),
         "rm_packed": ("rm",),
         "dpo": ("sft",), "ppo_resume": ("sft", "rm"), "generate": ("sft",), "ppo_partitioned": ("sft", "rm")}
"""Items whose outputs an item uses: it is not run when one of them did not pass."""


def not_run(reason: str) -> Dict[str, Any]:
    return {"status": "not run", "reason": reason}


def choose_variant(hw, cpu: bool) -> Tuple[Variant, Optional[str], Optional[str]]:
    """The best kernels for the recipes on ``hw`` (a :class:`megarlhf.platform.Hardware`):
    TE + FP8, else TE in bf16, else local layers. Returns (variant, why Transformer Engine
    cannot run or None, what the fallback leaves out or None)."""
    from megarlhf.platform import select_kernels

    if cpu:
        return (Variant("local", None, "float32"),
                "the CPU mode runs local layers in fp32 (Transformer Engine and FP8 need a CUDA GPU)", None)
    dtype = "bfloat16" if tuple(hw.capability) >= (8, 0) else "float32"
    try:
        select_kernels("transformer_engine", "hybrid", hw)
        return Variant("transformer_engine", "hybrid", dtype), None, None
    except RuntimeError as e:
        no_fp8 = str(e)
    try:
        select_kernels("transformer_engine", None, hw)
        return Variant("transformer_engine", None, dtype), None, f"FP8 not run: {no_fp8}"
    except RuntimeError as e:
        return Variant("local", None, dtype), str(e), f"Transformer Engine and FP8 not run: {e}"


def plan(hw, gpus: int, cpu: bool, transformers: bool) -> Dict[str, Dict[str, Any]]:
    """What each item runs on ``hw`` with ``gpus`` visible GPUs (``cpu``: the CPU mode;
    ``transformers``: whether it can be imported): the variant, processes, or why not."""
    if hw.gpu is None and not cpu:
        why = "no CUDA GPU is visible (--cpu runs the same sequence on CPU)"
        return {name: not_run(why) for name in ITEMS}
    v, no_te, fallback = choose_variant(hw, cpu)
    base: Dict[str, Any] = {"status": "planned", **dataclasses.asdict(v), "processes": 1}
    if fallback:
        base["fallback"] = fallback
    out: Dict[str, Dict[str, Any]] = {name: dict(base) for name in ITEMS}
    out["logits_local"] = ({**base, "layers": "local", "fp8": None, "reference": "transformers"} if transformers
                           else not_run("transformers is not importable here: no Hugging Face reference"))
    out["logits_local"].pop("fallback", None)
    if no_te:
        out["logits_te"] = not_run(no_te)
    else:
        out["logits_te"]["reference"] = ("transformers" if transformers else
                                         f"the local layers ({Variant('local', None, v.dtype).describe()})")
    ppo_procs = 2 if cpu else min(max(gpus, 1), 2)
    out["ppo_resume"].update(processes=ppo_procs, optimizer=(
        f"distributed (DP={ppo_procs})" if ppo_procs > 1 else "plain (DP=1: the distributed optimizer needs DP > 1)"))
    if cpu or gpus >= 2:
        world = 2 if cpu or gpus < 4 else 4
        out["ppo_partitioned"].update(processes=world, reward_ranks=world // 2)
    else:
        out["ppo_partitioned"] = not_run(f"needs 2 GPUs ({gpus} visible)")
    return out


def variant_of(entry: Mapping[str, Any]) -> Variant:
    return Variant(entry["layers"], entry["fp8"], entry["dtype"])


# --------------------------------------------------------------------------------------
# Verdicts (pure)
# --------------------------------------------------------------------------------------

# Logits against a reference in float32: relative L2 distance ||a - b|| / ||b||. fp32 on CPU
# matches transformers to ~1e-7; bf16 rounds every activation to 8 significant bits; FP8
# (E4M3 forward) to 4, so its logits are looser still.
LOGIT_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "fp8": 0.15}
# Packed vs padded reward-model training: |a - b| / max(1, |a|, |b|) for each training metric
# of every step (the same arithmetic through other attention kernels: rounding only).
PACKED_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "fp8": 5e-2}
PACKED_METRICS = ("loss", "accuracy", "margin", "reward_mean", "reward_std", "grad_norm")
# Resumed vs uninterrupted PPO: |a - b| / max(1, |a|, |b|) for every metric of steps 4-5.
RESUME_TOLERANCE = {"cpu": 0.0, "gpu": 1e-2}
# Not compared: wall-clock measurements.
_TIMING = re.compile(r"^(time|step_s)$|^(time|tokens_per_s)/")


def logit_verdict(metrics: Mapping[str, float], variant: Variant) -> Dict[str, Any]:
    tol = LOGIT_TOLERANCE["fp8" if variant.fp8 else variant.dtype]
    ok = math.isfinite(metrics["rel_l2"]) and metrics["rel_l2"] <= tol
    return {"status": "pass" if ok else "fail", "tolerance_rel_l2": tol, **metrics}


def step_rows(rows: Iterable[Mapping[str, Any]], key: str) -> Dict[int, Dict[str, Any]]:
    """metrics.jsonl rows that carry ``key`` (a step's training metrics), by step."""
    return {int(r["step"]): dict(r) for r in rows if key in r}


def compare_steps(a: Mapping[int, Mapping[str, Any]], b: Mapping[int, Mapping[str, Any]],
                  steps: Sequence[int], tolerance: float) -> Dict[str, Any]:
    """Every numeric metric (timings aside) of ``steps`` in run ``a`` against run ``b``:
    pass when ``|a - b| / max(1, |a|, |b|) <= tolerance`` everywhere (0: bit-exact)."""
    missing = [s for s in steps if s not in a or s not in b]
    if missing or not steps:
        return {"status": "fail", "reason": f"steps {missing} are missing from a run's metrics",
                "steps": list(steps)}
    worst: Dict[str, Any] = {"relative": -1.0}
    keys, max_abs = set(), 0.0
    for s in steps:
        for k in sorted(set(a[s]) & set(b[s])):
            x, y = a[s][k], b[s][k]
            if k == "step" or _TIMING.search(k) or not all(isinstance(z, (int, float)) for z in (x, y)):
                continue
            keys.add(k)
            same = x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
            diff = 0.0 if same else abs(x - y) if math.isfinite(x - y) else math.inf
            rel = diff / max(1.0, abs(x), abs(y)) if math.isfinite(diff) else math.inf
            max_abs = max(max_abs, diff)
            if rel > worst["relative"]:
                worst = {"relative": rel, "step": s, "key": k, "a": x, "b": y}
    only = sorted((set().union(*(a[s] for s in steps)) ^ set().union(*(b[s] for s in steps))) - set(keys))
    ok = bool(keys) and worst["relative"] <= tolerance and not [k for k in only if not _TIMING.search(k)]
    return {"status": "pass" if ok else "fail", "steps": list(steps), "tolerance": tolerance,
            "max_abs_difference": max_abs, "max_relative_difference": max(worst["relative"], 0.0),
            "worst": worst if worst["relative"] > 0 else None, "metrics_compared": sorted(keys),
            **({"metrics_in_one_run_only": only} if only else {})}


def all_finite(values: Iterable[float]) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in values)


def overall_status(items: Mapping[str, Mapping[str, Any]]) -> int:
    """0 when nothing failed (``not run`` is not a failure), else 1."""
    return 1 if any(e["status"] == "fail" for e in items.values()) else 0


def _fmt(x: Optional[float], pattern: str = "{:.4g}") -> str:
    return "n/a" if x is None else pattern.format(x)


def result_line(name: str, e: Mapping[str, Any]) -> str:
    """One line saying what an item found (or why it did not run or failed)."""
    if e["status"] == "not run":
        return e["reason"]
    if e["status"] == "planned":
        return ""
    if e.get("error"):
        return e["error"].splitlines()[0][:200]
    line = _found(name, e)
    return f"{'; '.join(e['problems'])} ({line})" if e.get("problems") else line


def _found(name: str, e: Mapping[str, Any]) -> str:
    kernels = e.get("kernels", "")
    fallback = f" [{e['fallback']}]" if e.get("fallback") else ""
    if name == "sft":
        return (f"{kernels}{fallback}: {e['steps']} steps, loss {_fmt(e['losses'][0])} -> {_fmt(e['losses'][-1])}, "
                f"exact match {_fmt(e.get('exact_match'), '{:.1%}')}")
    if name == "convert":
        c = e["exports"]
        return (f"{c['tensors']} tensors, {c['identical']} bit-identical; converted checkpoint records "
                f"transformer_impl={e['recorded_transformer_impl']}"
                + ("" if e["transformer_impl_flag"] else " (the converter has no --transformer-impl yet)"))
    if name.startswith("logits"):
        parts = [f"{k}: rel L2 {_fmt(p.get('rel_l2'), '{:.2e}')} (limit {_fmt(p.get('tolerance_rel_l2'), '{:g}')}), "
                 f"max |diff| {_fmt(p.get('max_abs'), '{:.2e}')}, top-1 {_fmt(p.get('top1_agreement'), '{:.1%}')}"
                 for k, p in e.get("comparisons", {}).items()]
        return "; ".join(parts + e.get("notes", []))
    if name in ("rm", "dpo"):
        extra = (f", held-out pair accuracy {_fmt(e.get('eval_accuracy'), '{:.1%}')}" if name == "rm"
                 else f", exact match {_fmt(e.get('exact_match'), '{:.1%}')}")
        return (f"{kernels}{fallback}: {e['steps']} steps, loss {_fmt(e['losses'][0])} -> "
                f"{_fmt(e['losses'][-1])}{extra}")
    if name == "rm_packed":
        c = e.get("vs_padded", {})
        return (f"{kernels}{fallback}: {e['steps']} steps in packed rows; vs the padded run: max relative "
                f"difference {_fmt(c.get('max_relative_difference'), '{:.3g}')} over "
                f"{len(c.get('metrics_compared', []))} metrics (tolerance {c.get('tolerance')})")
    if name == "ppo_resume":
        c = e["resume"]
        return (f"{kernels}, {e['processes']} process(es), optimizer {e['optimizer']}{fallback}: steps 4-5 resumed "
                f"vs uninterrupted: max |diff| {_fmt(c.get('max_abs_difference'), '{:.3g}')} over "
                f"{len(c.get('metrics_compared', []))} metrics (tolerance {c.get('tolerance')})")
    if name == "generate":
        g = e.get("graphs") or {}
        graphs = (f"; decode step as CUDA graphs ({g.get('captured')} captured): {g.get('tokens_per_s', 0):.0f} "
                  f"tokens/s, same tokens: {g.get('same_tokens')}" if g.get("real") else
                  f"; graph logic replayed eagerly (no GPU), same tokens: {g.get('same_tokens')}" if g else "")
        return (f"{kernels}: {e['tokens_per_s']:.0f} tokens/s ({e['batch']} x {e['new_tokens']} new tokens after "
                f"~{e['prompt_tokens']:.0f}-token prompts, median of {len(e['run_seconds'])}){graphs}")
    if name == "ppo_partitioned":
        return (f"{kernels}, {e['processes']} processes, reward model on {e['reward_ranks']} of them{fallback}: "
                f"{e['steps']} steps, score {_fmt(e['scores'][0])} -> {_fmt(e['scores'][-1])}; vs colocated: "
                f"max |diff| {_fmt(e.get('vs_colocated_max_abs'), '{:.3g}')} (for information)")
    return ""


def table(items: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["| item | status | seconds | result |", "|---|---|---:|---|"]
    for name, e in items.items():
        secs = e.get("seconds")
        lines.append(f"| {TITLES[name]} | {e['status']} | {'' if secs is None else f'{secs:.1f}'} | "
                     f"{result_line(name, e)} |")
    return "\n".join(lines)


def estimate(sizes: Sizes, entries: Mapping[str, Mapping[str, Any]], gpu: bool = True) -> Dict[str, Any]:
    """FLOPs of the planned work and the seconds they and the process starts should take:
    6 x parameters per trained token, 2 x per forward token, at an assumed sustained rate
    (GPU: 10% of an H100's bf16 peak for this small model; CPU: 20 GFLOP/s at the tiny
    shapes) plus a fixed cost per process start (GPU: 25 s; CPU: 12 s)."""
    from megarlhf.config import ModelConfig
    from megarlhf.data.builtin import BUILTIN_VOCAB_SIZE

    n = ModelConfig(num_layers=sizes.layers, hidden_size=sizes.hidden, ffn_hidden_size=sizes.ffn,
                    num_attention_heads=sizes.heads, num_query_groups=sizes.kv_heads,
                    vocab_size=BUILTIN_VOCAB_SIZE).num_parameters()
    rows_pairs = 2 * sizes.pair_batch * sizes.pair_steps
    ppo_tokens = sizes.ppo_prompts * (96 + sizes.ppo_new_tokens)
    ppo_steps = PPO_STEPS + (PPO_STEPS - PPO_SAVE_AT) + sizes.partitioned_steps
    flops = {"sft": 6 * n * sizes.sft_steps * sizes.sft_batch * sizes.seq,
             "rm": 6 * n * rows_pairs * sizes.seq,
             "dpo": 6 * n * rows_pairs * sizes.seq + 2 * n * 2 * sizes.num_preference * sizes.seq,
             # per step: generation, 4 forwards (reward, reference, old log-probs, values), 2 updates
             "ppo": ppo_steps * (2 * n * sizes.ppo_prompts * sizes.ppo_new_tokens + (4 * 2 + 2 * 6) * n * ppo_tokens),
             "generate": 4 * 2 * n * sizes.gen_batch * sizes.gen_new_tokens}
    starts = {"sft": 1, "convert": 3, "logits_local": 1, "logits_te": 1, "rm": 1, "dpo": 1, "ppo_resume": 2,
              "generate": 1, "ppo_partitioned": 1}
    processes = sum(c for k, c in starts.items() if entries.get(k, {}).get("status") == "planned")
    rate, per_start = (1e14, 25.0) if gpu else (2e10, 12.0)
    total = sum(flops.values())
    return {"parameters": n, "flops": flops, "total_flops": total, "assumed_flops_per_s": rate,
            "compute_seconds": round(total / rate, 1), "process_starts": processes,
            "assumed_seconds_per_start": per_start,
            "estimated_seconds": round(total / rate + processes * per_start)}


# --------------------------------------------------------------------------------------
# Running items: child processes
# --------------------------------------------------------------------------------------


def _stdlib_paths() -> set:
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
    return {os.path.realpath(p) for p in paths}


def child_pythonpath(bundle_paths: Sequence[str], hidden: Optional[Path]) -> List[str]:
    """What the children put first on their path: the stubs hiding unusable kernel packages,
    the repository, the bundle's folders; and in an interpreter without site-packages
    (``python -S``) every other folder this one imports from."""
    paths = ([str(hidden)] if hidden else []) + [str(REPO)] + list(bundle_paths)
    if sys.flags.no_site:
        stdlib = _stdlib_paths()
        for p in sys.path:
            real = os.path.realpath(p) if p else ""
            if p and real not in stdlib and not p.endswith((".zip", "lib-dynload")) and real != str(TOOLS):
                paths.append(p)
    elif os.environ.get("PYTHONPATH"):
        paths += os.environ["PYTHONPATH"].split(os.pathsep)
    return list(dict.fromkeys(paths))


def hide_modules(names: Iterable[str], folder: Path) -> Optional[Path]:
    """Stub packages that raise ImportError, for the children: the Transformer Engine or
    apex that :func:`gpu_check.inspect_machine` hid in this process stay hidden in them."""
    names = list(names)
    if not names:
        return None
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(
            f"raise ImportError('{name} is hidden by tools/gpu_rehearsal.py: installed but unusable here')\n")
    return folder


@dataclasses.dataclass
class Context:
    """What the items share: sizes, the plan, where runs go, the children's environment."""

    cpu: bool
    sizes: Sizes
    entries: Dict[str, Dict[str, Any]]
    work: Path
    env: Dict[str, str]
    python: List[str]
    cpus: int
    commands: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    """The processes the current item started: name, exit status, seconds."""

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    def run(self, name: str, argv: Sequence[str], processes: int = 1,
            extra_env: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
        """Run ``python argv`` with output to ``logs/<name>.log``; returns rc, seconds, log."""
        log = self.path("logs", f"{name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(self.env, **(extra_env or {}))
        if self.cpu:  # one process per core at most; the CLI's own launcher keeps an explicit value
            env["OMP_NUM_THREADS"] = str(max(1, self.cpus // processes))
        cmd = self.python + [str(a) for a in argv]
        t0 = time.perf_counter()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            if self.cpu:  # forked from a server that has imported the stack once (megarlhf.forked)
                rc = self._forked(argv, env, str(log))
            else:
                rc = self._process(cmd, env, f)
        seconds = round(time.perf_counter() - t0, 1)
        self.commands.append({"name": name, "rc": rc, "seconds": seconds})
        return {"rc": rc, "seconds": seconds, "log": str(log), "command": " ".join(cmd)}

    def _forked(self, argv: Sequence[str], env: Mapping[str, str], log: str):
        from megarlhf import forked

        try:
            return forked.run(argv, dict(env), str(self.work), log, log, self.sizes.timeout_s)
        except subprocess.TimeoutExpired:
            return "timeout"

    def _process(self, cmd: List[str], env: Mapping[str, str], f):
        """``cmd`` in a fresh process: what a GPU run must be (a fork cannot use CUDA)."""
        # Its own session, so that a timeout stops the whole tree it started (torchrun's ranks).
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(self.work),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=self.sizes.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
        except BaseException:  # Ctrl-C reaches this process only: stop what it started
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        return rc

    def check(self, res: Dict[str, Any], what: str) -> None:
        if res["rc"] != 0:
            why = f"timed out after {self.sizes.timeout_s} s" if res["rc"] == "timeout" else f"exit status {res['rc']}"
            raise ItemFailed(f"{what} failed ({why}): {res['command']}", log_tail(res["log"]))

    def cli(self, name: str, *args: str, processes: int = 1, extra_env=None) -> Dict[str, Any]:
        res = self.run(name, ["-m", "megarlhf.cli", *args], processes, extra_env)
        self.check(res, f"megarlhf {args[0]}")
        return res

    def worker(self, name: str, spec: Dict[str, Any]) -> Dict[str, Any]:
        """A worker of this tool in its own process (a model on the device, then exit)."""
        spec_file, result_file = self.path("workers", f"{name}.json"), self.path("workers", f"{name}.result.json")
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(json.dumps(spec, indent=1))
        res = self.run(name, [str(Path(__file__).resolve()), "--worker", spec["worker"], "--spec", str(spec_file),
                              "--result", str(result_file)])
        self.check(res, f"the {spec['worker']} worker")
        return json.loads(result_file.read_text())


class ItemFailed(Exception):
    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


def log_tail(path: str, chars: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        raise ItemFailed(f"{path} was not written")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_meta(ckpt: Path) -> Dict[str, Any]:
    meta = ckpt / "megarlhf.json"
    if not meta.is_file():
        raise ItemFailed(f"{ckpt} is not a checkpoint ({meta.name} is missing)")
    return json.loads(meta.read_text())


def failures(conditions: Sequence[Tuple[bool, str]]) -> List[str]:
    return [why for ok, why in conditions if not ok]


def _yaml_path(p: Path) -> str:
    return "'" + str(p).replace("'", "''") + "'"


# -- the items ---------------------------------------------------------------------------------

def task_dir(ctx: Context) -> Path:
    return ctx.path("sft", "task")


def sft_args(ctx: Context, v: Variant) -> List[str]:
    s = ctx.sizes
    model = [f"model.{k}={val}" for k, val in (
        ("preset", "null"), ("num_layers", s.layers), ("hidden_size", s.hidden), ("ffn_hidden_size", s.ffn),
        ("num_attention_heads", s.heads), ("num_query_groups", s.kv_heads),
        ("max_position_embeddings", s.max_positions))] + model_overrides("model", v)
    return ["sft", *model, f"task.num_sft={s.num_sft}", f"task.num_preference={s.num_preference}",
            f"task.num_prompts={s.num_prompts}", f"task.num_eval={s.num_eval}",
            # padded rows: packed (thd) rows are checked by item rm_packed
            f"train.max_steps={s.sft_steps}", f"train.global_batch_size={s.sft_batch}",
            f"train.micro_batch_size={s.sft_micro}", f"train.seq_length={s.seq}", "train.packing=false",
            f"train.lr={s.sft_lr}", f"train.min_lr={s.sft_lr / 10}", f"train.out_dir={ctx.path('sft')}",
            f"eval.num_prompts={s.eval_prompts}", f"eval.max_new_tokens={s.eval_new_tokens}",
            "log.progress_bar=false", "log.interval=10"]


def item_sft(ctx: Context, e: Dict[str, Any]) -> Dict[str, Any]:
    s, v, out = ctx.sizes, variant_of(e), ctx.path("sft")
    ctx.cli("sft", *sft_args(ctx, v))
    rows = read_jsonl(out / "metrics.jsonl")
    losses = [r["loss"] for r in sorted(step_rows(rows, "loss").values(), key=lambda r: r["step"])]
    em = [r["exact_match"] for r in rows if "exact_match" in r]
    model_meta = read_meta(out / "checkpoint")["model"]
    bad = failures([(len(losses) == s.sft_steps, f"{len(losses)} training steps logged, expected {s.sft_steps}"),
                    (all_finite(losses), "a loss is not finite"),
                    ((model_meta["transformer_impl"], model_meta["fp8"]) == (v.layers, v.fp8),
                     f"the checkpoint records {model_meta['transformer_impl']}/{model_meta['fp8']}")])
    return {"status": "fail" if bad else "pass", **({"problems": bad} if bad else {}), "kernels": v.describe(),
            "steps": len(losses), "losses": losses, "exact_match": em[-1] if em else None,
            "checkpoint": str(out / "checkpoint")}


def compare_exports(a: Path, b: Path) -> Dict[str, Any]:
    """Every tensor of two Hugging Face exports (safetensors), compared bit for bit."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> Dict[str, Any]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ta, tb = tensors(a), tensors(b)
    common = sorted(set(ta) & set(tb))
    differ = [k for k in common if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape
              or not torch.equal(ta[k], tb[k])]
    configs = [json.loads((f / "config.json").read_text()) for f in (a, b)]
    return {"tensors": len(set(ta) | set(tb)), "identical": len(common) - len(differ), "differ": differ,
            "only_first": sorted(set(ta) - set(tb)), "only_second": sorted(set(tb) - set(ta)),
            "config_json_equal": configs[0] == configs[1],
            "bytes": sum(t.numel() * t.element_size() for t in ta.values())}


def item_convert(ctx: Context, e: Dict[str, Any]) -> Dict[str, Any]:
    sft_ckpt, hf1, mg, hf2 = ctx.path("sft", "checkpoint"), ctx.path("convert", "hf"), ctx.path("convert", "mg"), \
        ctx.path("convert", "hf_again")
    to_hf, to_mg = str(TOOLS / "convert_megatron_to_hf.py"), str(TOOLS / "convert_hf_to_megatron.py")
    ctx.check(ctx.run("convert_export", [to_hf, "--ckpt", sft_ckpt, "--out", hf1]), "the export")
    # --transformer-impl records the layers in the checkpoint; a converter without it
    # refuses the flag before converting anything, and the import runs again without it.
    res = ctx.run("convert_import", [to_mg, "--hf-dir", hf1, "--out", mg, "--transformer-impl", e["layers"]])
    flag = not (res["rc"] == 2 and "unrecognized arguments: --transformer-impl" in log_tail(res["log"]))
    if not flag:
        res = ctx.run("convert_import_without_flag", [to_mg, "--hf-dir", hf1, "--out", mg])
    ctx.check(res, "the import")
    ctx.check(ctx.run("convert_export_again", [to_hf, "--ckpt", mg, "--out", hf2]), "the second export")
    cmp = compare_exports(hf1, hf2)
    recorded = read_meta(mg)["model"]["transformer_impl"]
    bad = failures([(not cmp["differ"] and not cmp["only_first"] and not cmp["only_second"],
                     f"the exports differ: {cmp['differ'][:5]} {cmp['only_first'][:5]} {cmp['only_second'][:5]}"),
                    (cmp["config_json_equal"], "the exports' config.json differ"),
                    (not flag or recorded == e["layers"],
                     f"--transformer-impl {e['layers']} was given but the checkpoint records {recorded}")])
    return {"status": "fail" if bad else "pass", **({"problems": bad} if bad else {}), "exports": cmp,
            "transformer_impl_flag": flag, "recorded_transformer_impl": recorded, "hf": str(hf1),
            "megatron": str(mg)}


def _logits_spec(ctx: Context, runs: List[Dict[str, Any]], compare: List[List[str]], hf: bool) -> Dict[str, Any]:
    meta = read_meta(ctx.path("sft", "checkpoint"))
    return {"worker": "logits", "ckpt": str(ctx.path("convert", "mg")),
            "hf": str(ctx.path("convert", "hf")) if hf else None, "tokenizer": meta["tokenizer"],
            "text": str(task_dir(ctx) / "sft.jsonl"), "batch": ctx.sizes.logits_batch, "seq": ctx.sizes.logits_seq,
            "runs": runs, "compare": compare}


def item_logits_local(ctx: Context, e: Dict[str, Any]) -> Dict[str, Any]:
    v = variant_of(e)
    out = ctx.worker("logits_local", _logits_spec(ctx, [{"name": "local", **dataclasses.asdict(v)}],
                                                  [["local", "hf"]], hf=True))
    verdict = logit_verdict(out["pairs"]["local~hf"], v)
    return {"status": verdict["status"], "kernels": v.describe(), "comparisons": {"local vs HF": verdict},
            "tokens": out["tokens"]}


def item_logits_te(ctx: Context, e: Dict[str, Any]) -> Dict[str, Any]:
    v = variant_of(e)
    bf16 = Variant("transformer_engine", None, v.dtype)
    runs = [{"name": "te", **dataclasses.asdict(bf16)}]
    hf = e["reference"] == "transformers"
    ref = "hf" if hf else "local"
    if not hf:
        runs.append({"name": "local", **dataclasses.asdict(Variant("local", None, v.dtype))})
    compare = [["te", ref]]
    if v.fp8:
        runs.append({"name": "te_fp8", **dataclasses.asdict(v)})
        compare.append(["te_fp8", ref])
    out = ctx.worker("logits_te", _logits_spec(ctx, runs, compare, hf=hf))
    label = "HF" if hf else "local layers"
    comparisons = {f"TE {'bf16' if v.dtype == 'bfloat16' else 'fp32'} vs {label}":
                   logit_verdict(out["pairs"][f"te~{ref}"], bf16)}
    notes = [e["fallback"]] if e.get("fallback") else []
    if v.fp8:
        comparisons[f"TE FP8 vs {label}"] = logit_verdict(out["pairs"][f"te_fp8~{ref}"], v)
    status = "pass" if all(c["status"] == "pass" for c in comparisons.values()) else "fail"
    return {"status": status, "kernels": v.describe(), "comparisons": comparisons, "notes": notes,
            "tokens": out["tokens"]}


def _pair_args(ctx: Context, v: Variant, out: Path) -> List[str]:
    s = ctx.sizes
    return [*model_overrides("model", v), f"data.sources=[{{path: {_yaml_path(task_dir(ctx) / 'preference.jsonl')}}}]",
            f"data.max_length={s.seq}", "data.max_prompt_length=96",
            f"train.init_from={ctx.path('sft', 'checkpoint')}", f"train.out_dir={out}",
            f"train.max_steps={s.pair_steps}", f"train.global_batch_size={s.pair_batch}",
            f"train.micro_batch_size={s.pair_micro}", f"train.seq_length={s.seq}",
            "log.progress_bar=false", "log.interval=5"]


def _pair_result(ctx: Context, e: Dict[str, Any], out: Path, steps: int) -> Dict[str, Any]:
    rows = read_jsonl(out / "metrics.jsonl")
    losses = [r["loss"] for r in sorted(step_rows(rows, "loss").values(), key=lambda r: r["step"])]
    bad = failures([(len(losses) == steps, f"{len(losses)} training steps logged, expected {steps}"),
                    (all_finite(losses), "a loss is not finite"),
                    ((out / "final" / "megarlhf.json").is_file(), f"{out / 'final'} was not saved")])
    res = {"status": "fail" if bad else "pass", **({"problems": bad} if bad else {}), "steps": len(losses),
           "losses": losses, "kernels": variant_of(e).describe(), "final": str(out / "final")}
    for r in rows:
        if "eval_accuracy" in r:
            res["eval_accuracy"] = r["eval_accuracy"]
        if "exact_match" in r:
            res["exact_match"] = r["exact_match"]
    return res


def rm_args(ctx: Context, v: Variant) -> List[str]:
    return ["rm", *_pair_args(ctx, v, ctx.path("rm")), f"data.eval_size={ctx.sizes.rm_eval_pairs}"]


def dpo_args(ctx: Context, v: Variant) -> List[str]:
    s = ctx.sizes
    return ["dpo", *_pair_args(ctx, v, ctx.path("dpo")), "dpo.reference=precomputed",
            f"eval.prompts={task_dir(ctx) / 'eval.jsonl'}", f"eval.num_prompts={s.eval_prompts}",
            f"eval.max_new_tokens={s.eval_new_tokens}"]


def item_rm(ctx: Context, e: Dict[str, Any]) -> Dict[str, Any]:
    ctx.cli("rm", *rm_args(ctx, variant_of(e)))
    return _pair_result(ctx, e, ctx.path("rm"), ctx.sizes.pair_steps)


def item_rm_packed(ctx: Context, e: Dict[str, Any]) -> Dict[str, Any]:
    """The reward model again with ``train.packing=true`` (megatron's ``thd`` layout: Transformer
    Engine's packed attention where TE runs), every training metric of every step against the
    padded run of item ``rm``."""
    v, out = variant_of(e), ctx.path("rm_packed")
    args = rm_args(ctx, v)
    args[args.index(f"train.out_dir={ctx.path('rm')}")] = f"train.out_dir={out}"
    ctx.cli("rm_packed", *args, "train.packing=true")
    res = _pair_result(ctx, e, out, ctx.sizes.pair_steps)
    if res["status"] != "pass":
        return res
    keep = lambda rows: {s: {k: r[k] for k in ("step", *PACKED_METRICS) if k in r}  # noqa: E731
                         for s, r in step_rows(rows, "loss").items()}
    padded, packed = keep(read_jsonl(ctx.path("rm") / "metrics.jsonl")), keep(read_jsonl(out / "metrics.jsonl"))
    cmp = compare_steps(padded, packed, sorted(padded), PACKED_TOLERANCE["fp8" if v.fp8 else v.dtype])
    return {**res, "status": cmp["status"], "vs_padded": cmp}


def item_dpo(ctx: Context, e: Dict[str, Any]) -> Dict[str, Any]:
    ctx.cli("dpo", *dpo_args(ctx, variant_of(e)))
    return _pair_result(ctx, e, ctx.path("dpo"), ctx.sizes.pair_steps)


def ppo_args(ctx: Context, v: Variant, out: Path, world: int, steps: int) -> List[str]:
    s = ctx.sizes
    roles = [a for role in ("actor", "reference", "critic", "reward") for a in model_overrides(f"{role}.model", v)]
    return ["ppo", f"world={world}", *roles, f"actor.init_from={ctx.path('sft', 'checkpoint')}",
            f"critic.init_from={ctx.path('rm', 'final')}", f"reward.init_from={ctx.path('rm', 'final')}",
            f"data.sources=[{{path: {_yaml_path(task_dir(ctx) / 'prompts.jsonl')}}}]",
            "data.max_prompt_length=96", "data.max_length=96",
            f"rollout.prompts_per_step={s.ppo_prompts}", f"rollout.max_new_tokens={s.ppo_new_tokens}",
            f"rollout.max_batch={s.ppo_prompts}", "rollout.temperature=1.0",
            f"ppo.minibatch_size={s.ppo_minibatch}", "ppo.ppo_epochs=1",
            f"train.micro_batch_size={s.ppo_micro}", f"train.max_steps={steps}",
            f"train.actor_lr={s.ppo_lr}", f"train.critic_lr={s.ppo_lr}",
            # no warmup: the actor learns from step 1, so that the KL of steps 2-5 is not 0
            "train.schedule.style=constant", "train.schedule.warmup_ratio=0.0", "train.schedule.warmup_steps=0",
            f"train.out_dir={out}", "eval.prompts=null", "log.progress_bar=false", "log.interval=1"]


# Deterministic kernels where the libraries offer a switch (cuBLAS workspaces, TE's fused
# attention), so that a GPU resume can be compared closely.
_DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}


def item_ppo_resume(ctx: Context, e: Dict[str, Any]) -> Dict[str, Any]:
    v, world = variant_of(e), e["processes"]
    full, resumed = ctx.path("ppo", "full"), ctx.path("ppo", "resumed")
    ctx.cli("ppo_full", *ppo_args(ctx, v, full, world, PPO_STEPS), f"train.save_interval={PPO_SAVE_AT}",
            "train.keep_checkpoints=3", processes=world, extra_env=_DETERMINISTIC)
    saved = full / "checkpoints" / f"step_{PPO_SAVE_AT:07d}"
    if not (saved / "megarlhf.json").is_file():
        raise ItemFailed(f"the 5-step run saved no checkpoint at step {PPO_SAVE_AT} ({saved})")
    res = ctx.cli("ppo_resumed", *ppo_args(ctx, v, resumed, world, PPO_STEPS), f"train.resume={saved}",
                  processes=world, extra_env=_DETERMINISTIC)
    a, b = step_rows(read_jsonl(full / "metrics.jsonl"), "score_mean"), \
        step_rows(read_jsonl(resumed / "metrics.jsonl"), "score_mean")
    cmp = compare_steps(a, b, steps=list(range(PPO_SAVE_AT + 1, PPO_STEPS + 1)),
                        tolerance=RESUME_TOLERANCE["cpu" if ctx.cpu else "gpu"])
    said = f"resumed from {saved}" in log_tail(res["log"], 10 ** 6)
    bad = failures([(cmp["status"] == "pass", "steps 4-5 of the resumed run differ from the uninterrupted run's"),
                    (sorted(b) == list(range(PPO_SAVE_AT + 1, PPO_STEPS + 1)),
                     f"the resumed run logged steps {sorted(b)}"), (said, "the resumed run did not say it resumed")])
    return {"status": "fail" if bad else "pass", **({"problems": bad} if bad else {}), "kernels": v.describe(),
            "processes": world, "optimizer": e["optimizer"], "resume": cmp, "checkpoint": str(saved),
            "scores": [a[k]["score_mean"] for k in sorted(a)]}


def item_generate(ctx: Context, e: Dict[str, Any]) -> Dict[str, Any]:
    s = ctx.sizes
    out = ctx.worker("generate", {"worker": "generate", "ckpt": str(ctx.path("sft", "checkpoint")),
                                  "prompts": str(task_dir(ctx) / "prompts.jsonl"), "batch": s.gen_batch,
                                  "new_tokens": s.gen_new_tokens, "repeats": 3})
    bad = failures([(out["generated"] == out["batch"] * out["new_tokens"] and out["tokens_per_s"] > 0,
                     f"{out['generated']} tokens generated, expected {out['batch']} x {out['new_tokens']}"),
                    (out["graphs"]["same_tokens"], "the decode step as CUDA graphs sampled other tokens"),
                    (out["graphs"]["captured"] >= 1, "no decode step was captured")])
    return {"status": "fail" if bad else "pass", "kernels": variant_of(e).describe(), **out,
            **({"problems": bad} if bad else {})}


def item_ppo_partitioned(ctx: Context, e: Dict[str, Any]) -> Dict[str, Any]:
    v, world, steps = variant_of(e), e["processes"], ctx.sizes.partitioned_steps
    out = ctx.path("ppo", "partitioned")
    ctx.cli("ppo_partitioned", *ppo_args(ctx, v, out, world, steps), "placement=partitioned",
            f"reward_ranks={e['reward_ranks']}", processes=world)
    rows = step_rows(read_jsonl(out / "metrics.jsonl"), "score_mean")
    values = [x for r in rows.values() for k, x in r.items() if k in ("score_mean", "kl", "policy_loss", "value_loss")]
    bad = failures([(sorted(rows) == list(range(1, steps + 1)), f"steps {sorted(rows)} logged, expected 1-{steps}"),
                    (all_finite(values), "a score or loss is not finite"),
                    ((out / "final" / "megarlhf.json").is_file(), "the final actor was not saved")])
    res = {"status": "fail" if bad else "pass", **({"problems": bad} if bad else {}), "kernels": v.describe(),
           "processes": world, "reward_ranks": e["reward_ranks"], "steps": len(rows),
           "scores": [rows[k]["score_mean"] for k in sorted(rows)]}
    full = ctx.path("ppo", "full", "metrics.jsonl")
    if full.is_file():  # the same steps colocated (another data-parallel split: close, not equal)
        cmp = compare_steps(step_rows(read_jsonl(full), "score_mean"), rows, steps=sorted(rows)[:1], tolerance=math.inf)
        res["vs_colocated_max_abs"] = cmp.get("max_abs_difference")
    return res


RUNNERS: Dict[str, Callable[[Context, Dict[str, Any]], Dict[str, Any]]] = {
    "sft": item_sft, "convert": item_convert, "logits_local": item_logits_local, "logits_te": item_logits_te,
    "rm": item_rm, "rm_packed": item_rm_packed, "dpo": item_dpo, "ppo_resume": item_ppo_resume,
    "generate": item_generate,
    "ppo_partitioned": item_ppo_partitioned}


def run_items(ctx: Context) -> None:
    """Run every planned item in order, in place; print a row as each ends."""
    for name in ITEMS:
        e = ctx.entries[name]
        if e["status"] == "planned":
            blocked = [n for n in NEEDS.get(name, ()) if ctx.entries[n]["status"] != "pass"]
            if blocked:
                e.update(not_run(f"needs {', '.join(blocked)}, which did not pass"))
        if e["status"] == "planned":
            print(f"gpu_rehearsal: {TITLES[name]} ...", flush=True)
            t0 = time.perf_counter()
            ctx.commands = []
            try:
                e.update(RUNNERS[name](ctx, e))
            except ItemFailed as err:
                e.update(status="fail", error=str(err), **({"log_tail": err.log} if err.log else {}))
            except Exception as err:
                e.update(status="fail", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
            e["seconds"] = round(time.perf_counter() - t0, 1)
            e["commands"] = ctx.commands
        print(f"gpu_rehearsal: | {TITLES[name]} | {e['status']} | {e.get('seconds', '')} | {result_line(name, e)} |",
              flush=True)


# --------------------------------------------------------------------------------------
# Workers (run as `gpu_rehearsal.py --worker NAME`, one model per process)
# --------------------------------------------------------------------------------------


def logit_metrics(a, b) -> Dict[str, float]:
    """``a`` against the reference ``b`` (``[batch, seq, vocab]``): relative L2 distance,
    largest absolute difference, share of positions with the same top token."""
    a, b = a.double(), b.double()
    d = a - b
    return {"rel_l2": float(d.norm() / b.norm()), "max_abs": float(d.abs().max()),
            "reference_max_abs": float(b.abs().max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).double().mean())}


def _hf_logits(folder: str, tokens):
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = LlamaForCausalLM.from_pretrained(folder, **{key: torch.float32}).to(tokens.device).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def logits_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Logits of the checkpoint for each run (layers, FP8, dtype) and of the Hugging Face
    export, on the same tokens of task text; metrics for each asked pair."""
    import gc

    import torch

    from megarlhf import platform
    from megarlhf.config import ParallelConfig, RuntimeConfig
    from megarlhf.data.tokenizer import load_tokenizer
    from megarlhf.models.checkpoint import load_model, read_meta as read_ckpt_meta
    from megarlhf.models.llama import build_model
    from megarlhf.parallel import destroy, init_distributed, initialize_model_parallel

    meta = read_ckpt_meta(spec["ckpt"])
    b, s, vocab = spec["batch"], spec["seq"], meta.model.vocab_size
    ids = load_tokenizer(spec["tokenizer"]).encode(Path(spec["text"]).read_text()[:100_000])
    ids = (ids * (-(-b * s // len(ids))))[:b * s]
    device = torch.device("cuda", 0) if platform.has_gpu() else torch.device("cpu")
    tokens = torch.tensor(ids, dtype=torch.long, device=device).view(b, s)
    logits = {}
    if spec.get("hf"):
        # Before megarlhf's CPU layer is installed (platform.current()): with it, torch's
        # device context managers miss the wrapped tensor factories, and transformers then
        # leaves its RoPE buffers uninitialised (see the rehearsal's report).
        logits["hf"] = _hf_logits(spec["hf"], tokens)[..., :vocab].cpu()
        gc.collect()
    init_distributed()
    plat = platform.current()
    mp = initialize_model_parallel(ParallelConfig(), seed=SEED)
    positions = torch.arange(s, device=plat.device).expand(b, s)
    for run in spec["runs"]:
        cfg = RuntimeConfig(params_dtype=run["dtype"], transformer_impl=run["layers"],
                            fp8=run["fp8"] or "none").apply(meta.model)
        chunks = build_model(cfg, mp)
        load_model(chunks, spec["ckpt"])
        model = chunks[0].eval()
        with torch.no_grad():
            # FP8 delayed scaling measures amaxes on the first passes; compare a later one
            for _ in range(3 if run["fp8"] else 1):
                out = model(tokens, positions, attention_mask=None)
        logits[run["name"]] = out.float()[..., :vocab].cpu()
        del chunks, model, out
        gc.collect()
        if plat.is_gpu:
            torch.cuda.empty_cache()
    destroy()
    return {"tokens": [b, s], "vocab": vocab,
            "pairs": {f"{x}~{y}": logit_metrics(logits[x], logits[y]) for x, y in spec["compare"]}}


def generate_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Tokens/s of the rollout engine on the checkpoint as trained: ``batch`` task prompts,
    ``new_tokens`` sampled tokens each (no stop token), median of ``repeats`` runs after a
    short warm-up."""
    import torch  # noqa: F401  (before megarlhf: the platform module patches it on CPU)

    from megarlhf import platform
    from megarlhf.config import ParallelConfig
    from megarlhf.data.schemas import parse_prompt_row
    from megarlhf.models.checkpoint import load_model, read_meta as read_ckpt_meta
    from megarlhf.models.llama import build_model
    from megarlhf.parallel import destroy, init_distributed, initialize_model_parallel
    from megarlhf.recipes.pairs_common import tokenizer_of
    from megarlhf.rollout.engine import MegatronEngine, SamplingParams

    init_distributed()
    plat = platform.current()
    mp = initialize_model_parallel(ParallelConfig(), seed=SEED)
    meta = read_ckpt_meta(spec["ckpt"])
    chunks = build_model(meta.model, mp)
    load_model(chunks, spec["ckpt"])
    tok, template = tokenizer_of(meta, spec["ckpt"])
    rows = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines()[:spec["batch"]]]
    prompts = [template.encode_prompt(parse_prompt_row(r)["prompt"]) for r in rows]
    new = min(spec["new_tokens"], meta.model.max_position_embeddings - max(map(len, prompts)))
    vocab = min(meta.model.vocab_size, tok.vocab_size)
    params = SamplingParams(max_new_tokens=new, temperature=1.0, seed=1)

    def timed(engine):
        engine.generate(prompts, dataclasses.replace(params, max_new_tokens=min(8, new)))  # warm-up
        seconds = []
        for _ in range(spec["repeats"]):
            plat.synchronize()
            t0 = time.perf_counter()
            out = engine.generate(prompts, params)
            plat.synchronize()
            seconds.append(time.perf_counter() - t0)
        return out, seconds

    out, seconds = timed(MegatronEngine(chunks, mp, vocab, max_batch=len(prompts)))
    generated = sum(len(r) for r in out.response_ids)
    # The decode step as CUDA graphs (on CPU their stand-in, which replays the same
    # fixed-shape step): the same tokens as the eager engine, same seed.
    if plat.is_gpu:
        graphed = MegatronEngine(chunks, mp, vocab, max_batch=len(prompts), cuda_graphs=True)
    else:
        from megarlhf.rollout.graphs import Replay

        graphed = MegatronEngine(chunks, mp, vocab, max_batch=len(prompts), graph_backend=Replay())
    g_out, g_seconds = timed(graphed)
    destroy()
    return {"batch": len(prompts), "new_tokens": new, "prompt_tokens": statistics.mean(map(len, prompts)),
            "generated": generated, "run_seconds": [round(x, 4) for x in seconds],
            "tokens_per_s": round(generated / statistics.median(seconds), 1),
            "graphs": {"real": plat.is_gpu, "same_tokens": g_out.response_ids == out.response_ids,
                       "captured": graphed.last_stats.get("graphs", 0),
                       "tokens_per_s": round(generated / statistics.median(g_seconds), 1)},
            "layers": meta.model.transformer_impl, "fp8": meta.model.fp8}


WORKERS = {"logits": logits_worker, "generate": generate_worker}


# --------------------------------------------------------------------------------------
# The rehearsal
# --------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="rehearsal.json", help="JSON report path (default: rehearsal.json)")
    ap.add_argument("--cpu", action="store_true",
                    help="the same sequence on CPU at a tiny shape (local layers, fp32, gloo; what the tests run)")
    ap.add_argument("--work", default=None,
                    help="where the runs go (default: a new folder beside the report, removed when all passed)")
    ap.add_argument("--keep", action="store_true", help="keep the runs' folder even when everything passed")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    ap.add_argument("--make-bundle", nargs="?", const=str(gpu_check.DEFAULT_BUNDLE), metavar="DIR",
                    help="copy the pure-Python packages the rehearsal needs besides torch into DIR (default "
                         f"{gpu_check.DEFAULT_BUNDLE.relative_to(REPO)}; a superset of gpu_check's) and exit")
    ap.add_argument("--bundle", default=str(gpu_check.DEFAULT_BUNDLE),
                    help="bundle to use where packages are missing")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:  # a child of the rehearsal: its path already holds the bundle
        result = WORKERS[args.worker](json.loads(Path(args.spec).read_text()))
        Path(args.result).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    if args.make_bundle:
        return gpu_check.bundle_command(Path(args.make_bundle), BUNDLE)

    t_start = time.perf_counter()
    if args.cpu:  # the CPU code path, also on a machine that has a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    before = list(sys.path)
    sources = gpu_check.use_bundle(Path(args.bundle), BUNDLE)
    # The report states which optional kernel packages are missing; no need to warn.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed.*")
    bundle_paths = [p for p in sys.path if p not in before]
    problems = import_problems()
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {"tool": "gpu_rehearsal", "mode": "cpu" if args.cpu else "gpu",
                              "setup_error": "; ".join(problems) or None}
    if problems:
        report.update(items={name: not_run("the rehearsal could not start (see setup_error)") for name in ITEMS},
                      environment={"packages": sources}, exit_code=2,
                      seconds=round(time.perf_counter() - t_start, 1))
        return finish(report, out)

    # torch only now: the bundle may be what provides what it needs.
    import torch

    hw, notes = gpu_check.inspect_machine()
    visible = torch.cuda.device_count() if hw.gpu else 0
    gpus = min(args.gpus, visible) if args.gpus else visible
    sizes = CPU_SIZES if args.cpu else GPU_SIZES
    entries = plan(hw, gpus, args.cpu, importlib.util.find_spec("transformers") is not None)
    if hw.gpu is None and not args.cpu:
        report["mode"] = "no-gpu"
    report.update(environment=gpu_check.environment(hw, sources, notes), gpus=gpus,
                  sizes=dataclasses.asdict(sizes), estimate=estimate(sizes, entries, gpu=not args.cpu),
                  items=entries)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu_rehearsal-", dir=out.parent))
    work.mkdir(parents=True, exist_ok=True)
    hidden = hide_modules([n for n in ("transformer_engine", "apex") if n in notes], work / "hidden")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(child_pythonpath(bundle_paths, hidden)),
               PYTHONUNBUFFERED="1", HF_HOME=str(work / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        env.pop(key, None)  # the children are jobs of their own, not ranks of a job around this one
    if hw.gpu and gpus < visible:
        ids = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(visible)))).split(",")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:gpus])
    if args.cpu:  # the children fork from a server this process starts: it sees what they would
        os.environ.clear()
        os.environ.update(env)
        if hidden:
            sys.path.insert(0, str(hidden))
    ctx = Context(cpu=args.cpu, sizes=sizes, entries=entries, work=work, env=env,
                  python=[sys.executable] + (["-S"] if sys.flags.no_site else []), cpus=os.cpu_count() or 1)
    print(f"gpu_rehearsal ({report['mode']}): {hw.gpu or 'CPU'}, {gpus} GPU(s), Transformer Engine: "
          f"{hw.transformer_engine}; runs in {work}", flush=True)
    print(f"gpu_rehearsal: estimate {report['estimate']['estimated_seconds']} s "
          f"({report['estimate']['process_starts']} process starts)", flush=True)
    run_items(ctx)
    report["exit_code"] = overall_status(entries)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    if report["exit_code"] == 0 and not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
        report["work_dir"] = None
    else:
        report["work_dir"] = str(work)
    return finish(report, out)


def finish(report: Dict[str, Any], out: Path) -> int:
    report["exit_code"] = report.get("exit_code", 0)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if report.get("setup_error"):
        print(f"setup error: {report['setup_error']}")
    print()
    print(table(report["items"]))
    print(f"total {report.get('seconds', 0):.0f} s" + (f"; runs kept in {report['work_dir']}"
                                                       if report.get("work_dir") else ""))
    print(out)
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
