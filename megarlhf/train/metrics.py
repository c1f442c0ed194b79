"""Metrics: one JSON line per step (always), wandb when enabled (offline by default), and a
rank-0 progress bar with step, loss, tokens/s and ETA."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch.distributed as dist

__all__ = ["LogConfig", "MetricsLog"]


@dataclass(frozen=True)
class LogConfig:
    """Where metrics go."""

    interval: int = 10
    """Steps between printed metric lines (every step goes to the JSONL file)."""
    progress_bar: bool = True
    """A rank-0 progress bar (step, loss, tokens/s, ETA)."""
    wandb: bool = False
    """Log to Weights & Biases as well."""
    wandb_mode: str = "offline"
    """``offline`` (default: nothing leaves the machine; sync later with `wandb sync`) or
    ``online``."""
    wandb_project: str = "megarlhf"
    wandb_run_name: Optional[str] = None


class MetricsLog:
    def __init__(self, out_dir: Optional[str], cfg: LogConfig = LogConfig(),
                 config: Optional[Dict[str, Any]] = None):
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.cfg = cfg
        self.path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
        self.t0 = time.time()
        self.bar = None
        self.run = None
        if not self.rank0:
            return
        if self.path:
            os.makedirs(out_dir, exist_ok=True)
        if cfg.wandb:
            import wandb

            if cfg.wandb_mode not in ("offline", "online"):
                raise ValueError(f"log.wandb_mode={cfg.wandb_mode!r}: expected offline or online")
            self.run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, mode=cfg.wandb_mode,
                                  dir=out_dir, config=config or {}, resume="allow")

    def start_progress(self, total_steps: int, start_step: int = 0) -> None:
        """Show the progress bar (once the number of steps is known)."""
        if self.rank0 and self.cfg.progress_bar and total_steps:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            leave=True)

    def log(self, step: int, metrics: Dict[str, Any], echo: Optional[bool] = None) -> None:
        if not self.rank0:
            return
        row = {"step": step, "time": round(time.time() - self.t0, 3), **metrics}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.bar is not None:
            if step > self.bar.n:
                self.bar.update(step - self.bar.n)
            short = {k: _fmt(metrics[k]) for k in ("loss", "tokens_per_s") if k in metrics}
            if short:
                self.bar.set_postfix(short, refresh=False)
        if echo is None:
            echo = step % max(self.cfg.interval, 1) == 0 or step == 1
        if echo:
            line = "  ".join([f"step {step:5d}"] + [f"{k} {_fmt(v)}" for k, v in metrics.items()])
            self.say(line)

    def say(self, text: str) -> None:
        if not self.rank0:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.run is not None:
            self.run.finish()
            self.run = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)
