#!/usr/bin/env python
"""Curves of a training metric from one or more runs' ``metrics.jsonl``, in one PNG.

    python tools/plot_metrics.py runs/ppo_s1/metrics.jsonl runs/ppo_s2/metrics.jsonl \\
        --keys score_mean train_accuracy --smooth 10 --out curves.png [--label seed1 --label seed2]

One panel per key, one line per run: the mean over a trailing window of ``--smooth``
steps (1: the raw values). Rows without the key (evaluation rows, other recipes' rows)
are skipped; a key that no run logs is an error naming the key and the files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, List, Sequence, Tuple


def read_curve(path: str, key: str) -> Tuple[List[int], List[float]]:
    """(steps, values) of ``key`` in a metrics.jsonl, by step; non-finite values (a skipped
    update's losses) are left out. A step logged again (a resumed run appends to the file
    and repeats the steps after its checkpoint) keeps its last value."""
    by_step: Dict[int, float] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{lineno}: not JSON ({e.msg})")
            v = row.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v) and "step" in row:
                by_step[int(row["step"])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def trailing_mean(values: Sequence[float], window: int) -> List[float]:
    """Mean of each value with up to ``window - 1`` values before it."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(paths: Sequence[str], keys: Sequence[str], out: str, smooth: int = 1,
         labels: Sequence[str] = ()) -> Dict[str, Dict[str, int]]:
    """Writes the PNG; returns the number of points per key and run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels) or [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in paths]
    if len(labels) != len(paths):
        raise SystemExit(f"--label given {len(labels)} times for {len(paths)} files")
    counts: Dict[str, Dict[str, int]] = {}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        counts[key] = {}
        for path, label in zip(paths, labels):
            steps, values = read_curve(path, key)
            counts[key][label] = len(values)
            if values:
                ax.plot(steps, trailing_mean(values, smooth), label=label)
        if not any(counts[key].values()):
            raise SystemExit(f"no run logs {key!r}: {', '.join(paths)}")
        ax.set_xlabel("step")
        ax.set_title(key if smooth == 1 else f"{key} (mean of {smooth} steps)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="metrics.jsonl files")
    ap.add_argument("--keys", nargs="+", default=["score_mean"], help="metrics to plot, one panel each")
    ap.add_argument("--smooth", type=int, default=1, help="trailing window in steps (>= 1)")
    ap.add_argument("--label", action="append", default=[], help="a run's name, once per file, in order")
    ap.add_argument("--out", required=True, help="PNG to write")
    args = ap.parse_args(argv)
    if args.smooth < 1:
        ap.error(f"--smooth={args.smooth}: must be >= 1")
    for p in args.paths:
        if not os.path.isfile(p):
            ap.error(f"{p}: no such file")
    counts = plot(args.paths, args.keys, args.out, args.smooth, args.label)
    for key, per_run in counts.items():
        print(f"{key}: " + ", ".join(f"{label} {n} steps" for label, n in per_run.items()))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
