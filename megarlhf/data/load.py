"""Reading sources into normalized, validated, deduplicated examples.

    examples, report = load_examples(cfg.data, kind="preference")

Sources are local JSONL / JSON / Parquet files or Hugging Face hub names (read through
the prepared-data cache of ``megarlhf.data.hub``: downloaded once per job, or beforehand
with ``megarlhf prepare-data`` where compute nodes have no internet). A malformed row (a
JSONL line that is not a JSON object in UTF-8 included) stops loading with an error
naming the file, row and field, unless ``skip_invalid`` is set: then it is skipped and
counted by reason. Duplicates and rows beyond a source's cap are counted too. Nothing
is dropped without appearing in the report.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from megarlhf.data.errors import DataError
from megarlhf.data.hub import HubCache
from megarlhf.data.schemas import (PREFERENCE_SCHEMAS, PairRule, RowError, detect_schema,
                                   group_helpsteer, parse_hh_row, parse_nectar_row,
                                   parse_pairs_row, parse_prompt_row, parse_sft_row,
                                   parse_ultrafeedback_row)

__all__ = ["SourceConfig", "DataError", "SourceReport", "LoadReport", "read_rows", "load_examples",
           "is_local_path", "HELPSTEER_ASPECTS"]

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


@dataclass
class SourceReport:
    """What became of a source's rows: every row read is kept or counted once below, so
    ``rows == kept + sum(skipped) + duplicates + capped + truncated + merged``."""

    name: str
    rows: int = 0
    kept: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)
    """Malformed rows skipped (``skip_invalid``), by reason."""
    duplicates: int = 0
    capped: int = 0
    truncated: int = 0
    """Examples longer than the configured lengths (counted by ``build_dataset``)."""
    merged: int = 0
    """Rows that went into another row's example (HelpSteer: responses to one prompt)."""

    def accounted(self) -> int:
        """Rows kept or counted; equals ``rows`` when nothing was lost."""
        return (self.kept + sum(self.skipped.values()) + self.duplicates + self.capped
                + self.truncated + self.merged)

    def line(self) -> str:
        parts = [f"{self.name}: {self.rows} rows -> {self.kept} kept"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        for what in ("duplicates", "capped", "truncated", "merged"):
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


def is_local_path(path: str) -> bool:
    """Files and paths that look like files are local; anything else is a hub name."""
    return (os.path.exists(path) or path.endswith((".jsonl", ".json", ".parquet"))
            or path.startswith(("/", "./", "../")))


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: maybe a lone surrogate


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate(row: Any) -> Optional[str]:
    """The field path of a string (or key) in ``row`` holding a lone UTF-16 surrogate
    (a valid JSON escape that no text encoding can store), else None."""
    stack: List[Tuple[str, Any]] = [("", row)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if not _encodable(v):
                return path or "<row>"
        elif isinstance(v, dict):
            for k, x in v.items():
                sub = f"{path}.{k}" if path else str(k)
                if not _encodable(str(k)):
                    return sub
                stack.append((sub, x))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
    return None


def _parse_json(text: str) -> Any:
    """``json.loads`` whose every failure is a ``ValueError`` with a short message."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise ValueError(f"invalid JSON: {str(e).split(';')[0]}") from None


def _row_or_error(row: Any, maybe_surrogates: bool) -> Any:
    if not isinstance(row, dict):
        return RowError("<row>", f"expected a JSON object, got {type(row).__name__}", "wrong_type")
    if maybe_surrogates:
        bad = _lone_surrogate(row)
        if bad is not None:
            return RowError(bad, "invalid Unicode: an unpaired surrogate escape (\\ud800-\\udfff)",
                            "bad_encoding")
    return row


def _utf8_error(e: UnicodeDecodeError, data: bytes, with_line: bool) -> str:
    line_start = data.rfind(b"\n", 0, e.start) + 1
    line = data.count(b"\n", 0, e.start) + 1
    where = f"line {line}, " if with_line else ""
    return (f"not valid UTF-8 ({where}byte {e.start - line_start + 1} of the line is "
            f"0x{data[e.start]:02x}); save the file as UTF-8")


def read_rows(src: SourceConfig, hub: Optional[HubCache] = None) -> Iterator[Tuple[int, Any]]:
    """``(row number, dict)`` for each row; JSONL rows are numbered by line (1-based),
    JSON, Parquet and hub rows by position (0-based). A JSONL line that is not a JSON object
    in UTF-8 is yielded as a RowError (a file that cannot be read at all is a DataError).
    A hub source is read through ``hub`` (default: the default cache folder, offline when
    the environment says so; see ``megarlhf.data.hub``)."""
    path = src.path
    if not path:
        raise DataError("data source without a path")
    if is_local_path(path):
        if not os.path.isfile(path):
            raise DataError(f"data file not found: {path}")
        if path.endswith(".jsonl"):
            with open(path, "rb") as f:  # lines end at b"\n" only, as other tools count them
                for lineno, raw in enumerate(f, 1):
                    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                        raw = raw[3:]  # a UTF-8 byte-order mark
                    if not raw.strip(b" \t\r\n"):
                        continue  # blank lines are not rows
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        yield lineno, RowError("<row>", _utf8_error(e, raw, False), "bad_encoding")
                        continue
                    try:
                        row = _parse_json(line)
                    except ValueError as e:
                        yield lineno, RowError("<json>", str(e), "invalid_json")
                        continue
                    yield lineno, _row_or_error(row, bool(_SURROGATE_ESCAPE.search(line)))
            return
        if path.endswith(".json"):
            with open(path, "rb") as f:
                data = f.read()
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: {_utf8_error(e, data, True)}") from None
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
            except RecursionError:
                raise DataError(f"{path}: invalid JSON: nested too deeply") from None
            except ValueError as e:  # e.g. an integer with more digits than Python converts
                raise DataError(f"{path}: invalid JSON: {str(e).split(';')[0]}") from None
            if isinstance(doc, dict) and isinstance(doc.get("data"), list):
                doc = doc["data"]
            if not isinstance(doc, list):
                raise DataError(f"{path}: expected a JSON array of rows (or {{\"data\": [...]}})")
            maybe_surrogates = bool(_SURROGATE_ESCAPE.search(text))
            for i, row in enumerate(doc):
                yield i, _row_or_error(row, maybe_surrogates)
            return
        if path.endswith(".parquet"):
            import datasets

            try:
                ds = datasets.load_dataset("parquet", data_files=path, split="train")
            except Exception as e:  # arrow's errors for a damaged or foreign file
                raise DataError(f"{path}: cannot read as Parquet: {type(e).__name__}: {e}") from e
            for i, row in enumerate(ds):
                yield i, row
            return
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")
    # A hub dataset: its prepared copy, downloaded first if there is none (megarlhf/data/hub.py).
    ds = (hub or HubCache.create(None)).load(path, src.split)
    for i, row in enumerate(ds):
        yield i, row


def _detect(src: SourceConfig, rows: List[Tuple[int, Any]]) -> str:
    """The schema of the first row whose keys tell it (a malformed row before it is then
    reported, or skipped, as a row of that schema)."""
    first: Optional[Tuple[int, RowError]] = None
    for i, row in rows:
        if isinstance(row, dict):
            try:
                return detect_schema(row)
            except RowError as e:
                first = first or (i, e)
    assert first is not None  # called with at least one dict row
    where = f"line {first[0]}" if src.path.endswith(".jsonl") else f"row {first[0]}"
    raise DataError(f"{src.path}: {where}: {first[1]} (and no row says which; set the source's "
                    f"schema to one of {PREFERENCE_SCHEMAS})")


def _parser(kind: str, src: SourceConfig, rows: List[Tuple[int, Any]], rule: PairRule,
            rng: random.Random) -> Tuple[str, Optional[Callable[[Dict[str, Any]], Dict[str, Any]]]]:
    if kind == "prompts":
        return "prompts", lambda r: parse_prompt_row(r, src.reference_field)
    if kind == "sft":
        return "sft", parse_sft_row
    schema = src.schema
    if schema == "auto":
        schema = _detect(src, rows)
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
                  dedup: bool = True, seed: int = 1, rule: PairRule = PairRule(),
                  hub: Optional[HubCache] = None) -> Tuple[List[Dict[str, Any]], LoadReport]:
    """Normalized examples of ``kind`` (``preference``, ``prompts`` or ``sft``) from all
    sources, each tagged with ``source`` and ``row``; and the report of what was dropped.
    Hub sources are read through ``hub`` (see :func:`read_rows`)."""
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

        if src.max_samples is not None and (isinstance(src.max_samples, bool)
                                            or not isinstance(src.max_samples, int)
                                            or src.max_samples < 1):
            raise DataError(f"{src.path}: max_samples={src.max_samples!r} must be a positive integer "
                            "(or null: no cap)")
        rows = list(read_rows(src, hub))
        rep.rows = len(rows)
        kept_here: List[Dict[str, Any]] = []
        if not any(isinstance(r, dict) for _, r in rows):
            for i, row in rows:  # every row invalid: the first error explains, all are counted
                fail(i, row)
        else:
            schema, parse = _parser(kind, src, rows, rule, rng)
            if parse is None:  # helpsteer
                aspects = src.aspects or HELPSTEER_ASPECTS
                good = []
                for i, row in rows:
                    if isinstance(row, RowError):
                        fail(i, row)
                    else:
                        good.append((i, row))
                results = list(group_helpsteer(good, rule, rng, aspects))
                rep.merged = len(good) - len(results)  # one result per prompt or bad row
                for i, ex in results:
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

