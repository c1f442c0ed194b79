#!/usr/bin/env python3
"""Scaling benchmark: throughput, MFU, memory and scaling efficiency over parallel layouts.

    # a laptop / one CPU node: the tiny preset, gloo, one thread per process
    python tools/benchmark_scaling.py --preset tiny --phase sft \
        --layouts tp1pp1dp1,tp1pp1dp2,tp2pp1dp1,tp1pp2dp1 --out runs/scaling
    # inside a SLURM allocation (slurm/scaling_bench.sh): each layout is an srun step
    python tools/benchmark_scaling.py --launcher srun --preset llama2-7b --dtype bfloat16 \
        --phase sft --layouts tp8pp1dp1,tp8pp1dp2 --seq-len 4096 --micro-batch 1 --out runs/scaling

For every layout x micro-batch x recomputation x scaling kind, the driver starts the
layout's TP x PP x DP processes (torchrun, or srun inside an allocation); they build the
real megatron model and optimizer at that layout and time warm-up + ``--steps`` steps of
the phase's real step on synthetic tokens of fixed length (no padding, so token counts are
exact):

  sft       the SFT recipe's forward step (``recipes.common.lm_forward_step``), every token trained
  rm        the reward-model recipe's forward step (pairs: chosen and rejected rows)
  dpo       the DPO recipe's forward step, reference log-probs precomputed (as the recipe's
            default; that pass is not timed)
  generate  the rollout engine (``MegatronEngine``): ``--prompt-len`` prompt tokens,
            exactly ``--new-tokens`` sampled (no stop token); generated tokens are counted
  ppo       the PPO recipe itself (``recipes.ppo.run``) on the built-in task's prompts with
            random-weight policy and reward models of the preset's shape, every role at the
            layout, colocated; tokens and times are the recipe's own (non-pad tokens)

Rank 0 prints one JSON line per run; the driver writes ``OUT/scaling.json`` (every row,
the GEMM probe, the environment), ``OUT/scaling.csv`` and PNG plots (``throughput.png``,
``mfu.png``, ``efficiency.png``, ``memory.png``). Runs a layout cannot do are rows with
``status: "not run"`` and the reason; runs that fail are ``status: "failed"``.

MFU is model FLOP/s per device (FLOPs from the architecture, megarlhf/perf/flops.py) over
a peak: a square GEMM probe measured in the same command, in the run's dtype, with the
threads each rank uses on CPU (``--probe-n``; the best of a probe before and one after the
sweep), or ``--peak-tflops``. Every row states it in ``mfu_basis``.

On one CPU machine (torchrun) the probe is also run on as many processes at once as the
sweep's largest run uses (``probe_shared`` in the JSON, with its ratio to the probe run
alone): cores share caches, memory bandwidth and a power budget, and on a shared host
other tenants. A ratio near 1 says the cores multiply as fast together as alone, so a
weak-scaling loss of compute-bound steps lies elsewhere: in communication, or in ranks
waiting for each other (``extra.grad_sync_s`` / ``grad_sync_s_max`` of a training row:
the seconds per step a rank spends in the end-of-step gradient reduction, mean and
maximum over ranks, which includes waiting there for the slowest rank); well below 1, the
machine itself caps the efficiency.

On CPU each row also gives ``cpu_busy``: the share of the timed wall time the ranks spent
running (process CPU time / threads / wall time, the mean over ranks). Near 1 the ranks
had their cores to themselves; well below 1 they waited, for each other (communication,
pipeline bubbles) or for a core another job held: read scaling figures with it. Each
run's spec, log and per-rank results are kept in ``OUT/runs/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform as pyplatform
import shutil
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megarlhf.perf import scaling as S  # noqa: E402  (pure: imports no megatron)

# -- command line ---------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Sweep parallel layouts of one model and phase; write JSON, CSV and plots "
                    "of tokens/s, TFLOP/s and MFU per device, peak memory and scaling efficiency.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("what to run")
    g.add_argument("--preset", default="tiny", help="model shape preset (megarlhf/config/model.py)")
    g.add_argument("--phase", default="sft", choices=S.PHASES)
    g.add_argument("--layouts", default="tp1pp1dp1,tp1pp1dp2",
                   help="comma-separated tpNppNdpN (a missing part is 1)")
    g.add_argument("--micro-batch", default="4", help="rows per microbatch; comma-separated to sweep")
    g.add_argument("--recompute", default="none",
                   help=f"activation recomputation, comma-separated from {', '.join(S.RECOMPUTE)}")
    g.add_argument("--scaling", default="weak", choices=("weak", "strong", "both"),
                   help="weak: fixed rows per DP replica; strong: fixed global batch")
    g.add_argument("--batch-per-replica", type=int, default=8, help="rows per DP replica (weak scaling)")
    g.add_argument("--global-batch", type=int, default=None,
                   help="rows per step over all replicas (strong scaling; default: "
                        "--batch-per-replica x the largest DP swept)")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per row (training phases)")
    g.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (generate)")
    g.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per row (generate, ppo)")
    g.add_argument("--steps", type=int, default=5, help="timed steps per run")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    g.add_argument("--repeats", type=int, default=1,
                   help="runs of each configuration, interleaved in rounds (medians reported)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    g.add_argument("--attention-backend", default="unfused", choices=("unfused", "sdpa"),
                   help="core attention of the local layers (model.attention_backend)")
    g.add_argument("--distributed-optimizer", action="store_true",
                   help="shard optimizer states over DP (megatron's distributed optimizer)")
    g.add_argument("--seed", type=int, default=1234)
    m = ap.add_argument_group("model shape overrides (default: the preset's)")
    for flag, field in (("--layers", "num_layers"), ("--hidden", "hidden_size"),
                        ("--ffn", "ffn_hidden_size"), ("--heads", "num_attention_heads"),
                        ("--kv-heads", "num_query_groups"), ("--vocab", "vocab_size")):
        m.add_argument(flag, type=int, default=None, dest=field)
    p = ap.add_argument_group("peak FLOP/s for MFU")
    p.add_argument("--probe-n", type=int, default=2048, help="square GEMM probe size")
    p.add_argument("--probe-dtype", default=None, choices=("float32", "bfloat16"),
                   help="probe dtype (default: --dtype)")
    p.add_argument("--probe-seconds", type=float, default=2.0)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s per device to use instead of the probe (e.g. a datasheet's dense bf16)")
    r = ap.add_argument_group("launching")
    r.add_argument("--launcher", default="auto", choices=("auto", "torchrun", "srun"),
                   help="auto: srun inside a SLURM allocation, else torchrun")
    r.add_argument("--threads", type=int, default=1, help="CPU threads per rank (OMP_NUM_THREADS)")
    r.add_argument("--tasks-per-node", type=int, default=None,
                   help="srun: ranks per node (default: SLURM_NTASKS_PER_NODE, else 8)")
    r.add_argument("--timeout", type=int, default=3600, help="seconds per run before it is failed")
    r.add_argument("--out", default="runs/scaling", help="output folder")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-shared", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        ap.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def model_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """Preset field overrides: shape flags, dtype, and positions for the longest row."""
    from megarlhf.config.model import PRESETS

    over = {f: getattr(args, f) for f in ("num_layers", "hidden_size", "ffn_hidden_size",
                                           "num_attention_heads", "num_query_groups", "vocab_size")
            if getattr(args, f) is not None}
    # PPO's prompts (the built-in task's) are kept to 128 tokens.
    longest = max(args.seq_len, args.prompt_len + args.new_tokens,
                  128 + args.new_tokens if args.phase == "ppo" else 0)
    over["max_position_embeddings"] = max(PRESETS[args.preset].get("max_position_embeddings", 512), longest)
    over["params_dtype"] = args.dtype
    over["attention_backend"] = args.attention_backend
    return over


# -- the driver ------------------------------------------------------------------------------


def plan_runs(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """One spec per scaling kind x recompute x micro-batch x layout; specs that cannot run
    carry ``status: "not run"`` and the reason (checked before any process starts)."""
    import itertools

    from megarlhf.config import ConfigError, ParallelConfig, check_layout, preset

    layouts = S.parse_layouts(args.layouts)
    scalings = ["weak", "strong"] if args.scaling == "both" else [args.scaling]
    recomputes = S.parse_list(args.recompute, str, S.RECOMPUTE, "recompute")
    mbs_list = S.parse_list(args.micro_batch, int, what="micro-batch")
    global_batch = args.global_batch or args.batch_per_replica * max(l.dp for l in layouts)
    over = model_overrides(args)
    phase = args.phase
    runs = []
    for scaling, rc, mbs, lay in itertools.product(scalings, recomputes, mbs_list, layouts):
        spec: Dict[str, Any] = dict(
            phase=phase, scaling=scaling, layout=lay.name, tp=lay.tp, pp=lay.pp, dp=lay.dp,
            devices=lay.devices, micro_batch=mbs, recompute=rc, dtype=args.dtype,
            seq_len=args.seq_len if phase in S.TRAIN_PHASES else None,
            prompt_len=args.prompt_len if phase == "generate" else None,
            new_tokens=args.new_tokens if phase in ("generate", "ppo") else None,
            steps=args.steps, warmup=args.warmup, threads=args.threads, seed=args.seed,
            preset=args.preset, overrides=over, distributed_optimizer=args.distributed_optimizer,
            batch_per_replica=None, global_batch=None, num_microbatches=None, status="planned", reason=None)
        try:
            plan = S.batch_plan(phase, scaling, lay, mbs, args.batch_per_replica, global_batch)
            spec.update(batch_per_replica=plan.per_replica, global_batch=plan.global_batch,
                        num_microbatches=plan.num_microbatches)
            cfg = preset(args.preset, **over, recompute_granularity=S.recompute_granularity(rc))
            check_layout(cfg, ParallelConfig(tensor_model_parallel_size=lay.tp,
                                             pipeline_model_parallel_size=lay.pp), lay.devices)
            if phase == "generate" and rc != "none":
                raise ValueError("recomputation applies to training steps only")
        except ConfigError as e:
            spec.update(status="not run", reason="; ".join(e.problems))
        except ValueError as e:
            spec.update(status="not run", reason=str(e))
        runs.append(spec)
    return runs


def resolve_launcher(args: argparse.Namespace) -> str:
    if args.launcher != "auto":
        return args.launcher
    return "srun" if os.environ.get("SLURM_JOB_ID") and shutil.which("srun") else "torchrun"


def _child_env(args: argparse.Namespace) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _srun_prefix(args: argparse.Namespace, world: int) -> List[str]:
    """srun for ``world`` tasks from node 0 of the allocation (rank 0 on the job's first
    node, which is where megarlhf/parallel.py puts the master)."""
    per_node = args.tasks_per_node or int(os.environ.get("SLURM_NTASKS_PER_NODE", "8").split("(")[0])
    nodes = math.ceil(world / per_node)
    cmd = ["srun", "--kill-on-bad-exit=1", "--relative=0", f"--nodes={nodes}", f"--ntasks={world}",
           f"--ntasks-per-node={min(world, per_node)}"]
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        cmd.append(f"--cpus-per-task={os.environ['SLURM_CPUS_PER_TASK']}")
    return cmd


def launch(args: argparse.Namespace, launcher: str, world: int, mode: str, spec_path: str,
           index: int, log_path: str) -> int:
    """Start this file in ``mode`` (``--worker`` / ``--probe``) on ``world`` processes;
    output goes to ``log_path``. ``index`` numbers the launches of the sweep (srun steps
    get distinct ports from it). Returns the exit status (124 on timeout)."""
    me = os.path.abspath(__file__)
    env = _child_env(args)
    if launcher == "srun":
        # Each step gets its own port: the previous step's may linger in TIME_WAIT.
        env["MASTER_PORT"] = str(10000 + (int(os.environ.get("SLURM_JOB_ID", "0")) + index) % 20000)
        cmd = _srun_prefix(args, world) + [sys.executable, me, mode, spec_path]
    elif mode == "--probe":
        cmd = [sys.executable, me, mode, spec_path]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}", me, mode, spec_path]
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        try:
            return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            return 124


def _tail(path: str, lines: int = 12) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:]).strip()
    except OSError:
        return ""


def _probe_spec(args: argparse.Namespace, work: str, tag: str) -> Dict[str, Any]:
    return {"n": args.probe_n, "dtype": args.probe_dtype or args.dtype, "seconds": args.probe_seconds,
            "threads": args.threads, "result": os.path.join(work, f"probe_{tag}.json")}


def _launch_probe(args: argparse.Namespace, launcher: str, work: str, tag: str, world: int,
                  mode: str) -> Dict[str, Any]:
    """Run a probe in ``world`` processes of their own (``mode``: ``--probe`` or
    ``--probe-shared``) and return what it wrote."""
    spec = _probe_spec(args, work, tag)
    path = os.path.join(work, f"probe_{tag}.spec.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    log = os.path.join(work, f"probe_{tag}.log")
    rc = launch(args, launcher, world, mode, path, 0, log)
    if rc != 0 or not os.path.isfile(spec["result"]):
        raise RuntimeError(f"the GEMM probe ({tag}) failed ({rc}):\n{_tail(log)}")
    with open(spec["result"]) as f:
        return json.load(f)


def run_probe(args: argparse.Namespace, launcher: str, work: str, tag: str) -> Dict[str, Any]:
    """The GEMM probe with the ranks' thread count, on the ranks' kind of device: in this
    process on a CPU machine under torchrun, else in a process of its own (a one-task srun
    step under srun), so that the driver never holds GPU memory."""
    import torch

    if launcher == "torchrun" and not torch.cuda.is_available():
        return _probe(_probe_spec(args, work, tag))
    return _launch_probe(args, launcher, work, tag, 1, "--probe")


def shares_cores(launcher: str, devices: int) -> bool:
    """Whether the sweep's ranks share one CPU machine's cores (torchrun, no GPU), so that
    the shared probe means something. GPUs and srun steps over nodes do not share compute
    units this way."""
    import torch

    return launcher == "torchrun" and not torch.cuda.is_available() and devices > 1


def run_probe_shared(args: argparse.Namespace, launcher: str, work: str, devices: int,
                     solo: Dict[str, Any]) -> Dict[str, Any]:
    """The GEMM probe on ``devices`` processes of this machine at once. Returns the
    per-device FLOP/s and their mean over ``solo`` (the probe run alone)."""
    res = _launch_probe(args, launcher, work, "shared", devices, "--probe-shared")
    per = res["flops_per_s_per_device"]
    res["ratio_to_solo"] = sum(per) / len(per) / solo["flops_per_s"]
    return res


def run_one(args: argparse.Namespace, launcher: str, spec: Dict[str, Any], work: str, index: int,
            rnd: int) -> Dict[str, Any]:
    """Launch one configuration; returns the rank-0 result merged with every rank's memory."""
    name = (f"{index:02d}_{spec['phase']}_{spec['scaling']}_{spec['layout']}_mb{spec['micro_batch']}_"
            f"{spec['recompute']}_r{rnd}")
    run_dir = os.path.join(work, name)
    os.makedirs(run_dir, exist_ok=True)
    spec = dict(spec, run_dir=run_dir)
    path = os.path.join(run_dir, "spec.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    log = os.path.join(run_dir, "log.txt")
    t0 = time.time()
    rc = launch(args, launcher, spec["devices"], "--worker", path, 1 + rnd * 1000 + index, log)
    result_path = os.path.join(run_dir, "result.json")
    if rc != 0 or not os.path.isfile(result_path):
        why = "timed out" if rc == 124 else f"exit status {rc}"
        return {"status": "failed", "reason": f"{why}; log {log}: ...{_tail(log, 6)[-600:]}"}
    with open(result_path) as f:
        res = json.load(f)
    mems = []
    for r in range(spec["devices"]):
        p = os.path.join(run_dir, f"rank{r}.json")
        if os.path.isfile(p):
            with open(p) as f:
                mems.append(json.load(f)["peak_memory_bytes"])
    res["peak_memory_mb"] = round(max(mems) / 2 ** 20, 1) if mems else None
    res["wall_s"] = round(time.time() - t0, 1)
    res["log"] = log
    return res


def summarise(spec: Dict[str, Any], results: List[Dict[str, Any]], peak: Optional[float],
              basis: str) -> Dict[str, Any]:
    """One output row from the repeats of one configuration."""
    row = {k: v for k, v in spec.items() if k not in ("overrides", "run_dir")}
    ok = [r for r in results if r.get("status") == "ok"]
    if not ok:
        if results:
            row.update(status="failed", reason=results[-1].get("reason"))
        return row
    tps = [r["tokens_per_s"] for r in ok]
    med = S.median(tps)
    first = ok[0]
    step_s = S.median(r["step_s"] for r in ok)
    flops_per_s_dev = None  # model FLOPs per token x tokens/s, per device
    if first.get("flops_per_step"):
        flops_per_s_dev = first["flops_per_step"] / first["tokens_per_step"] * med / spec["devices"]
    row.update(
        status="ok", reason=None, params=first.get("params"),
        tokens_per_step=first["tokens_per_step"], tokens_counted=first["tokens_counted"],
        step_s=round(step_s, 5), tokens_per_s=round(med, 2),
        tokens_per_s_per_device=round(med / spec["devices"], 2),
        tokens_per_s_runs=[round(x, 2) for x in tps],
        model_flops_per_step=first.get("flops_per_step"),
        tflops_per_device=None if flops_per_s_dev is None else round(flops_per_s_dev / 1e12, 6),
        mfu=None, mfu_basis=basis,
        peak_memory_mb=max((r["peak_memory_mb"] for r in ok if r.get("peak_memory_mb")), default=None),
        cpu_busy=None if first.get("cpu_busy") is None else round(S.median(r["cpu_busy"] for r in ok), 3),
        memory_kind=first.get("memory_kind"), flops_note=first.get("flops_note"),
        extra=_median_extra(ok), wall_s=sum(r.get("wall_s", 0) for r in ok))
    m = S.mfu(flops_per_s_dev, peak)
    row["mfu"] = None if m is None else round(m, 5)
    return row


def _median_extra(ok: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The first run's ``extra``, with each number that every run reports replaced by the
    median over the runs."""
    extra = ok[0].get("extra")
    if not extra:
        return extra
    out = dict(extra)
    for k, v in extra.items():
        vals = [r.get("extra", {}).get(k) for r in ok]
        if isinstance(v, (int, float)) and all(isinstance(x, (int, float)) for x in vals):
            out[k] = S.median(vals)
    return out


CSV_FIELDS = ["phase", "scaling", "layout", "tp", "pp", "dp", "devices", "micro_batch", "recompute",
              "dtype", "seq_len", "prompt_len", "new_tokens", "batch_per_replica", "global_batch",
              "num_microbatches", "status", "params", "tokens_per_step", "step_s", "tokens_per_s",
              "tokens_per_s_per_device", "tflops_per_device", "mfu", "mfu_basis", "efficiency",
              "efficiency_base", "peak_memory_mb", "memory_kind", "threads", "cpu_busy", "reason"]


def write_csv(rows: List[Dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k) for k in CSV_FIELDS})


def _labels(rows: List[Dict[str, Any]]) -> List[str]:
    """Short labels: the layout plus whichever of micro-batch/recompute/scaling vary."""
    vary = [k for k in ("micro_batch", "recompute", "scaling") if len({r[k] for r in rows}) > 1]
    fmt = {"micro_batch": "mb{}", "recompute": "rc-{}", "scaling": "{}"}
    return [" ".join([r["layout"]] + [fmt[k].format(r[k]) for k in vary]) for r in rows]


def _series(rows: List[Dict[str, Any]]):
    """Lines of the plots: rows that differ only in DP (same TP x PP, micro-batch,
    recomputation, scaling kind), each sorted by devices."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        key = f"tp{r['tp']}pp{r['pp']} {r['scaling']} mb{r['micro_batch']} rc-{r['recompute']}"
        groups.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: r["devices"]) for k, v in groups.items()}


def write_plots(rows: List[Dict[str, Any]], out: str, title: str, basis: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return []
    paths = []

    def save(fig, name):
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    series = _series(ok)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, rs in series.items():
        xs = [r["devices"] for r in rs]
        axes[0].plot(xs, [r["tokens_per_s"] for r in rs], "o-", label=key)
        axes[1].plot(xs, [r["tokens_per_s_per_device"] for r in rs], "o-", label=key)
        for r in rs:
            axes[0].annotate(r["layout"], (r["devices"], r["tokens_per_s"]), fontsize=7,
                             textcoords="offset points", xytext=(3, 3))
    axes[0].set(xlabel="devices (TP x PP x DP)", ylabel="tokens/s", title="throughput")
    axes[1].set(xlabel="devices (TP x PP x DP)", ylabel="tokens/s per device", title="throughput per device")
    ticks = sorted({r["devices"] for r in ok})
    for ax in axes:
        ax.set_xticks(ticks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    save(fig, "throughput.png")

    labels = _labels(ok)
    if any(r.get("mfu") is not None for r in ok):
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(ok) + 2), 4.2))
        ax.bar(labels, [100 * (r["mfu"] or 0) for r in ok], color="tab:green")
        ax.set(ylabel="MFU (%)", title=f"{title}\nMFU vs {basis}")
        ax.title.set_fontsize(8)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        save(fig, "mfu.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, rs in series.items():
        ax.plot([r["devices"] for r in rs], [100 * r["efficiency"] for r in rs], "o-",
                label=f"{key} (base {rs[0]['efficiency_base']})")
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_xticks(ticks)
    ax.set(xlabel="devices (TP x PP x DP)", ylabel="scaling efficiency (%)",
           title=f"{title}\nefficiency = (tokens/s / base tokens/s) / (devices / base devices)")
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "efficiency.png")

    if any(r.get("peak_memory_mb") for r in ok):
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(ok) + 2), 4.2))
        ax.bar(labels, [(r["peak_memory_mb"] or 0) / 1024 for r in ok], color="tab:purple")
        kind = ok[0].get("memory_kind") or "peak memory"
        ax.set(ylabel="GiB (max over ranks)", title=f"{title}\n{kind}")
        ax.title.set_fontsize(8)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        save(fig, "memory.png")
    return paths


def environment(launcher: str) -> Dict[str, Any]:
    import importlib.metadata as md

    env: Dict[str, Any] = {"host": socket.gethostname(), "python": pyplatform.python_version(),
                           "launcher": launcher, "cpus": os.cpu_count()}
    for pkg in ("torch", "megatron-core"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        env["cpu_model"] = next((l.split(":", 1)[1].strip() for l in info.splitlines()
                                 if l.startswith("model name")), None)
        env["cpu_amx_bf16"] = "amx_bf16" in info
    except OSError:
        pass
    if os.environ.get("SLURM_JOB_ID"):
        env["slurm"] = {k: os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST",
                                                      "SLURM_NNODES", "SLURM_NTASKS_PER_NODE")}
    return env


def driver(args: argparse.Namespace) -> int:
    launcher = resolve_launcher(args)
    out = os.path.abspath(args.out)
    work = os.path.join(out, "runs")
    os.makedirs(work, exist_ok=True)
    specs = plan_runs(args)
    todo = [s for s in specs if s["status"] == "planned"]
    env = environment(launcher)
    env["loadavg_start"] = list(os.getloadavg())
    print(f"benchmark_scaling: {args.phase} on {args.preset}, {len(todo)} run(s) x {args.repeats} "
          f"repeat(s) ({len(specs) - len(todo)} not runnable), launcher {launcher}", flush=True)

    probes: List[Dict[str, Any]] = []
    if args.peak_tflops is None and todo:
        probes.append(run_probe(args, launcher, work, "before"))
    shared = None
    devices = max((s["devices"] for s in todo), default=1)
    if shares_cores(launcher, devices):
        solo = probes[0] if probes else run_probe(args, launcher, work, "solo")
        shared = run_probe_shared(args, launcher, work, devices, solo)
    results: Dict[int, List[Dict[str, Any]]] = {i: [] for i in range(len(specs))}
    for rnd in range(args.repeats):  # rounds interleave the configurations (noisy machines)
        for i, spec in enumerate(specs):
            if spec["status"] != "planned":
                continue
            res = run_one(args, launcher, spec, work, i, rnd)
            results[i].append(res)
            shown = (f"{res['tokens_per_s']:.1f} tokens/s, step {res['step_s']:.4f} s"
                     if res.get("status") == "ok" else f"{res['status']}: {res.get('reason')}")
            print(f"  [{rnd + 1}/{args.repeats}] {spec['scaling']:6s} {spec['layout']:10s} "
                  f"mb{spec['micro_batch']} rc-{spec['recompute']}: {shown}", flush=True)
    if args.peak_tflops is None and todo:
        probes.append(run_probe(args, launcher, work, "after"))
    env["loadavg_end"] = list(os.getloadavg())

    probe = peak_of(args, probes)
    peak = probe["tflops"] * 1e12 if "tflops" in probe else None
    basis = S.mfu_basis(probe) if peak else "no peak"
    rows = [summarise(spec, results[i], peak, basis) if spec["status"] == "planned" else
            {k: v for k, v in spec.items() if k not in ("overrides", "run_dir")}
            for i, spec in enumerate(specs)]
    S.add_efficiency(rows)
    title = (f"{args.phase} on {args.preset} ({args.dtype}), "
             + (f"seq {args.seq_len}" if args.phase in S.TRAIN_PHASES else f"{args.new_tokens} new tokens"))
    report = {"benchmark": "scaling", "phase": args.phase, "preset": args.preset,
              "model_overrides": model_overrides(args),
              "args": {k: v for k, v in vars(args).items() if k not in ("worker", "probe", "probe_shared")},
              "probe": probe, "probe_shared": shared, "mfu_basis": basis, "environment": env,
              "rows": rows}
    with open(os.path.join(out, "scaling.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_csv(rows, os.path.join(out, "scaling.csv"))
    plots = write_plots(rows, out, title, basis)
    print_table(rows, basis, env)
    if shared:
        per = shared["flops_per_s_per_device"]
        print(f"the same probe on {len(per)} processes at once: "
              f"{sum(per) / len(per) / 1e12:.4f} TFLOP/s per device, {shared['ratio_to_solo']:.1%} of "
              "one alone (how well these cores multiply side by side)")
    for p in [os.path.join(out, "scaling.json"), os.path.join(out, "scaling.csv"), *plots]:
        print(p)
    return 0 if all(r["status"] != "failed" for r in rows) else 1


def peak_of(args: argparse.Namespace, probes: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The peak MFU is stated against: ``--peak-tflops``, else the best GEMM probe."""
    if args.peak_tflops is not None:
        return {"source": "given", "tflops": args.peak_tflops, "dtype": args.probe_dtype or args.dtype}
    if not probes:
        return {"source": "none"}
    best = max(probes, key=lambda p: p["flops_per_s"])
    return dict(best, source="gemm probe", tflops=best["flops_per_s"] / 1e12,
                samples_tflops=[p["flops_per_s"] / 1e12 for p in probes])


def print_table(rows: List[Dict[str, Any]], basis: str, env: Dict[str, Any]) -> None:
    def f(v, spec):
        return "" if v is None else format(v, spec)

    print(f"peak per device: {basis}")
    print("| layout | scaling | mb | recompute | devices | tokens/s | tokens/s/device | TFLOP/s/device "
          "| MFU | efficiency | peak MB | CPU busy | status |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['scaling']} | {r['micro_batch']} | {r['recompute']} | {r['devices']} "
              f"| {f(r.get('tokens_per_s'), '.1f')} | {f(r.get('tokens_per_s_per_device'), '.1f')} "
              f"| {f(r.get('tflops_per_device'), '.4f')} | {f(r.get('mfu'), '.1%')} "
              f"| {f(r.get('efficiency'), '.1%')} | {f(r.get('peak_memory_mb'), '.0f')} "
              f"| {f(r.get('cpu_busy'), '.0%')} "
              f"| {r['status']}{'' if not r.get('reason') else ': ' + r['reason'][:120]} |")
    print(f"load average {env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f} on {env['cpus']} CPUs")


# -- processes started by the driver --------------------------------------------------------


def _probe(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Square-GEMM FLOP/s on this process's device (``spec["threads"]`` threads on CPU)."""
    import torch

    from megarlhf.perf.flops import gemm_probe

    gpu = torch.cuda.is_available()
    threads = torch.get_num_threads()
    if not gpu:
        torch.set_num_threads(spec["threads"])
    try:
        flops = gemm_probe(spec["n"], getattr(torch, spec["dtype"]), spec["seconds"], "cuda" if gpu else "cpu")
        res = {"flops_per_s": flops, "n": spec["n"], "dtype": spec["dtype"], "seconds": spec["seconds"],
               "device": torch.cuda.get_device_name() if gpu else "cpu",
               "threads": None if gpu else torch.get_num_threads()}
    finally:
        torch.set_num_threads(threads)
    with open(spec["result"], "w") as f:
        json.dump(res, f)
    return res


def probe_main(spec_path: str) -> int:
    with open(spec_path) as f:
        print(json.dumps(_probe(json.load(f))))
    return 0


def probe_shared_main(spec_path: str) -> int:
    """Every rank runs the probe at the same moment; rank 0 writes the per-rank FLOP/s."""
    import torch
    import torch.distributed as dist

    with open(spec_path) as f:
        spec = json.load(f)
    dist.init_process_group("gloo")
    try:
        dist.barrier()
        res = _probe(dict(spec, result=f"{spec['result']}.rank{dist.get_rank()}"))
        flops = torch.tensor([res["flops_per_s"]], dtype=torch.float64)
        every = [torch.zeros_like(flops) for _ in range(dist.get_world_size())]
        dist.all_gather(every, flops)
        if dist.get_rank() == 0:
            out = {k: res[k] for k in ("n", "dtype", "seconds", "device", "threads")}
            out.update(processes=dist.get_world_size(), flops_per_s_per_device=[float(x) for x in every])
            with open(spec["result"], "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()
    return 0


def _synthetic_tokens(rows: int, seq: int, vocab: int, seed: int):
    import torch

    return torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))


def _lm_microbatch(rows: int, seq: int, vocab: int, seed: int):
    """Full rows of random tokens, every position trained (labels: the next token)."""
    import torch

    from megarlhf.data.batch import LMBatch

    toks = _synthetic_tokens(rows, seq + 1, vocab, seed)
    pos = torch.arange(seq).unsqueeze(0).expand(rows, -1).contiguous()
    return LMBatch(toks[:, :-1].contiguous(), toks[:, 1:].contiguous(), torch.ones(rows, seq), None, pos)


def _pair_microbatch(rows: int, seq: int, vocab: int, seed: int, with_ref: bool):
    """``rows // 2`` pairs of full-length chosen and rejected rows; the second half of each
    row is the response (the loss mask), the reward is read at the last token."""
    import torch

    from megarlhf.data.batch import PairBatch

    lm = _lm_microbatch(rows, seq, vocab, seed)
    mask = torch.zeros(rows, seq)
    mask[:, seq // 2:-1] = 1.0
    ref = torch.zeros(rows) if with_ref else None
    return PairBatch(lm.tokens, lm.labels, mask, lm.position_ids,
                     torch.full((rows,), seq - 1, dtype=torch.long), ref_logprobs=ref)


def _timed(plat, fn, n: int, warmup: int):
    """Per-step seconds of ``fn(i)`` after ``warmup`` untimed calls (every rank starts each
    step together and a step lasts until its slowest rank ends it), and on CPU the share of
    that time the ranks were running (process CPU seconds / (threads x wall seconds), the
    mean over ranks): well below 1 when ranks wait for each other or for a core that
    another job holds."""
    import torch
    import torch.distributed as dist

    times, cpu = [], 0.0
    for i in range(warmup + n):
        dist.barrier()
        plat.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn(i)
        plat.synchronize()
        times.append(time.perf_counter() - t0)
        if i >= warmup:
            cpu += time.process_time() - c0
    t = torch.tensor(times[warmup:], dtype=torch.float64, device=plat.device)
    c = torch.tensor([cpu], dtype=torch.float64, device=plat.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    dist.all_reduce(c)
    steps, cpu_sum = t.cpu().tolist(), float(c)
    busy = None if plat.is_gpu else cpu_sum / (dist.get_world_size() * torch.get_num_threads() * sum(steps))
    return steps, busy


def worker_main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    import torch

    from megarlhf import platform
    from megarlhf.parallel import DistEnv, init_distributed

    env = DistEnv.from_environ()
    init_distributed(env)
    plat = platform.current()
    if not plat.is_gpu:
        torch.set_num_threads(spec["threads"])
    if spec["phase"] == "ppo":
        res = _bench_ppo(spec, env)
    elif spec["phase"] == "generate":
        res = _bench_generate(spec, plat)
    else:
        res = _bench_train(spec, plat)
    # Every rank records its own peak; the driver takes the maximum.
    with open(os.path.join(spec["run_dir"], f"rank{env.rank}.json"), "w") as f:
        json.dump({"rank": env.rank, "peak_memory_bytes": plat.max_memory_allocated()}, f)
    if env.rank == 0:
        res.update(status="ok", memory_kind="torch.cuda.max_memory_allocated" if plat.is_gpu
                   else "peak RSS of the process (ru_maxrss)")
        with open(os.path.join(spec["run_dir"], "result.json"), "w") as f:
            json.dump(res, f)
        print(json.dumps(res), flush=True)
    from megarlhf.parallel import destroy

    destroy()
    return 0


def _build(spec: Dict[str, Any], plat, kind: str):
    """(model config, layout, this rank's chunks, parameters of the whole model)."""
    import torch
    import torch.distributed as dist

    from megarlhf.config import ParallelConfig, preset
    from megarlhf.models.llama import build_model, num_parameters
    from megarlhf.parallel import initialize_model_parallel

    cfg = preset(spec["preset"], **spec["overrides"],
                 recompute_granularity=S.recompute_granularity(spec["recompute"]))
    mp = initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=spec["tp"],
                                                  pipeline_model_parallel_size=spec["pp"]), seed=spec["seed"])
    chunks = build_model(cfg, mp, kind=kind)
    held = torch.tensor([num_parameters(chunks) if mp.dp_rank == 0 else 0], dtype=torch.float64,
                        device=plat.device)
    dist.all_reduce(held)  # one replica's ranks hold the model once
    return cfg, mp, chunks, int(held.item())


def _data_seed(spec: Dict[str, Any], mp, step: int, micro: int) -> int:
    """Synthetic data differs per step, microbatch and DP replica, and is the same on the
    TP and PP ranks of a replica (they must see the same rows)."""
    return spec["seed"] * 1_000_003 + (step * 1009 + micro) * 131 + mp.dp_rank


def _forward_step(phase: str, mp, cfg, device):
    """The recipe's own megatron forward step of a training phase."""
    if phase == "sft":
        from megarlhf.recipes.common import lm_forward_step

        return lm_forward_step(mp, cfg, device)
    if phase == "rm":
        from megarlhf.recipes.reward_model import reward_forward_step

        return reward_forward_step(mp, device)
    from megarlhf.recipes.dpo import DPOLossConfig, dpo_forward_step

    return dpo_forward_step(mp, cfg, DPOLossConfig(), device)


def _bench_train(spec: Dict[str, Any], plat) -> Dict[str, Any]:
    """SFT, reward-model or DPO training steps (forward, backward, optimizer) at the layout."""
    from megarlhf.train.optim import OptimConfig, build_optimizer, model_config_of, wrap_ddp
    from megarlhf.train.step import train_step

    phase, mbs, seq = spec["phase"], spec["micro_batch"], spec["seq_len"]
    cfg, mp, chunks, params = _build(spec, plat, "reward" if phase == "rm" else "causal")
    fwd = _forward_step(phase, mp, cfg, plat.device)
    for c in chunks:  # as the recipes: losses summed, megatron divides by the global count
        c.config.calculate_per_token_loss = True
    dist_opt = spec["distributed_optimizer"] and mp.dp_size > 1
    ddp = wrap_ddp(chunks, mp, use_distributed_optimizer=dist_opt)
    opt = build_optimizer(ddp, OptimConfig(lr=1e-5, use_distributed_optimizer=dist_opt), mp)

    def microbatch(i: int, j: int):
        rows, vocab, seed = mbs, cfg.vocab_size, _data_seed(spec, mp, i, j)
        if phase == "sft":
            return _lm_microbatch(rows, seq, vocab, seed)
        return _pair_microbatch(rows, seq, vocab, seed, with_ref=phase == "dpo")

    batches = [[microbatch(i, j) for j in range(spec["num_microbatches"])]
               for i in range(spec["warmup"] + spec["steps"])]
    sync = _time_grad_sync(model_config_of(ddp[0]))
    times, busy = _timed(plat, lambda i: train_step(ddp, opt, mp, fwd, batches[i], seq, mbs),
                         spec["steps"], spec["warmup"])
    tokens = spec["global_batch"] * seq
    res = _result(params, tokens, times, busy, "all tokens (full rows, no padding)",
                  S.train_flops_per_row_token(cfg, phase, seq) * tokens,
                  "forward + backward model FLOPs (megarlhf.perf.flops), recomputation not counted")
    res["extra"].update(_grad_sync_summary(sync[spec["warmup"]:], plat))
    return res


def _time_grad_sync(config) -> List[float]:
    """Wrap the model config's ``finalize_model_grads_func`` (the DP gradient reduction the
    schedule runs at the end of each step) to record its seconds per call."""
    inner, seconds = config.finalize_model_grads_func, []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        seconds.append(time.perf_counter() - t0)
        return out

    config.finalize_model_grads_func = timed
    return seconds


def _grad_sync_summary(seconds: List[float], plat) -> Dict[str, float]:
    """Median seconds per step in the gradient reduction, as the mean and the maximum over
    ranks. A collective ends together on every rank, so a rank that reaches it first waits
    there for the slowest: the spread between ranks is that waiting."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor([S.median(seconds) if seconds else 0.0], dtype=torch.float64, device=plat.device)
    total, top = mine.clone(), mine.clone()
    dist.all_reduce(total)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return {"grad_sync_s": round(float(total) / dist.get_world_size(), 5), "grad_sync_s_max": round(float(top), 5)}


def _bench_generate(spec: Dict[str, Any], plat) -> Dict[str, Any]:
    """KV-cached sampling with the rollout engine: exactly ``new_tokens`` per row."""
    from megarlhf.rollout.engine import MegatronEngine, SamplingParams

    cfg, mp, chunks, params = _build(spec, plat, "causal")
    engine = MegatronEngine(chunks, mp, cfg.vocab_size, max_batch=spec["micro_batch"])
    per, plen, new = spec["batch_per_replica"], spec["prompt_len"], spec["new_tokens"]
    prompts = [_synthetic_tokens(per, plen, cfg.vocab_size, _data_seed(spec, mp, i, 0)).tolist()
               for i in range(spec["warmup"] + spec["steps"])]
    got = []

    def step(i: int) -> None:
        out = engine.generate(prompts[i], SamplingParams(max_new_tokens=new, temperature=1.0, seed=i))
        got.append(sum(len(r) for r in out.response_ids))

    times, busy = _timed(plat, step, spec["steps"], spec["warmup"])
    if any(g != per * new for g in got):
        raise RuntimeError(f"expected {per * new} generated tokens per step, got {got}")
    return _result(params, spec["global_batch"] * new, times, busy, "generated tokens",
                   S.generation_flops(cfg, plen, new) * spec["global_batch"],
                   "prefill + KV-cached decode (megarlhf.perf.scaling.generation_flops)")


def _result(params: int, tokens: int, times: List[float], busy: Optional[float], counted: str,
            flops: float, note: str) -> Dict[str, Any]:
    step_s = S.median(times)
    return {"params": params, "tokens_per_step": tokens, "step_s": step_s, "step_s_all": times,
            "tokens_per_s": tokens / step_s, "cpu_busy": busy, "tokens_counted": counted,
            "flops_per_step": flops, "flops_note": note, "extra": {}}


def _bench_ppo(spec: Dict[str, Any], env) -> Dict[str, Any]:
    """The PPO recipe at the spec's layout (every role, colocated) on random-weight models
    of the preset's shape, saved first as distributed checkpoints (not timed)."""
    import dataclasses

    from megarlhf.config import ParallelConfig, preset
    from megarlhf.data.builtin import prepare_builtin_task
    from megarlhf.data.dataset import DataConfig
    from megarlhf.data.load import SourceConfig
    from megarlhf.data.task import TaskConfig
    from megarlhf.data.tokenizer import load_tokenizer
    from megarlhf.models.checkpoint import CheckpointMeta, save_model
    from megarlhf.models.llama import build_model
    from megarlhf.parallel import initialize_model_parallel
    from megarlhf.recipes.ppo import (PPOConfig, PPOLossConfig, PPOTrainConfig, RoleConfig,
                                      RolloutConfig, run)
    from megarlhf.train.metrics import LogConfig

    work = spec["run_dir"]
    steps = spec["warmup"] + spec["steps"]
    files = prepare_builtin_task(os.path.join(work, "task"), TaskConfig(
        num_sft=64, num_preference=16, num_prompts=max(spec["global_batch"] * steps, 64), num_eval=16))
    tok = load_tokenizer(files["tokenizer"])
    cfg = preset(spec["preset"], **spec["overrides"],
                 recompute_granularity=S.recompute_granularity(spec["recompute"]))
    cfg = dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size, tok.vocab_size))
    par = ParallelConfig(tensor_model_parallel_size=spec["tp"], pipeline_model_parallel_size=spec["pp"])
    mp = initialize_model_parallel(par, seed=spec["seed"])
    ckpts = {}
    for kind in ("causal", "reward"):
        ckpts[kind] = os.path.join(work, f"init_{kind}")
        save_model(build_model(cfg, mp, kind=kind), ckpts[kind], CheckpointMeta(
            model=cfg, kind=kind, tokenizer=os.path.abspath(files["tokenizer"]), chat_template="tulu"))
    n = spec["global_batch"]
    pcfg = PPOConfig(
        actor=RoleConfig(init_from=ckpts["causal"], parallel=par), reference=RoleConfig(parallel=par),
        critic=RoleConfig(init_from=ckpts["reward"], parallel=par),
        reward=RoleConfig(init_from=ckpts["reward"], parallel=par),
        data=DataConfig(sources=[SourceConfig(path=files["prompts"])], max_length=128, max_prompt_length=128),
        rollout=RolloutConfig(prompts_per_step=n, max_new_tokens=spec["new_tokens"], temperature=1.0,
                              max_batch=spec["batch_per_replica"]),
        ppo=PPOLossConfig(minibatch_size=n),
        train=PPOTrainConfig(max_steps=steps, micro_batch_size=spec["micro_batch"], actor_lr=1e-6,
                             critic_lr=1e-6, distributed_optimizer=spec["distributed_optimizer"],
                             out_dir=os.path.join(work, "ppo"), resume="never", seed=spec["seed"]),
        log=LogConfig(progress_bar=False, interval=1000), world=env.world_size)
    pcfg.validate()
    hist = run(pcfg)["history"][spec["warmup"]:]
    step_s = S.median(h["time/step"] for h in hist)
    tokens = S.median(h["tokens_per_s/step"] * h["time/step"] for h in hist)
    phases = sorted({k for h in hist for k in h if k.startswith("time/")})
    resp = S.median(h["response_length"] for h in hist)
    return {"params": cfg.num_parameters(), "tokens_per_step": round(tokens), "step_s": step_s,
            "step_s_all": [h["time/step"] for h in hist],
            "tokens_per_s": S.median(h["tokens_per_s/step"] for h in hist),
            "tokens_counted": "non-pad prompt + response tokens of the rollout (the recipe's count)",
            "flops_per_step": S.ppo_step_flops(cfg, tokens, max(1, round(tokens / n))),
            "flops_note": "estimate: megarlhf.perf.scaling.ppo_step_flops (generation as one forward "
                          "per token)",
            "extra": {"phase_s": {p.split("/", 1)[1]: S.median(h[p] for h in hist) for p in phases},
                      "response_length": resp,
                      "generate_tokens_per_s": S.median(h["tokens_per_s/generate"] for h in hist)}}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.probe:
        return probe_main(args.probe)
    if args.probe_shared:
        return probe_shared_main(args.probe_shared)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
