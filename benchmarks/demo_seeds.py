"""The demo pipeline (``megarlhf demo``) once per seed, and how much its figures move.

    python benchmarks/demo_seeds.py                                  # seeds 1 2 3, default sizes
    python benchmarks/demo_seeds.py --seeds 1 2 --out-dir runs/demo_seeds ppo.train.max_steps=40

Each seed runs the whole demo as its own ``megarlhf demo out_dir=<out-dir>/seed<k> seed=<k>
[overrides]`` process (the remaining arguments are the demo's ``key=value`` overrides,
checked before anything runs), so every stage (SFT, pair sampling, RM, DPO, PPO) is seeded
by it while the task and its validation and test problems stay the same.

Writes ``<out-dir>/demo_seeds.json``: every seed's ``results.json`` and, for each line
(test and validation exact match of SFT, DPO and PPO, the reward model's pair accuracy,
the paired differences DPO - SFT and PPO - SFT with their 95% interval bounds, the total
time), the mean, min, max and population standard deviation over the seeds. Prints the
markdown table (line | mean | min-max | per seed) and the JSON path last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# line -> (where it is in a results.json, unit)
LINES: Dict[str, Tuple[Tuple[Any, ...], str]] = {
    "sft_accuracy": (("sft_accuracy",), "%"),
    "dpo_accuracy": (("dpo_accuracy",), "%"),
    "ppo_accuracy": (("ppo_accuracy",), "%"),
    "sft_validation_accuracy": (("sft_validation_accuracy",), "%"),
    "dpo_validation_accuracy": (("dpo_validation_accuracy",), "%"),
    "ppo_validation_accuracy": (("ppo_validation_accuracy",), "%"),
    "rm_pair_accuracy": (("rm_pair_accuracy",), "%"),
    "dpo_minus_sft": (("dpo_minus_sft", "difference"), "points"),
    "dpo_minus_sft_ci95_low": (("dpo_minus_sft_ci95", 0), "points"),
    "dpo_minus_sft_ci95_high": (("dpo_minus_sft_ci95", 1), "points"),
    "ppo_minus_sft": (("ppo_minus_sft", "difference"), "points"),
    "ppo_minus_sft_ci95_low": (("ppo_minus_sft_ci95", 0), "points"),
    "ppo_minus_sft_ci95_high": (("ppo_minus_sft_ci95", 1), "points"),
    "seconds_total": (("seconds", "total"), "s"),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one demo run per seed")
    ap.add_argument("--out-dir", default="runs/demo_seeds", help="seed k runs in <out-dir>/seed<k>")
    ap.add_argument("--reuse", action="store_true",
                    help="read a seed's <out-dir>/seed<k>/results.json where a finished run left one "
                         "instead of running it again (a rerun of the failed or missing seeds)")
    ap.add_argument("overrides", nargs="*", help="the demo's key=value overrides (not out_dir or seed)")
    args = ap.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed")
    for o in args.overrides:
        if o.split("=", 1)[0] in ("out_dir", "seed"):
            ap.error(f"{o}: set by this benchmark (--out-dir, --seeds)")
    return args


def demo_argv(out_dir: str, seed: int, overrides: Sequence[str]) -> List[str]:
    """The ``megarlhf demo`` arguments of one seed's run."""
    return [f"out_dir={os.path.join(out_dir, f'seed{seed}')}", f"seed={seed}", *overrides]


def check_overrides(out_dir: str, seed: int, overrides: Sequence[str]) -> Optional[str]:
    """The config error of one seed's demo, as ``megarlhf demo`` would report it (None: valid)."""
    from megarlhf.config import ConfigError, ConfigLoadError, load_config
    from megarlhf.demo import DemoConfig

    try:
        load_config(DemoConfig, None, demo_argv(out_dir, seed, overrides)).validate()
    except (ConfigLoadError, ConfigError) as e:
        return str(e)
    return None


def _value(results: Dict[str, Any], path: Tuple[Any, ...]) -> Optional[float]:
    v: Any = results
    for key in path:
        if v is None:
            return None
        try:
            v = v[key]
        except (KeyError, IndexError, TypeError):
            return None
    return v


def summarize(per_seed: Dict[int, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """For each of :data:`LINES`: its value per seed (seed order; None where a run lacks it)
    and, over the seeds that have it, ``mean``, ``min``, ``max``, ``std`` (population)
    and ``n``."""
    out: Dict[str, Dict[str, Any]] = {}
    for line, (path, unit) in LINES.items():
        values = [_value(per_seed[s], path) for s in per_seed]
        xs = [v for v in values if v is not None]
        stats: Dict[str, Any] = {"mean": None, "min": None, "max": None, "std": None}
        if xs:
            stats = {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "std": statistics.pstdev(xs)}
        out[line] = {**stats, "n": len(xs), "unit": unit, "per_seed": values}
    return out


def _fmt(v: Optional[float], unit: str) -> str:
    if v is None:
        return "-"
    if unit == "%":
        return f"{100 * v:.1f}%"
    if unit == "points":
        return f"{100 * v:+.1f}"
    return f"{v:.0f} s"


def table(summary: Dict[str, Dict[str, Any]], seeds: Sequence[int]) -> str:
    """The markdown table: line | mean | min-max | per seed (accuracies in %, differences
    in points)."""
    rows = [f"| line | mean | min-max | per seed ({', '.join(map(str, seeds))}) |", "|---|---:|---:|---|"]
    for line, s in summary.items():
        u = s["unit"]
        rows.append(f"| {line} | {_fmt(s['mean'], u)} | {_fmt(s['min'], u)} - {_fmt(s['max'], u)} | "
                    f"{', '.join(_fmt(v, u) for v in s['per_seed'])} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    problem = check_overrides(args.out_dir, args.seeds[0], args.overrides)
    if problem:
        print(f"demo_seeds: {problem}", file=sys.stderr)
        return 2
    per_seed: Dict[int, Dict[str, Any]] = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    for seed in args.seeds:
        done = os.path.join(args.out_dir, f"seed{seed}", "results.json")
        if args.reuse and os.path.exists(done):
            print(f"== seed {seed}: read from {done} (--reuse)", flush=True)
            with open(done) as f:
                per_seed[seed] = json.load(f)
            continue
        cmd = [sys.executable, "-m", "megarlhf.cli", "demo", *demo_argv(args.out_dir, seed, args.overrides)]
        print(f"== seed {seed}: {' '.join(cmd[1:])}", flush=True)
        res = subprocess.run(cmd, env=env)
        if res.returncode != 0:
            print(f"demo_seeds: seed {seed}: megarlhf demo exited with {res.returncode}", file=sys.stderr)
            return res.returncode
        with open(os.path.join(args.out_dir, f"seed{seed}", "results.json")) as f:
            per_seed[seed] = json.load(f)
    summary = summarize(per_seed)
    path = os.path.join(args.out_dir, "demo_seeds.json")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"seeds": list(args.seeds), "overrides": list(args.overrides), "summary": summary,
                   "per_seed": {str(k): v for k, v in per_seed.items()}}, f, indent=1)
    print()
    print(table(summary, args.seeds))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
