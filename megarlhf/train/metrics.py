"""Metrics: one JSON line per logged step (always), printed on rank 0."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

import torch.distributed as dist

__all__ = ["MetricsLog"]


class MetricsLog:
    def __init__(self, path: Optional[str]):
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.path = path
        self.t0 = time.time()
        if self.rank0 and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, step: int, metrics: Dict[str, Any], echo: bool = True) -> None:
        if not self.rank0:
            return
        row = {"step": step, "time": round(time.time() - self.t0, 3), **metrics}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if echo:
            parts = [f"step {step:5d}"] + [f"{k} {_fmt(v)}" for k, v in metrics.items()]
            print("  ".join(parts), flush=True)

    def say(self, text: str) -> None:
        if self.rank0:
            print(text, flush=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)
