"""Tokenized datasets: chat-template tokenization, truncation filtering, train/eval split.

    cfg = DataConfig(sources=[SourceConfig(path="pairs.jsonl")], max_length=1024)
    data = build_dataset(cfg, "preference", template)   # -> TokenizedData
    data.train, data.eval                                # Hugging Face datasets.Dataset

Examples that would be truncated are dropped (as the paper does), counted per source
and reported; an empty result is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megarlhf.data.chat import ChatTemplate
from megarlhf.data.load import DataError, LoadReport, SourceConfig, load_examples
from megarlhf.data.schemas import PairRule

__all__ = ["DataConfig", "TokenizedData", "build_dataset", "tokenize_example"]


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they are filtered and split."""

    sources: List[SourceConfig] = field(default_factory=list)
    """Data sources (mixed in this order; each may have its own cap)."""
    skip_invalid: bool = False
    """Skip malformed rows (counted by reason) instead of stopping at the first."""
    dedup: bool = True
    """Drop exact duplicates (same prompt and responses) across all sources."""
    max_length: int = 1024
    """Longest tokenized conversation (prompt + response) kept; longer ones are dropped."""
    max_prompt_length: int = 512
    """Longest tokenized prompt kept; longer ones are dropped."""
    eval_size: int = 0
    """Examples held out for evaluation (after shuffling by seed)."""
    seed: int = 1
    """Seed of shuffling, capping and random pair choices."""
    pair_rule: PairRule = field(default_factory=PairRule)
    """How rated completions become pairs (UltraFeedback, Nectar, HelpSteer)."""


@dataclass
class TokenizedData:
    train: Any  # datasets.Dataset
    eval: Optional[Any]
    report: LoadReport

    def summary(self) -> List[str]:
        n_eval = 0 if self.eval is None else len(self.eval)
        return self.report.lines() + [f"total: {len(self.train)} train, {n_eval} eval"]


def tokenize_example(ex: Dict[str, Any], kind: str, template: ChatTemplate) -> Dict[str, Any]:
    """Token ids (and loss masks over assistant tokens) for one normalized example."""
    if kind == "sft":
        ids, mask = template.encode(ex["messages"])
        first = mask.index(True) if True in mask else len(ids)
        return {"input_ids": ids, "loss_mask": mask, "prompt_len": first, "length": len(ids)}
    prompt_ids = template.encode_prompt(ex["prompt"])
    if kind == "prompts":
        return {"prompt_ids": prompt_ids, "prompt_len": len(prompt_ids), "length": len(prompt_ids)}
    out: Dict[str, Any] = {"prompt_len": len(prompt_ids)}
    for side in ("chosen", "rejected"):
        ids, mask = template.encode(ex["prompt"] + [{"role": "assistant", "content": ex[side]}],
                                    end_at_stop=True)
        out[f"{side}_ids"], out[f"{side}_mask"] = ids, mask
    out["length"] = max(len(out["chosen_ids"]), len(out["rejected_ids"]))
    return out


def build_dataset(cfg: DataConfig, kind: str, template: ChatTemplate) -> TokenizedData:
    import datasets

    datasets.disable_progress_bars()
    examples, report = load_examples(cfg.sources, kind, skip_invalid=cfg.skip_invalid,
                                     dedup=cfg.dedup, seed=cfg.seed, rule=cfg.pair_rule)
    ds = datasets.Dataset.from_list(examples)
    ds = ds.map(lambda ex: tokenize_example(ex, kind, template), desc=None)
    lengths, prompt_lens, sources = ds["length"], ds["prompt_len"], ds["source"]
    keep = [l <= cfg.max_length and p <= cfg.max_prompt_length
            for l, p in zip(lengths, prompt_lens)]
    by_name = {s.name: s for s in report.sources}
    for ok, src in zip(keep, sources):
        if not ok:
            by_name[src].truncated += 1
            by_name[src].kept -= 1
    ds = ds.select([i for i, ok in enumerate(keep) if ok])
    if len(ds) == 0:
        raise DataError("no examples left after dropping those longer than max_length="
                        f"{cfg.max_length} / max_prompt_length={cfg.max_prompt_length}: "
                        + " | ".join(report.lines()))
    ds = ds.shuffle(seed=cfg.seed).flatten_indices()
    if cfg.eval_size:
        if cfg.eval_size >= len(ds):
            raise DataError(f"data.eval_size={cfg.eval_size} leaves no training examples "
                            f"({len(ds)} in all)")
        return TokenizedData(train=ds.select(range(cfg.eval_size, len(ds))),
                             eval=ds.select(range(cfg.eval_size)), report=report)
    return TokenizedData(train=ds, eval=None, report=report)
