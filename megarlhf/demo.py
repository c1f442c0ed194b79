"""The whole tiny pipeline on the built-in task, as the paper runs it at scale:

    SFT -> preference pairs from the SFT policy's own samples -> reward model -> DPO and PPO

    megarlhf demo [key=value ...]        # e.g. out_dir=runs/demo ppo.train.max_steps=40

Each stage is the ordinary recipe (``megarlhf sft``, ``pairs``, ``rm``, ``dpo``, ``ppo``)
with its own config section here; the pipeline only wires one stage's output into the
next stage's input under ``out_dir``, and ``seed`` (when set) seeds every stage.

The task has two held-out splits with no question in common with each other or with any
training file: the stages evaluate themselves on ``validation.jsonl`` (where settings are
chosen: every ``eval_interval`` and final figure, PPO's curve), and only after all stages
is each final policy (SFT, DPO, PPO) scored greedily on the test split ``eval.jsonl``,
problem by problem, in this process. DPO and PPO are compared with SFT on the same test
problems: the paired difference of exact match with its 95% paired-bootstrap interval and
the exact McNemar p-value (:mod:`megarlhf.eval.paired`).

At the end it prints a table (per stage: test exact match, the difference to SFT with its
interval and p-value, the validation exact match; the reward model's held-out pair
accuracy), writes ``results.json`` (every figure, the validation curve of PPO and the
stage times) and ``reward_curve.png`` (PPO's reward-model score per step and its
validation exact match) in ``out_dir``, and prints the results path last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from megarlhf.data.dataset import DataConfig
from megarlhf.data.task import TaskConfig
from megarlhf.data.load import SourceConfig
from megarlhf.recipes.common import ExactMatch
from megarlhf.recipes.dpo import DPOConfig, DPOLossConfig
from megarlhf.recipes.pairs_common import PairsTrainConfig
from megarlhf.recipes.ppo import PPOConfig, PPOLossConfig, PPOTrainConfig, RolloutConfig
from megarlhf.train.loop import EvalConfig
from megarlhf.recipes.reward_model import RMConfig
from megarlhf.recipes.sft import SFTConfig
from megarlhf.train.metrics import LogConfig
from megarlhf.train.schedule import ScheduleConfig

__all__ = ["DemoConfig", "PairsConfig", "run", "sample_pairs", "score_on_test_split", "collect_results", "table",
           "ppo_history", "ppo_eval_curve"]


@dataclass(frozen=True)
class PairsConfig:
    """Preference pairs sampled from the SFT policy (``megarlhf pairs``)."""

    num_prompts: int = 12000
    """Prompts of the task's prompt file used (its first rows)."""
    samples_per_prompt: int = 2
    temperature: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0
    """Seed of the sampling and of the choice among wrong answers (``megarlhf pairs --seed``)."""


def _quiet() -> LogConfig:
    return LogConfig(interval=50, progress_bar=True)


def _sft() -> SFTConfig:
    # Sums of up to four numbers up to 6: one epoch teaches the arithmetic well enough that
    # a reward model on the same network learns to check it from a few thousand pairs
    # (numbers up to 12: 55-60% pair accuracy at the same cost). A test split of 2,000
    # problems keeps the paired intervals near +-1.5 points.
    return SFTConfig(task=TaskConfig(max_value=6, max_steps=3, num_prompts=12000, num_eval=2000,
                                     num_validation=1000),
                     eval=EvalConfig(num_prompts=1000))


@dataclass(frozen=True)
class DemoConfig:
    """Stage configs; paths between stages are filled in under ``out_dir``."""

    out_dir: str = "runs/demo"
    seed: Optional[int] = None
    """When set, the seed of every stage: SFT, pair sampling, RM, DPO, PPO (``train.seed``,
    ``pairs.seed``); the task and its held-out problems stay the same."""
    sft: SFTConfig = field(default_factory=_sft)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    rm: RMConfig = field(default_factory=lambda: RMConfig(
        data=DataConfig(max_length=128, max_prompt_length=96, eval_size=500),
        train=PairsTrainConfig(global_batch_size=32, micro_batch_size=16, seq_length=128, epochs=2.0,
                         lr=5e-4, min_lr=5e-5, packing=True),
        # the mean of per-token rewards: a wrong step is one token among ~20
        pooling="mean", log=_quiet()))
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(
        data=DataConfig(max_length=128, max_prompt_length=96),
        # RPO: plain DPO unlearns the arithmetic on pairs that differ in a digit or two
        dpo=DPOLossConfig(nll_weight=1.0),
        train=PairsTrainConfig(global_batch_size=32, micro_batch_size=16, seq_length=128, epochs=1.0, lr=1e-4,
                         min_lr=0.0, schedule=ScheduleConfig(style="linear", warmup_ratio=0.1), packing=True),
        eval=EvalConfig(num_prompts=1000), log=_quiet()))
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(
        data=DataConfig(max_length=96, max_prompt_length=96),
        rollout=RolloutConfig(prompts_per_step=64, samples_per_prompt=2, max_new_tokens=48, temperature=0.7,
                              max_batch=128),
        # leave-one-out baseline over each prompt's two samples; a KL coefficient sized to
        # the reward model's score spread (~2.5 in a batch against the exact reward's 0.5)
        ppo=PPOLossConfig(minibatch_size=64, kl_coef=0.2, score_baseline="loo"),
        train=PPOTrainConfig(max_steps=40, micro_batch_size=16, actor_lr=2e-5, critic_lr=1e-4, packing=True,
                             schedule=ScheduleConfig(style="linear", warmup_ratio=0.1), eval_interval=10),
        eval=EvalConfig(num_prompts=1000, at_start=True), log=dataclasses.replace(_quiet(), interval=5)))

    def world_size(self) -> int:
        return 1

    def stages(self) -> Dict[str, object]:
        """The stage configs with their inputs and outputs wired under ``out_dir``, each
        stage evaluating on the task's validation split, every one seeded by ``seed`` when
        it is set; also the pair sampling's config and the paths between stages."""
        o, seed = self.out_dir, self.seed
        task = os.path.join(o, "sft", "task")
        validation = os.path.join(task, "validation.jsonl")
        sft_ckpt = os.path.join(o, "sft", "checkpoint")
        pairs = os.path.join(o, "pairs", "policy_pairs.jsonl")
        rm_final = os.path.join(o, "rm", "final")
        sft = dataclasses.replace(self.sft, train=_seeded(self.sft.train, seed, out_dir=os.path.join(o, "sft")),
                                  eval=dataclasses.replace(self.sft.eval, prompts=validation))
        rm = dataclasses.replace(
            self.rm, data=dataclasses.replace(self.rm.data, sources=[SourceConfig(path=pairs)]),
            train=_seeded(self.rm.train, seed, init_from=sft_ckpt, out_dir=os.path.join(o, "rm")))
        dpo = dataclasses.replace(
            self.dpo, data=dataclasses.replace(self.dpo.data, sources=[SourceConfig(path=pairs)]),
            train=_seeded(self.dpo.train, seed, init_from=sft_ckpt, out_dir=os.path.join(o, "dpo")),
            eval=dataclasses.replace(self.dpo.eval, prompts=validation))
        ppo = dataclasses.replace(
            self.ppo, actor=dataclasses.replace(self.ppo.actor, init_from=sft_ckpt),
            critic=dataclasses.replace(self.ppo.critic, init_from=rm_final),
            reward=dataclasses.replace(self.ppo.reward, init_from=rm_final),
            data=dataclasses.replace(self.ppo.data, sources=[SourceConfig(path=os.path.join(task, "prompts.jsonl"))]),
            train=_seeded(self.ppo.train, seed, out_dir=os.path.join(o, "ppo")),
            eval=dataclasses.replace(self.ppo.eval, prompts=validation))
        sampling = self.pairs if seed is None else dataclasses.replace(self.pairs, seed=seed)
        return {"sft": sft, "rm": rm, "dpo": dpo, "ppo": ppo, "pairs_sampling": sampling, "task": task,
                "pairs": pairs, "sft_checkpoint": sft_ckpt, "validation": validation,
                "test": os.path.join(task, "eval.jsonl")}

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
        for key, value in (("seed", self.seed), ("pairs.seed", self.pairs.seed)):
            if value is not None and not 0 <= value < 2**32:
                problems.append(f"{key}={value} must be in [0, 2**32)")
        if problems:
            raise ConfigError(problems)


def _seeded(train, seed: Optional[int], **paths):
    """A stage's loop config with its paths, and ``seed`` when it is set."""
    return dataclasses.replace(train, **paths, **({} if seed is None else {"seed": seed}))


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
                "--temperature", str(cfg.temperature), "--max-new-tokens", str(cfg.max_new_tokens),
                "--seed", str(cfg.seed)])


def run(cfg: DemoConfig) -> Dict[str, object]:
    from megarlhf.recipes import dpo, ppo, reward_model, sft

    st = cfg.stages()
    times: Dict[str, float] = {}
    t0 = time.time()
    print(f"== 1/6 SFT on the built-in task -> {st['sft_checkpoint']}", flush=True)
    r_sft = sft.run(st["sft"])
    times["sft"] = time.time() - t0

    t = time.time()
    print(f"== 2/6 preference pairs from the SFT policy's samples -> {st['pairs']}", flush=True)
    sample_pairs(st["pairs_sampling"], st)
    times["pairs"] = time.time() - t

    t = time.time()
    print("== 3/6 reward model", flush=True)
    r_rm = reward_model.run(st["rm"])
    times["rm"] = time.time() - t
    t = time.time()
    print("== 4/6 DPO", flush=True)
    r_dpo = dpo.run(st["dpo"])
    times["dpo"] = time.time() - t
    t = time.time()
    print("== 5/6 PPO", flush=True)
    r_ppo = ppo.run(st["ppo"])
    times["ppo"] = time.time() - t

    t = time.time()
    print(f"== 6/6 each final policy on the test split ({st['test']})", flush=True)
    test = score_on_test_split({"sft": (r_sft["checkpoint"], st["sft"].eval), "dpo": (r_dpo["final"], st["dpo"].eval),
                                "ppo": (r_ppo["final"], st["ppo"].eval)}, st["test"], st["sft"].task.num_eval)
    for name, em in test.items():
        print(f"{name}: exact match {em.accuracy:.1%} on {em.n} test problems (greedy, {em.seconds:.1f} s)",
              flush=True)
    times["test_eval"] = time.time() - t
    times["total"] = time.time() - t0

    out = st["ppo"].train.out_dir
    results = collect_results({"sft": r_sft, "rm": r_rm, "dpo": r_dpo, "ppo": r_ppo}, test,
                              ppo_history(out), ppo_eval_curve(out), times, cfg.seed)
    path = os.path.join(cfg.out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    png = os.path.join(cfg.out_dir, "reward_curve.png")
    _plot(results, png)
    print()
    print(table(results))
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items()))
    print(f"reward curve: {png}")
    print(path)
    return results


def score_on_test_split(policies: Dict[str, Tuple[str, EvalConfig]], prompts: str,
                        num_prompts: int) -> Dict[str, ExactMatch]:
    """Each named checkpoint's greedy exact match, problem by problem, on the first
    ``num_prompts`` problems of ``prompts``, generated as its stage's evaluation generates
    (``max_new_tokens``, ``batch_size``), one model at a time in this process."""
    from megarlhf.config import ParallelConfig
    from megarlhf.parallel import DistEnv, destroy, init_distributed, initialize_model_parallel
    from megarlhf.recipes.common import checkpoint_exact_match

    init_distributed(DistEnv.from_environ())
    try:
        mp = initialize_model_parallel(ParallelConfig())
        return {name: checkpoint_exact_match(ckpt, mp, prompts, num_prompts, ev.max_new_tokens, ev.batch_size)
                for name, (ckpt, ev) in policies.items()}
    finally:
        destroy()


def collect_results(stages: Dict[str, Dict[str, Any]], test: Dict[str, ExactMatch], history: List[Dict[str, Any]],
                    eval_curve: List[List[float]], times: Dict[str, float], seed: Optional[int]) -> Dict[str, object]:
    """The figures of ``results.json``: the stages' own results (``stages``: sft, rm, dpo,
    ppo; their figures on the validation split), the test split's outcomes (``test``: sft,
    dpo, ppo) with the paired difference of DPO and of PPO to SFT, PPO's steps
    (``history``) and validation curve (``eval_curve``), the stage times and the seed."""
    from megarlhf.eval.paired import paired_difference

    diffs = {name: paired_difference(test["sft"].outcomes, test[name].outcomes, level=0.95)
             for name in ("dpo", "ppo")}
    out: Dict[str, object] = {f"{name}_accuracy": test[name].accuracy for name in ("sft", "dpo", "ppo")}
    out["rm_pair_accuracy"] = (stages["rm"].get("eval") or {}).get("accuracy")
    out["eval_problems"] = test["sft"].n
    for name in ("dpo", "ppo"):
        out[f"{name}_minus_sft"] = diffs[name]
        out[f"{name}_minus_sft_ci95"] = [diffs[name]["low"], diffs[name]["high"]]
    for name in ("sft", "dpo", "ppo"):
        out[f"{name}_validation_accuracy"] = stages[name].get("exact_match")
    out["validation_problems"] = stages["sft"].get("eval_prompts")
    out["ppo_score_curve"] = [h["score_mean"] for h in history]
    out["ppo_train_accuracy_curve"] = [h.get("train_accuracy") for h in history]
    out["ppo_eval_curve"] = eval_curve
    out["seed"] = seed
    out["seconds"] = {k: round(v, 1) for k, v in times.items()}
    return out


def table(results: Dict[str, Any]) -> str:
    """The markdown table the demo prints: per stage, exact match on the test split, its
    paired difference to SFT in points (95% interval, McNemar p), exact match on the
    validation split; the reward model's held-out pair accuracy."""
    r = results
    curve = r["ppo_score_curve"]
    score = f"RM score {curve[0]:.2f} -> {curve[-1]:.2f}" if curve else ""
    return "\n".join([
        f"| stage | exact match (test, {r['eval_problems']} problems) | minus SFT, 95% interval (paired bootstrap), "
        "McNemar p | validation exact match | other |",
        "|---|---:|---|---:|---|",
        f"| SFT | {_pct(r['sft_accuracy'])} | | {_pct(r['sft_validation_accuracy'])} | |",
        f"| reward model | | | | held-out pair accuracy {_pct(r['rm_pair_accuracy'])} |",
        f"| DPO | {_pct(r['dpo_accuracy'])} | {_difference(r['dpo_minus_sft'])} | "
        f"{_pct(r['dpo_validation_accuracy'])} | |",
        f"| PPO | {_pct(r['ppo_accuracy'])} | {_difference(r['ppo_minus_sft'])} | "
        f"{_pct(r['ppo_validation_accuracy'])} | {score} |",
    ])


def _difference(d: Dict[str, float]) -> str:
    """``+3.2 [+0.8, +5.6], p=0.012``: a paired difference in points."""
    p = d["p_mcnemar"]
    p_text = f"p={p:.3f}" if p >= 0.001 else f"p={p:.1e}"
    return f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}], {p_text}"


def _rows_per_step(out_dir: str, key: str) -> List[Dict[str, Any]]:
    """The run's ``metrics.jsonl`` rows that carry ``key``, in step order; where a resumed
    run logged a step again, its last record."""
    steps: Dict[int, Dict[str, Any]] = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if key in row:
                steps[row["step"]] = row
    return [steps[k] for k in sorted(steps)]


def ppo_history(out_dir: str) -> List[Dict[str, Any]]:
    """Every PPO step's record from the run's ``metrics.jsonl``, in step order: the steps
    of an earlier, resumed or already finished run included (this process may have run
    none of them); where a resumed run logged a step again, its last record."""
    return _rows_per_step(out_dir, "score_mean")


def ppo_eval_curve(out_dir: str) -> List[List[float]]:
    """``[step, exact match]`` of every evaluation of a PPO run (its own prompts: the
    validation split in the demo), from its ``metrics.jsonl``: the one before the first
    step as step 0, a re-logged step's last."""
    return [[row["step"], row["exact_match"]] for row in _rows_per_step(out_dir, "exact_match")]


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _plot(results: Dict[str, object], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    steps = list(range(1, len(results["ppo_score_curve"]) + 1))
    lines = ax.plot(steps, results["ppo_score_curve"], label="reward-model score (mean)")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("reward-model score")
    ax2 = ax.twinx()
    evals = results["ppo_eval_curve"]
    if evals:
        lines += ax2.plot([s for s, _ in evals], [a for _, a in evals], "o--", color="tab:green",
                          label=f"exact match, validation ({results['validation_problems']} problems, greedy)")
    acc = results["ppo_train_accuracy_curve"]
    if acc and acc[0] is not None:
        lines += ax2.plot(steps, acc, color="tab:orange", alpha=0.7,
                          label="exact match of sampled answers (training prompts)")
    ax2.set_ylabel("exact match")
    ax2.set_ylim(0, 1)
    ax.set_title("PPO on the built-in task (exact match on the validation split)", fontsize=10)
    ax.legend(lines, [l.get_label() for l in lines], loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
