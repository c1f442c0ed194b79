"""The paper's comparison at tiny scale, in one command, on the built-in task:

    SFT; DPO; PPO scored by a small reward model; PPO scored by a larger reward model

    megarlhf compare [key=value ...]     # e.g. seeds=[1,2,3] out_dir=runs/compare

One SFT policy and one set of preference pairs sampled from it feed everything. The small
reward model starts from the SFT policy itself; the larger one (``large_rm``, a wider and
deeper Llama) starts from its own SFT on the same task and tokenizer, and is trained on the
same pairs. Then, for every seed, DPO, PPO with the small RM, and PPO with the large RM (its
critic is the small RM, as the paper's flagship puts a 13B critic beside a 70B scorer). All
are evaluated by exact match on the same held-out problems (the task's validation split, as
each stage of ``megarlhf demo`` evaluates itself). Every stage is the ordinary
recipe; stage configs are those of ``megarlhf demo`` (same keys: ``sft.*``, ``rm.*``,
``dpo.*``, ``ppo.*``).

Writes ``comparison.json`` (every number, per seed), ``comparison.md`` (the table) and
``comparison.png`` (exact match per method with each seed, and the reward curves) in
``out_dir``, and prints the JSON path last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megarlhf.config import ModelConfig, preset
from megarlhf.demo import DemoConfig

__all__ = ["CompareConfig", "run", "summarize", "ordering"]

METHODS = ("sft", "dpo", "ppo_small_rm", "ppo_large_rm")
LABELS = {"sft": "SFT", "dpo": "DPO", "ppo_small_rm": "PPO, small RM", "ppo_large_rm": "PPO, large RM"}


def _large_rm() -> ModelConfig:
    # About 3x the tiny policy's non-embedding parameters: 6 layers of width 384.
    return preset("tiny", vocab_size=0, max_position_embeddings=256, params_dtype="auto", num_layers=6,
                  hidden_size=384, ffn_hidden_size=1024, num_attention_heads=12, num_query_groups=4)


@dataclass(frozen=True)
class CompareConfig(DemoConfig):
    """The demo's stages plus a larger reward model and several seeds."""

    out_dir: str = "runs/compare"
    large_rm: ModelConfig = field(default_factory=_large_rm)
    """Shape of the larger reward model (its SFT backbone is trained with ``sft.*``)."""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """Seeds of DPO and of both PPO runs (SFT, pairs and reward models are trained once)."""

    def validate(self) -> None:
        from megarlhf.config import ConfigError
        from megarlhf.config.validate import model_problems

        problems: List[str] = []
        try:
            super().validate()
        except ConfigError as e:
            problems += e.problems
        vocab = self.large_rm.vocab_size or 1  # 0: taken from the tokenizer, as in SFT
        problems += model_problems(dataclasses.replace(self.large_rm, vocab_size=vocab), "large_rm")
        if not self.seeds:
            problems.append("seeds is empty: give at least one seed")
        elif len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds={list(self.seeds)} repeats a seed")
        if problems:
            raise ConfigError(problems)


def summarize(per_seed: Dict[str, List[Optional[float]]]) -> Dict[str, Dict[str, Optional[float]]]:
    """Per method: mean, spread (max - min) and standard deviation over seeds of its exact
    match; a method with one value has spread 0 and no deviation."""
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for method, values in per_seed.items():
        xs = [v for v in values if v is not None]
        if not xs:
            out[method] = {"mean": None, "spread": None, "std": None, "n": 0}
            continue
        out[method] = {"mean": statistics.fmean(xs), "spread": max(xs) - min(xs),
                       "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}
    return out


def ordering(summary: Dict[str, Dict[str, Optional[float]]]) -> List[str]:
    """The paper's qualitative claims, each stated as held or not at these numbers."""
    m = {k: v["mean"] for k, v in summary.items()}

    def gap(a: str, b: str) -> str:
        return f"{m[a] - m[b]:+.1%}"

    lines = []
    if None in (m.get("sft"), m.get("dpo"), m.get("ppo_small_rm"), m.get("ppo_large_rm")):
        return ["(some methods were not evaluated: no ordering to check)"]
    best_ppo = max(m["ppo_small_rm"], m["ppo_large_rm"])
    for claim, ok, detail in (
            ("PPO >= DPO", best_ppo >= m["dpo"], f"best PPO {best_ppo:.1%} vs DPO {m['dpo']:.1%}"),
            ("DPO > SFT", m["dpo"] > m["sft"], gap("dpo", "sft")),
            ("PPO > SFT", best_ppo > m["sft"], f"{best_ppo - m['sft']:+.1%}"),
            ("a larger RM helps PPO", m["ppo_large_rm"] > m["ppo_small_rm"], gap("ppo_large_rm", "ppo_small_rm"))):
        lines.append(f"{claim}: {'holds' if ok else 'does not hold'} ({detail})")
    return lines


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1%}"


def table(results: Dict[str, object]) -> str:
    s, per_seed, rm = results["summary"], results["exact_match"], results["rm_pair_accuracy"]
    rows = ["| method | exact match (mean) | spread over seeds | per seed | reward model pair accuracy |",
            "|---|---:|---:|---|---|"]
    rm_col = {"sft": "", "dpo": "", "ppo_small_rm": f"small: {_pct(rm['small'])}",
              "ppo_large_rm": f"large: {_pct(rm['large'])}"}
    for method in METHODS:
        seeds = ", ".join(_pct(v) for v in per_seed[method])
        rows.append(f"| {LABELS[method]} | {_pct(s[method]['mean'])} | {_pct(s[method]['spread'])} | "
                    f"{seeds} | {rm_col[method]} |")
    return "\n".join(rows)


def run(cfg: CompareConfig) -> Dict[str, object]:
    from megarlhf.data.chat import ChatTemplateConfig
    from megarlhf.models.checkpoint import read_meta
    from megarlhf.demo import sample_pairs
    from megarlhf.recipes.pairs_common import recorded_template
    from megarlhf.recipes import dpo, ppo, reward_model, sft

    o = cfg.out_dir
    st = cfg.stages()
    times: Dict[str, float] = {}
    t0 = time.time()

    def stage(name: str, title: str, fn, *args):
        print(f"== {title}", flush=True)
        t = time.time()
        out = fn(*args)
        times[name] = times.get(name, 0.0) + time.time() - t
        return out

    r_sft = stage("sft", f"SFT policy -> {st['sft_checkpoint']}", sft.run, st["sft"])
    stage("pairs", f"preference pairs from the SFT policy's samples -> {st['pairs']}",
          sample_pairs, st["pairs_sampling"], st)
    r_rm = stage("rm_small", "small reward model (from the SFT policy)", reward_model.run, st["rm"])
    sft_meta = read_meta(st["sft_checkpoint"])
    # The larger backbone starts from scratch: it takes the policy's tokenizer and the chat
    # template the policy was trained in, so both reward models read the same text.
    sft_large = dataclasses.replace(
        st["sft"], model=cfg.large_rm,
        tokenizer=dataclasses.replace(st["sft"].tokenizer, path=sft_meta.tokenizer),
        chat_template=ChatTemplateConfig(**recorded_template(sft_meta)),
        train=dataclasses.replace(st["sft"].train, out_dir=os.path.join(o, "sft_large")))
    stage("sft_large", "SFT of the larger reward model's backbone", sft.run, sft_large)
    rm_large_cfg = dataclasses.replace(st["rm"], train=dataclasses.replace(
        st["rm"].train, init_from=os.path.join(o, "sft_large", "checkpoint"), out_dir=os.path.join(o, "rm_large")))
    r_rm_large = stage("rm_large", "large reward model (same pairs)", reward_model.run, rm_large_cfg)

    small = os.path.join(st["rm"].train.out_dir, "final")
    large = os.path.join(rm_large_cfg.train.out_dir, "final")
    per_seed: Dict[str, List[Optional[float]]] = {m: [] for m in METHODS}
    per_seed["sft"] = [r_sft.get("exact_match")]
    curves: Dict[str, List[List[float]]] = {"ppo_small_rm": [], "ppo_large_rm": []}
    for seed in cfg.seeds:
        d = st["dpo"]
        r = stage("dpo", f"DPO, seed {seed}", dpo.run, dataclasses.replace(d, train=dataclasses.replace(
            d.train, seed=seed, out_dir=os.path.join(o, f"dpo_s{seed}"))))
        per_seed["dpo"].append(r.get("exact_match"))
        for method, scorer in (("ppo_small_rm", small), ("ppo_large_rm", large)):
            p = st["ppo"]
            pc = dataclasses.replace(
                p, critic=dataclasses.replace(p.critic, init_from=small),
                reward=dataclasses.replace(p.reward, init_from=scorer),
                train=dataclasses.replace(p.train, seed=seed, out_dir=os.path.join(o, f"{method}_s{seed}")))
            r = stage(method, f"{LABELS[method]}, seed {seed}", ppo.run, pc)
            per_seed[method].append(r.get("exact_match"))
            curves[method].append([h["score_mean"] for h in r["history"]])
    times["total"] = time.time() - t0

    results: Dict[str, object] = {
        "exact_match": per_seed, "summary": summarize(per_seed), "seeds": list(cfg.seeds),
        "rm_pair_accuracy": {"small": (r_rm.get("eval") or {}).get("accuracy"),
                             "large": (r_rm_large.get("eval") or {}).get("accuracy")},
        "eval_problems": st["ppo"].eval.num_prompts, "score_curves": curves,
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }
    results["ordering"] = ordering(results["summary"])
    os.makedirs(o, exist_ok=True)
    md = table(results)
    with open(os.path.join(o, "comparison.md"), "w") as f:
        f.write(md + "\n\n" + "\n".join(f"- {line}" for line in results["ordering"]) + "\n")
    path = os.path.join(o, "comparison.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    png = os.path.join(o, "comparison.png")
    _plot(results, png)
    print()
    print(md)
    print()
    for line in results["ordering"]:
        print(line)
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items()))
    print(f"plot: {png}")
    print(path)
    return results


def _plot(results: Dict[str, object], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    s, per_seed = results["summary"], results["exact_match"]
    xs = range(len(METHODS))
    ax.bar(xs, [s[m]["mean"] or 0.0 for m in METHODS], color="lightsteelblue")
    for i, m in enumerate(METHODS):
        vals = [v for v in per_seed[m] if v is not None]
        ax.plot([i] * len(vals), vals, "o", color="black", markersize=3)
    ax.set_xticks(list(xs), [LABELS[m] for m in METHODS], fontsize=8)
    ax.set_ylabel("exact match, held-out")
    ax.set_ylim(0, 1)
    ax.set_title("mean over seeds (dots: each seed)", fontsize=9)
    for m, color in (("ppo_small_rm", "tab:blue"), ("ppo_large_rm", "tab:orange")):
        for j, curve in enumerate(results["score_curves"][m]):
            bx.plot(range(1, len(curve) + 1), curve, color=color, alpha=0.7,
                    label=LABELS[m] if j == 0 else None)
    bx.set_xlabel("PPO step")
    bx.set_ylabel("score of its own reward model")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
