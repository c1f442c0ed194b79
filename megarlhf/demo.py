"""The whole tiny pipeline on the built-in task, as the paper runs it at scale:

    SFT -> preference pairs from the SFT policy's own samples -> reward model -> DPO and PPO

    megarlhf demo [key=value ...]        # e.g. out_dir=runs/demo ppo.train.max_steps=40

Each stage is the ordinary recipe (``megarlhf sft``, ``pairs``, ``rm``, ``dpo``, ``ppo``)
with its own config section here; the pipeline only wires one stage's output into the
next stage's input under ``out_dir``. At the end it prints a table (exact match of SFT,
DPO and PPO on the held-out problems, the reward model's held-out pair accuracy), writes
``results.json`` and ``reward_curve.png`` in ``out_dir``, and prints the results path last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List

from megarlhf.data.dataset import DataConfig
from megarlhf.data.load import SourceConfig
from megarlhf.recipes.dpo import DPOConfig, DPOLossConfig
from megarlhf.recipes.pairs_common import PairsTrainConfig
from megarlhf.recipes.ppo import PPOConfig, PPOLossConfig, PPOTrainConfig, RolloutConfig
from megarlhf.train.loop import EvalConfig
from megarlhf.recipes.reward_model import RMConfig
from megarlhf.recipes.sft import SFTConfig
from megarlhf.train.metrics import LogConfig
from megarlhf.train.schedule import ScheduleConfig

__all__ = ["DemoConfig", "PairsConfig", "run", "sample_pairs"]


@dataclass(frozen=True)
class PairsConfig:
    """Preference pairs sampled from the SFT policy (``megarlhf pairs``)."""

    num_prompts: int = 2000
    """Prompts of the task's prompt file used (its first rows)."""
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 48


def _quiet() -> LogConfig:
    return LogConfig(interval=50, progress_bar=True)


@dataclass(frozen=True)
class DemoConfig:
    """Stage configs; paths between stages are filled in under ``out_dir``."""

    out_dir: str = "runs/demo"
    sft: SFTConfig = field(default_factory=SFTConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    rm: RMConfig = field(default_factory=lambda: RMConfig(
        data=DataConfig(max_length=128, max_prompt_length=96, eval_size=300),
        train=PairsTrainConfig(global_batch_size=32, micro_batch_size=16, seq_length=128, epochs=2.0,
                         lr=5e-4, min_lr=5e-5, packing=True), log=_quiet()))
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(
        data=DataConfig(max_length=128, max_prompt_length=96),
        # RPO: plain DPO unlearns the arithmetic on pairs that differ in a digit or two
        dpo=DPOLossConfig(nll_weight=1.0),
        train=PairsTrainConfig(global_batch_size=32, micro_batch_size=16, seq_length=128, epochs=1.0, lr=1e-4,
                         min_lr=0.0, schedule=ScheduleConfig(style="linear", warmup_ratio=0.1), packing=True),
        eval=EvalConfig(num_prompts=500), log=_quiet()))
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(
        data=DataConfig(max_length=96, max_prompt_length=96),
        rollout=RolloutConfig(prompts_per_step=64, max_new_tokens=48, temperature=0.7, max_batch=64),
        ppo=PPOLossConfig(minibatch_size=16),
        train=PPOTrainConfig(max_steps=30, micro_batch_size=16, actor_lr=2e-5, critic_lr=1e-4, packing=True),
        eval=EvalConfig(num_prompts=500, at_start=True), log=dataclasses.replace(_quiet(), interval=5)))

    def world_size(self) -> int:
        return 1

    def stages(self) -> Dict[str, object]:
        """The stage configs with their inputs and outputs wired under ``out_dir``."""
        o = self.out_dir
        task = os.path.join(o, "sft", "task")
        sft_ckpt = os.path.join(o, "sft", "checkpoint")
        pairs = os.path.join(o, "pairs", "policy_pairs.jsonl")
        rm_final = os.path.join(o, "rm", "final")
        sft = dataclasses.replace(self.sft, train=dataclasses.replace(self.sft.train, out_dir=os.path.join(o, "sft")))
        rm = dataclasses.replace(
            self.rm, data=dataclasses.replace(self.rm.data, sources=[SourceConfig(path=pairs)]),
            train=dataclasses.replace(self.rm.train, init_from=sft_ckpt, out_dir=os.path.join(o, "rm")))
        dpo = dataclasses.replace(
            self.dpo, data=dataclasses.replace(self.dpo.data, sources=[SourceConfig(path=pairs)]),
            train=dataclasses.replace(self.dpo.train, init_from=sft_ckpt, out_dir=os.path.join(o, "dpo")),
            eval=dataclasses.replace(self.dpo.eval, prompts=os.path.join(task, "eval.jsonl")))
        ppo = dataclasses.replace(
            self.ppo, actor=dataclasses.replace(self.ppo.actor, init_from=sft_ckpt),
            critic=dataclasses.replace(self.ppo.critic, init_from=rm_final),
            reward=dataclasses.replace(self.ppo.reward, init_from=rm_final),
            data=dataclasses.replace(self.ppo.data, sources=[SourceConfig(path=os.path.join(task, "prompts.jsonl"))]),
            train=dataclasses.replace(self.ppo.train, out_dir=os.path.join(o, "ppo")),
            eval=dataclasses.replace(self.ppo.eval, prompts=os.path.join(task, "eval.jsonl")))
        return {"sft": sft, "rm": rm, "dpo": dpo, "ppo": ppo, "task": task, "pairs": pairs,
                "sft_checkpoint": sft_ckpt}

    def validate(self) -> None:
        from megarlhf.config import ConfigError

        problems: List[str] = []
        stages = self.stages()
        for name in ("sft", "rm", "dpo", "ppo"):
            try:
                stages[name].validate()
            except ConfigError as e:
                problems += [f"{name}: {p}" for p in e.problems]
        for name in ("sft", "rm", "dpo", "ppo"):
            if stages[name].world_size() != 1:
                problems.append(f"{name}.world must be 1 in the pipeline (one process, every stage in turn)")
        if problems:
            raise ConfigError(problems)


def sample_pairs(cfg: PairsConfig, st: Dict[str, object]) -> None:
    """``megarlhf pairs`` on the first ``cfg.num_prompts`` task prompts, from the SFT
    checkpoint, into ``st["pairs"]``."""
    from megarlhf.rollout.commands import pairs_main

    os.makedirs(os.path.dirname(st["pairs"]), exist_ok=True)
    prompts = os.path.join(os.path.dirname(st["pairs"]), "prompts.jsonl")
    with open(os.path.join(st["task"], "prompts.jsonl")) as src, open(prompts, "w") as dst:
        for i, line in enumerate(src):
            if i >= cfg.num_prompts:
                break
            dst.write(line)
    pairs_main(["--ckpt", st["sft_checkpoint"], "--prompts", prompts, "--out", st["pairs"],
                "--samples-per-prompt", str(cfg.samples_per_prompt),
                "--temperature", str(cfg.temperature), "--max-new-tokens", str(cfg.max_new_tokens)])


def run(cfg: DemoConfig) -> Dict[str, object]:
    from megarlhf.recipes import dpo, ppo, reward_model, sft

    st = cfg.stages()
    times: Dict[str, float] = {}
    t0 = time.time()
    print(f"== 1/5 SFT on the built-in task -> {st['sft_checkpoint']}", flush=True)
    r_sft = sft.run(st["sft"])
    times["sft"] = time.time() - t0

    t = time.time()
    print(f"== 2/5 preference pairs from the SFT policy's samples -> {st['pairs']}", flush=True)
    sample_pairs(cfg.pairs, st)
    times["pairs"] = time.time() - t

    t = time.time()
    print("== 3/5 reward model", flush=True)
    r_rm = reward_model.run(st["rm"])
    times["rm"] = time.time() - t
    t = time.time()
    print("== 4/5 DPO", flush=True)
    r_dpo = dpo.run(st["dpo"])
    times["dpo"] = time.time() - t
    t = time.time()
    print("== 5/5 PPO", flush=True)
    r_ppo = ppo.run(st["ppo"])
    times["ppo"] = time.time() - t
    times["total"] = time.time() - t0

    history = ppo_history(st["ppo"].train.out_dir)
    results = {
        "sft_accuracy": r_sft.get("exact_match"),
        "dpo_accuracy": r_dpo.get("exact_match"),
        "ppo_accuracy": r_ppo.get("exact_match"),
        "rm_pair_accuracy": (r_rm.get("eval") or {}).get("accuracy"),
        "eval_problems": r_dpo.get("eval_prompts"),
        "ppo_score_curve": [h["score_mean"] for h in history],
        "ppo_train_accuracy_curve": [h.get("train_accuracy") for h in history],
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }
    path = os.path.join(cfg.out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    png = os.path.join(cfg.out_dir, "reward_curve.png")
    _plot(results, png)
    print()
    print("| stage | exact match (held-out) | other |")
    print("|---|---:|---|")
    print(f"| SFT | {_pct(results['sft_accuracy'])} | |")
    print(f"| reward model | | held-out pair accuracy {_pct(results['rm_pair_accuracy'])} |")
    print(f"| DPO | {_pct(results['dpo_accuracy'])} | |")
    curve = results["ppo_score_curve"]
    print(f"| PPO | {_pct(results['ppo_accuracy'])} | RM score {curve[0]:.2f} -> {curve[-1]:.2f} |")
    print(f"time: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items()))
    print(f"reward curve: {png}")
    print(path)
    return results


def ppo_history(out_dir: str) -> List[Dict[str, Any]]:
    """Every PPO step's record from the run's ``metrics.jsonl``, in step order: the steps
    of an earlier, resumed or already finished run included (this process may have run
    none of them); where a resumed run logged a step again, its last record."""
    steps: Dict[int, Dict[str, Any]] = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "score_mean" in row:
                steps[row["step"]] = row
    return [steps[k] for k in sorted(steps)]


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _plot(results: Dict[str, object], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = list(range(1, len(results["ppo_score_curve"]) + 1))
    lines = ax.plot(steps, results["ppo_score_curve"], label="reward-model score (mean)")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("score")
    acc = results["ppo_train_accuracy_curve"]
    if acc and acc[0] is not None:
        ax2 = ax.twinx()
        lines += ax2.plot(steps, acc, color="tab:orange", label="exact match of sampled answers")
        ax2.set_ylabel("exact match")
        ax2.set_ylim(0, 1)
    ax.set_title("PPO on the built-in task")
    ax.legend(lines, [l.get_label() for l in lines], loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
