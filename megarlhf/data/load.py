"""Reading sources into normalized, validated, deduplicated examples.

    examples, report = load_examples(cfg.data, kind="preference")

Sources are local JSONL / JSON / Parquet files or Hugging Face hub names (read with
``datasets.load_dataset``; only where the cluster can reach a hub). A malformed row
stops loading with an error naming the file, row and field, unless ``skip_invalid`` is
set: then it is skipped and counted by reason. Duplicates and rows beyond a source's cap
are counted too. Nothing is dropped without appearing in the report.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from megarlhf.data.schemas import (PREFERENCE_SCHEMAS, PairRule, RowError, detect_schema,
                                   group_helpsteer, parse_hh_row, parse_nectar_row,
                                   parse_pairs_row, parse_prompt_row, parse_sft_row,
                                   parse_ultrafeedback_row)

__all__ = ["SourceConfig", "DataError", "SourceReport", "LoadReport", "read_rows", "load_examples",
           "HELPSTEER_ASPECTS"]

HELPSTEER_ASPECTS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
KINDS = ("preference", "prompts", "sft")


@dataclass(frozen=True)
class SourceConfig:
    """One data source."""

    path: str = ""
    """A local ``.jsonl`` / ``.json`` / ``.parquet`` file, or a Hugging Face hub dataset name."""
    schema: str = "auto"
    """Preference schema: ``auto`` (from the keys), ``pairs``, ``ultrafeedback``,
    ``hh_rlhf``, ``nectar`` or ``helpsteer``. Ignored for prompt and SFT data."""
    split: str = "train"
    """Split of a hub dataset."""
    name: Optional[str] = None
    """Label in reports (default: the file name)."""
    max_samples: Optional[int] = None
    """Cap on examples kept from this source after deduplication, chosen by seed (the
    paper's "Mix" cuts every source to 60,908 pairs)."""
    aspects: Optional[List[str]] = None
    """Aspects averaged for ``ultrafeedback`` (default: all annotated) and ``helpsteer``
    (default: helpfulness, correctness, coherence, complexity, verbosity)."""
    reference_field: str = "reference"
    """Field holding a prompt's reference answer (verifiable tasks)."""

    @property
    def label(self) -> str:
        return self.name or os.path.basename(self.path.rstrip("/")) or self.path


class DataError(ValueError):
    """Data that cannot be loaded as configured."""


@dataclass
class SourceReport:
    name: str
    rows: int = 0
    kept: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    capped: int = 0
    truncated: int = 0

    def line(self) -> str:
        parts = [f"{self.name}: {self.rows} rows -> {self.kept} kept"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        for what in ("duplicates", "capped", "truncated"):
            if getattr(self, what):
                parts.append(f"{what} {getattr(self, what)}")
        return "; ".join(parts)


@dataclass
class LoadReport:
    sources: List[SourceReport] = field(default_factory=list)

    def lines(self) -> List[str]:
        return [s.line() for s in self.sources]

    def total_kept(self) -> int:
        return sum(s.kept for s in self.sources)


def _is_local(path: str) -> bool:
    """Files and paths that look like files are local; anything else is a hub name."""
    return (os.path.exists(path) or path.endswith((".jsonl", ".json", ".parquet"))
            or path.startswith(("/", "./", "../")))


def read_rows(src: SourceConfig) -> Iterator[Tuple[int, Any]]:
    """``(row number, dict)`` for each row; JSONL rows are numbered by line (1-based),
    JSON and Parquet rows by position (0-based). Invalid JSON is yielded as a RowError."""
    path = src.path
    if not path:
        raise DataError("data source without a path")
    if _is_local(path):
        if not os.path.isfile(path):
            raise DataError(f"data file not found: {path}")
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue  # blank lines are not rows
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        yield lineno, RowError("<json>", f"invalid JSON: {e.msg} (column {e.colno})",
                                               "invalid_json")
                        continue
                    yield lineno, row if isinstance(row, dict) else RowError(
                        "<row>", f"expected a JSON object, got {type(row).__name__}", "wrong_type")
            return
        if path.endswith(".json"):
            try:
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
            if isinstance(doc, dict) and isinstance(doc.get("data"), list):
                doc = doc["data"]
            if not isinstance(doc, list):
                raise DataError(f"{path}: expected a JSON array of rows (or {{\"data\": [...]}})")
            for i, row in enumerate(doc):
                yield i, row if isinstance(row, dict) else RowError(
                    "<row>", f"expected a JSON object, got {type(row).__name__}", "wrong_type")
            return
        if path.endswith(".parquet"):
            import datasets

            ds = datasets.load_dataset("parquet", data_files=path, split="train")
            for i, row in enumerate(ds):
                yield i, row
            return
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")
    import datasets  # a hub dataset

    try:
        ds = datasets.load_dataset(path, split=src.split)
    except Exception as e:
        raise DataError(f"cannot load hub dataset {path!r} (split {src.split!r}): {e}") from e
    for i, row in enumerate(ds):
        yield i, row


def _parser(kind: str, src: SourceConfig, first_row: Dict[str, Any], rule: PairRule,
            rng: random.Random) -> Tuple[str, Optional[Callable[[Dict[str, Any]], Dict[str, Any]]]]:
    if kind == "prompts":
        return "prompts", lambda r: parse_prompt_row(r, src.reference_field)
    if kind == "sft":
        return "sft", parse_sft_row
    schema = src.schema
    if schema == "auto":
        schema = detect_schema(first_row)
    if schema not in PREFERENCE_SCHEMAS:
        raise DataError(f"{src.path}: schema {schema!r}: expected one of {('auto',) + PREFERENCE_SCHEMAS}")
    if schema == "pairs":
        return schema, parse_pairs_row
    if schema == "hh_rlhf":
        return schema, parse_hh_row
    if schema == "ultrafeedback":
        return schema, lambda r: parse_ultrafeedback_row(r, rule, rng, src.aspects)
    if schema == "nectar":
        return schema, lambda r: parse_nectar_row(r, rule, rng)
    return schema, None  # helpsteer works on groups of rows


def _key(kind: str, ex: Dict[str, Any]) -> str:
    if kind == "preference":
        return json.dumps([ex["prompt"], ex["chosen"], ex["rejected"]], sort_keys=True)
    if kind == "prompts":
        return json.dumps(ex["prompt"], sort_keys=True)
    return json.dumps(ex["messages"], sort_keys=True)


def load_examples(sources: List[SourceConfig], kind: str, *, skip_invalid: bool = False,
                  dedup: bool = True, seed: int = 1, rule: PairRule = PairRule()
                  ) -> Tuple[List[Dict[str, Any]], LoadReport]:
    """Normalized examples of ``kind`` (``preference``, ``prompts`` or ``sft``) from all
    sources, each tagged with ``source`` and ``row``; and the report of what was dropped."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    if not sources:
        raise DataError("no data sources configured")
    report = LoadReport()
    seen: set = set()
    out: List[Dict[str, Any]] = []
    for s_idx, src in enumerate(sources):
        rep = SourceReport(name=src.label)
        report.sources.append(rep)
        rng = random.Random(f"{seed}:{s_idx}:{src.path}")

        def fail(row: int, err: RowError) -> None:
            if not skip_invalid:
                where = f"row {row}" if not src.path.endswith(".jsonl") else f"line {row}"
                raise DataError(f"{src.path}: {where}: {err} (set skip_invalid=true to skip and "
                                "count such rows)") from None
            rep.skipped[err.reason] = rep.skipped.get(err.reason, 0) + 1

        rows = list(read_rows(src))
        rep.rows = len(rows)
        first = next((r for _, r in rows if isinstance(r, dict)), None)
        if first is None:
            if rows:
                fail(*rows[0])  # every row invalid; the first error explains
            kept_here: List[Dict[str, Any]] = []
        else:
            try:
                schema, parse = _parser(kind, src, first, rule, rng)
            except RowError as e:
                raise DataError(f"{src.path}: {e}") from None
            kept_here = []
            if parse is None:  # helpsteer
                aspects = src.aspects or HELPSTEER_ASPECTS
                good = []
                for i, row in rows:
                    if isinstance(row, RowError):
                        fail(i, row)
                    else:
                        good.append((i, row))
                for i, ex in group_helpsteer(good, rule, rng, aspects):
                    if isinstance(ex, RowError):
                        fail(i, ex)
                    else:
                        kept_here.append(dict(ex, row=i, subset=None))
            else:
                for i, row in rows:
                    if isinstance(row, RowError):
                        fail(i, row)
                        continue
                    try:
                        ex = parse(row)
                    except RowError as e:
                        fail(i, e)
                        continue
                    if kind == "preference":  # RewardBench-style files name a subset per row
                        ex["subset"] = None if row.get("subset") is None else str(row["subset"])
                    kept_here.append(dict(ex, row=i))
        unique = []
        for ex in kept_here:
            k = _key(kind, ex)
            if dedup and k in seen:
                rep.duplicates += 1
                continue
            seen.add(k)
            unique.append(ex)
        if src.max_samples is not None and len(unique) > src.max_samples:
            order = list(range(len(unique)))
            random.Random(f"cap:{seed}:{s_idx}").shuffle(order)
            keep = sorted(order[: src.max_samples])
            rep.capped = len(unique) - src.max_samples
            unique = [unique[i] for i in keep]
        for ex in unique:
            ex["source"] = src.label
        rep.kept = len(unique)
        out.extend(unique)
    if not out:
        raise DataError("no usable examples after loading: " + " | ".join(report.lines()))
    return out, report

