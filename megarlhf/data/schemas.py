"""Row schemas: each source format's rows -> normalized examples, or a :class:`RowError`
naming the field.

Normalized examples (plain dicts, so they live in Hugging Face ``datasets``):

* preference pair: ``{"prompt": [messages], "chosen": str, "rejected": str}``
* prompt:          ``{"prompt": [messages], "reference": str | None}``
* SFT example:     ``{"messages": [messages]}``

Preference schemas:

``pairs``           ``{prompt, chosen, rejected}`` strings, or chosen/rejected as message
                    lists ending in the assistant answer (UltraFeedback-binarized style;
                    the shared prefix is the prompt, ``prompt`` then optional)
``ultrafeedback``   raw UltraFeedback: ``instruction`` and ``completions`` with per-aspect
                    ``annotations[aspect].Rating``; pairs by the mean of aspects
``hh_rlhf``         Anthropic HH transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
``nectar``          ``prompt`` transcript and ranked ``answers[{answer, rank}]``
``helpsteer``       one response per row with per-aspect scores; rows grouped by prompt
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from megarlhf.data.chat import Message, validate_messages

__all__ = ["RowError", "PairRule", "PREFERENCE_SCHEMAS", "parse_pairs_row", "parse_ultrafeedback_row",
           "parse_hh_row", "parse_nectar_row", "group_helpsteer", "parse_prompt_row",
           "parse_sft_row", "detect_schema", "parse_transcript"]

PREFERENCE_SCHEMAS = ("pairs", "ultrafeedback", "hh_rlhf", "nectar", "helpsteer")


class RowError(ValueError):
    """A row that cannot be used. ``reason`` is a short category for skip counts."""

    def __init__(self, field: str, message: str, reason: str = "invalid"):
        self.field, self.reason = field, reason
        shown = field if len(field) <= 120 else field[:120] + "..."  # keys are data too
        super().__init__(f"field {shown!r}: {message}")


@dataclass(frozen=True)
class PairRule:
    """How rated completions become one pair (ratings-based schemas)."""

    rejected: str = "random"
    """``random``: a random completion rated below the best (UltraFeedback-binarized);
    ``lowest``: the lowest-rated one."""
    min_margin: float = 0.0
    """Skip the prompt unless chosen's mean rating exceeds rejected's by more than this
    (ties are always skipped)."""


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: errors quote data, never all of it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _text(row: Dict[str, Any], field: str, name: Optional[str] = None) -> str:
    """``row[field]`` as non-empty text; errors name the field as ``name`` (its full path
    in the row, e.g. ``completions[2].response``) when given."""
    name = name or field
    if field not in row or row[field] is None:
        raise RowError(name, "missing", "missing_field")
    v = row[field]
    if not isinstance(v, str):
        raise RowError(name, f"expected a string, got {type(v).__name__}", "wrong_type")
    if not v.strip():
        raise RowError(name, "empty text", "empty_text")
    return v


def _messages(value: Any, field: str) -> List[Message]:
    try:
        return validate_messages(value, field)
    except ValueError as e:  # "prompt[1].role: ..." -> field "prompt[1].role"
        where, _, msg = str(e).partition(": ")
        raise RowError(where if where.startswith(field) else field, msg or str(e),
                       "bad_messages") from None


def _mean(ratings: List[float], field: str) -> float:
    mean = sum(ratings) / len(ratings)
    if not math.isfinite(mean):
        raise RowError(field, f"the mean of ratings {_short(ratings)} is not a finite number",
                       "bad_rating")
    return mean


def _prompt(row: Dict[str, Any], field: str = "prompt") -> List[Message]:
    if field not in row or row[field] is None:
        raise RowError(field, "missing", "missing_field")
    v = row[field]
    if isinstance(v, str):
        return [{"role": "user", "content": _text(row, field)}]
    if isinstance(v, list):
        msgs = _messages(v, field)
        if msgs[-1]["role"] == "assistant":
            raise RowError(field, "a prompt must not end with an assistant message", "bad_messages")
        return msgs
    raise RowError(field, f"expected a string or a message list, got {type(v).__name__}",
                   "wrong_type")


def _check_pair(chosen: str, rejected: str) -> None:
    if chosen == rejected:
        raise RowError("chosen", "chosen is identical to rejected", "identical_pair")


def parse_pairs_row(row: Dict[str, Any]) -> Dict[str, Any]:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if v is None:
            raise RowError(name, "missing", "missing_field")
    if isinstance(chosen, list) or isinstance(rejected, list):
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise RowError("rejected", "chosen and rejected must both be strings or both message lists",
                           "wrong_type")
        c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        for name, msgs in (("chosen", c), ("rejected", r)):
            if msgs[-1]["role"] != "assistant":
                raise RowError(name, "the last message must be the assistant's answer", "bad_messages")
        if c[:-1] != r[:-1]:
            raise RowError("rejected", "chosen and rejected do not share the same prompt messages",
                           "bad_messages")
        # The shared messages before the answer are the prompt; with none, `prompt` is.
        prompt = c[:-1] if len(c) > 1 else _prompt(row)
        out = {"prompt": prompt, "chosen": c[-1]["content"], "rejected": r[-1]["content"]}
    else:
        out = {"prompt": _prompt(row), "chosen": _text(row, "chosen"),
               "rejected": _text(row, "rejected")}
    _check_pair(out["chosen"], out["rejected"])
    return out


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool):
        raise RowError(field, f"rating {_short(value)} is not a number", "bad_rating")
    if isinstance(value, (int, float)):
        try:
            x = float(value)
        except OverflowError:  # an integer beyond any float
            raise RowError(field, f"rating {_short(value)} is not a finite number", "bad_rating") from None
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            raise RowError(field, f"rating {_short(value)} is not a number", "bad_rating") from None
    else:
        raise RowError(field, f"rating {_short(value)} is not a number", "bad_rating")
    if math.isnan(x) or math.isinf(x):
        raise RowError(field, f"rating {_short(value)} is not a finite number", "bad_rating")
    return x


def _pick_pair(scored: List[Tuple[float, str]], rule: PairRule, rng: random.Random,
               field: str) -> Tuple[str, str]:
    """(chosen, rejected) from ``[(mean rating, response)]`` under ``rule``."""
    if len(scored) < 2:
        raise RowError(field, f"needs at least 2 rated responses, got {len(scored)}", "too_few_responses")
    best = max(s for s, _ in scored)
    top = [r for s, r in scored if s == best]
    chosen = top[0]
    lower = [(s, r) for s, r in scored if s < best]
    if not lower:
        raise RowError(field, "all responses are rated the same (tie)", "tie")
    if rule.rejected == "lowest":
        worst = min(s for s, _ in lower)
        rejected_score, rejected = next((s, r) for s, r in lower if s == worst)
    elif rule.rejected == "random":
        rejected_score, rejected = lower[rng.randrange(len(lower))]
    else:
        raise ValueError(f"pair_rule.rejected={rule.rejected!r}: expected 'random' or 'lowest'")
    if best - rejected_score <= rule.min_margin:
        raise RowError(field, f"rating margin {best - rejected_score:g} is not above "
                              f"min_margin={rule.min_margin:g}", "small_margin")
    _check_pair(chosen, rejected)
    return chosen, rejected


def parse_ultrafeedback_row(row: Dict[str, Any], rule: PairRule, rng: random.Random,
                            aspects: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Mean of per-aspect ratings per completion (the paper's best data), then a pair."""
    prompt_field = "instruction" if "instruction" in row else "prompt"
    prompt = _prompt(row, prompt_field)
    comps = row.get("completions")
    if comps is None:
        raise RowError("completions", "missing", "missing_field")
    if not isinstance(comps, list):
        raise RowError("completions", f"expected a list, got {type(comps).__name__}", "wrong_type")
    scored = []
    for i, c in enumerate(comps):
        where = f"completions[{i}]"
        if not isinstance(c, dict):
            raise RowError(where, "expected an object", "wrong_type")
        response = _text(c, "response", f"{where}.response")
        ann = c.get("annotations")
        if not isinstance(ann, dict) or not ann:
            raise RowError(f"{where}.annotations", "missing per-aspect ratings", "missing_field")
        names = list(aspects) if aspects else sorted(ann)
        ratings = []
        for a in names:
            if a not in ann:
                raise RowError(f"{where}.annotations.{a}", "missing", "missing_field")
            v = ann[a]
            v = v.get("Rating") if isinstance(v, dict) else v
            if v == "N/A":  # UltraFeedback marks unrated aspects so: excluded from the mean
                continue
            ratings.append(_number(v, f"{where}.annotations.{a}.Rating"))
        if not ratings:
            raise RowError(f"{where}.annotations", "no numeric rating", "bad_rating")
        scored.append((_mean(ratings, f"{where}.annotations"), response))
    chosen, rejected = _pick_pair(scored, rule, rng, "completions")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_transcript(text: str, field: str) -> List[Message]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> messages (HH-RLHF / Nectar style)."""
    if not isinstance(text, str):
        raise RowError(field, f"expected a transcript string, got {type(text).__name__}", "wrong_type")
    parts = _TURN.split(text if text.startswith("\n\n") else "\n\n" + text.lstrip("\n"))
    if len(parts) < 3 or parts[0].strip():
        raise RowError(field, "not a Human/Assistant transcript", "bad_transcript")
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return msgs


def parse_hh_row(row: Dict[str, Any]) -> Dict[str, Any]:
    c = parse_transcript(_text(row, "chosen"), "chosen")
    r = parse_transcript(_text(row, "rejected"), "rejected")
    for name, msgs in (("chosen", c), ("rejected", r)):
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"]:
            raise RowError(name, "the transcript does not end with an assistant answer", "bad_transcript")
        if any(not m["content"] for m in msgs[:-1]):
            raise RowError(name, "a turn of the transcript is empty", "empty_text")
    if c[:-1] != r[:-1]:
        raise RowError("rejected", "chosen and rejected transcripts differ before the last answer",
                       "bad_transcript")
    _check_pair(c[-1]["content"], r[-1]["content"])
    return {"prompt": c[:-1], "chosen": c[-1]["content"], "rejected": r[-1]["content"]}


def parse_nectar_row(row: Dict[str, Any], rule: PairRule, rng: random.Random) -> Dict[str, Any]:
    prompt_msgs = parse_transcript(_text(row, "prompt"), "prompt")
    if prompt_msgs and prompt_msgs[-1]["role"] == "assistant" and not prompt_msgs[-1]["content"]:
        prompt_msgs = prompt_msgs[:-1]  # Nectar prompts end with an empty "Assistant:"
    if not prompt_msgs or prompt_msgs[-1]["role"] != "user":
        raise RowError("prompt", "the transcript must end with a Human turn", "bad_transcript")
    answers = row.get("answers")
    if not isinstance(answers, list):
        raise RowError("answers", "missing or not a list", "missing_field" if answers is None else "wrong_type")
    scored = []
    for i, a in enumerate(answers):
        if not isinstance(a, dict):
            raise RowError(f"answers[{i}]", "expected an object", "wrong_type")
        text = _text(a, "answer", f"answers[{i}].answer")
        rank = _number(a.get("rank"), f"answers[{i}].rank")
        scored.append((-rank, text))  # rank 1 is best
    chosen, rejected = _pick_pair(scored, rule, rng, "answers")
    return {"prompt": prompt_msgs, "chosen": chosen, "rejected": rejected}


def group_helpsteer(rows: Iterable[Tuple[int, Dict[str, Any]]], rule: PairRule, rng: random.Random,
                    aspects: Sequence[str]) -> Iterable[Tuple[int, Any]]:
    """HelpSteer: one (prompt, response, aspect scores) per row; rows of one prompt form a
    pair by mean score. Yields ``(row, example)`` or ``(row, RowError)`` per prompt."""
    groups: Dict[str, List[Tuple[int, float, str]]] = {}
    order: List[str] = []
    for idx, row in rows:
        try:
            prompt = _text(row, "prompt")
            response = _text(row, "response")
            score = _mean([_number(row.get(a), a) for a in aspects], ", ".join(aspects))
        except RowError as e:
            yield idx, e
            continue
        if prompt not in groups:
            groups[prompt] = []
            order.append(prompt)
        groups[prompt].append((idx, score, response))
    for prompt in order:
        items = groups[prompt]
        first_row = items[0][0]
        try:
            chosen, rejected = _pick_pair([(s, r) for _, s, r in items], rule, rng, "response")
        except RowError as e:
            yield first_row, e
            continue
        yield first_row, {"prompt": [{"role": "user", "content": prompt}], "chosen": chosen,
                          "rejected": rejected}


def parse_prompt_row(row: Dict[str, Any], reference_field: str = "reference") -> Dict[str, Any]:
    if "prompt" in row:
        prompt = _prompt(row, "prompt")
    elif "messages" in row:
        msgs = _messages(row["messages"], "messages")
        prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
        if not prompt:
            raise RowError("messages", "no prompt before the assistant message", "bad_messages")
    else:
        raise RowError("prompt", "missing (expected 'prompt' or 'messages')", "missing_field")
    ref = row.get(reference_field)
    if ref is not None:
        if isinstance(ref, (int, float)) and not isinstance(ref, bool):
            if isinstance(ref, float) and not math.isfinite(ref):
                raise RowError(reference_field, f"{ref!r} is not a finite number", "wrong_type")
            ref = str(ref)
        if not isinstance(ref, str):
            raise RowError(reference_field, f"expected a string, got {type(ref).__name__}", "wrong_type")
    return {"prompt": prompt, "reference": ref}


def parse_sft_row(row: Dict[str, Any]) -> Dict[str, Any]:
    if "messages" in row:
        msgs = _messages(row["messages"], "messages")
    elif "prompt" in row:
        response_field = "response" if "response" in row else "completion"
        msgs = _prompt(row, "prompt") + [{"role": "assistant", "content": _text(row, response_field)}]
    else:
        raise RowError("messages", "missing (expected 'messages' or 'prompt' + 'response')",
                       "missing_field")
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowError("messages", "no assistant message to learn from", "bad_messages")
    return {"messages": msgs}


def detect_schema(row: Dict[str, Any]) -> str:
    """Best guess of a preference row's schema from its keys."""
    if "completions" in row:
        return "ultrafeedback"
    if "answers" in row:
        return "nectar"
    if "chosen" in row and "rejected" in row:
        c = row["chosen"]
        if isinstance(c, str) and "prompt" not in row and "\n\nHuman:" in c:
            return "hh_rlhf"
        return "pairs"
    if "response" in row and any(k in row for k in ("helpfulness", "correctness")):
        return "helpsteer"
    raise RowError("chosen", f"cannot tell the schema from the keys {_short(sorted(row), 200)}",
                   "unknown_schema")
