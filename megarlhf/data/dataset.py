"""Tokenized datasets: chat-template tokenization, truncation filtering, train/eval split.

    cfg = DataConfig(sources=[SourceConfig(path="pairs.jsonl")], max_length=1024)
    data = build_dataset(cfg, "preference", template)   # -> TokenizedData
    data.train, data.eval                                # Hugging Face datasets.Dataset

Examples that would be truncated are dropped (as the paper does), counted per source
and reported; an empty result is an error. Hub sources are read from prepared copies in
``data.cache_dir`` (``megarlhf.data.hub``; ``megarlhf prepare-data`` fills it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megarlhf.data.chat import ChatTemplate
from megarlhf.data.hub import CACHE_ENV, HubCache
from megarlhf.data.load import DataError, LoadReport, SourceConfig, load_examples
from megarlhf.data.schemas import PREFERENCE_SCHEMAS, PairRule

__all__ = ["DataConfig", "TokenizedData", "build_dataset", "tokenize_example", "data_problems"]


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
    cache_dir: Optional[str] = None
    """Folder of the prepared copies of hub sources (Parquet + a manifest each), on storage
    every node of a job sees: ``megarlhf prepare-data`` fills it on a login node; a job that
    finds no copy downloads the source once (one process; the others wait and read it).
    Default: ``$MEGARLHF_DATA_CACHE``, else ``$XDG_CACHE_HOME/megarlhf/data``, else
    ``~/.cache/megarlhf/data``."""
    offline: bool = False
    """Never contact the hub: a hub source must already have a prepared copy in
    ``cache_dir`` (compute nodes without internet). ``HF_HUB_OFFLINE=1`` or
    ``HF_DATASETS_OFFLINE=1`` in the job's environment does the same."""


def data_problems(cfg: DataConfig, prefix: str = "data") -> List[str]:
    """Values of ``cfg`` that cannot work, each naming its key (checked before any data is
    read; NaN fails every range check)."""
    p: List[str] = []
    for name in ("max_length", "max_prompt_length"):
        if not getattr(cfg, name) > 0:
            p.append(f"{prefix}.{name}={getattr(cfg, name)} must be > 0")
    if not cfg.eval_size >= 0:
        p.append(f"{prefix}.eval_size={cfg.eval_size} must be >= 0")
    if not 0 <= cfg.seed < 2**32:
        p.append(f"{prefix}.seed={cfg.seed} must be in [0, 2**32)")
    rule = cfg.pair_rule
    if rule.rejected not in ("random", "lowest"):
        p.append(f"{prefix}.pair_rule.rejected={rule.rejected!r}: expected 'random' or 'lowest'")
    if not 0 <= rule.min_margin < float("inf"):
        p.append(f"{prefix}.pair_rule.min_margin={rule.min_margin} must be a finite number >= 0")
    if cfg.cache_dir is not None and not cfg.cache_dir.strip():
        p.append(f"{prefix}.cache_dir={cfg.cache_dir!r}: a folder, or null for ${CACHE_ENV} "
                 "(else ~/.cache/megarlhf/data)")
    for i, src in enumerate(cfg.sources):
        where = f"{prefix}.sources[{i}]"
        if not src.path:
            p.append(f"{where}.path is empty")
        if src.schema not in ("auto",) + PREFERENCE_SCHEMAS:
            p.append(f"{where}.schema={src.schema!r}: expected one of {('auto',) + PREFERENCE_SCHEMAS}")
        if src.max_samples is not None and not src.max_samples > 0:
            p.append(f"{where}.max_samples={src.max_samples} must be > 0 (or null: no cap)")
    return p


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
    problems = data_problems(cfg)
    if problems:
        raise DataError("invalid data config: " + "; ".join(problems))
    import datasets

    datasets.disable_progress_bars()
    examples, report = load_examples(cfg.sources, kind, skip_invalid=cfg.skip_invalid,
                                     dedup=cfg.dedup, seed=cfg.seed, rule=cfg.pair_rule,
                                     hub=HubCache.create(cfg.cache_dir, cfg.offline))
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
