"""Scoring for ``megarlhf eval`` as pure functions (strings and numbers in, numbers out).

GSM8k exact match (as GSM8k scoring does): the answer is the number after the last
``####``; failing that, the last number in the text. Both sides are normalised (``$``,
thousands commas and a trailing ``.`` removed) and compared as numbers, so ``"3.0"``
equals ``"3"`` and ``"1,000"`` equals ``"1000"``. ``strict`` accepts only a ``####``
answer (lm-evaluation-harness's "strict-match"; the default is its "flexible-extract").

The built-in task's checker is :func:`megarlhf.data.task.is_correct` (the number after
``####``, exact string match).

IFEval-style instruction checks (Zhou et al., 2023): each row of a rule file carries
``instruction_id_list`` and ``kwargs`` (one dict per instruction), IFEval's own layout,
and :data:`RULES` lists the instructions understood, with IFEval's ids and arguments.
A response follows an instruction *strictly* if the check passes on the response as it
is; *loosely* if it passes on any of IFEval's eight variants (``*`` removed, first
and/or last line removed). Reported per prompt (every instruction followed) and per
instruction. Departures from IFEval's reference checker: words are ``\\w+`` runs (as
its tokenizer), sentences are split by the rule in :func:`count_sentences` rather than
by its regex list, capital words are ``\\w+`` runs in capitals, keywords are matched as
literal text rather than as regular expressions, and the ``change_case:english_*``
checks test the case only (IFEval also asks a language detector whether the text is
English). ``language:response_language`` needs the ``langdetect`` package.

Best-of-N (:func:`best_of_n`): the reward model's pick among N samples per prompt, next
to the mean over samples (expected single-sample accuracy), the oracle (pass@N: any
sample right) and the floor (all samples right), so the reward model's contribution is
visible. RewardBench sections (:func:`rewardbench_sections`) weight subsets as its
leaderboard does.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["normalize_number", "numbers_equal", "extract_gsm8k", "gsm8k_reference", "score_gsm8k",
           "score_builtin", "strip_calculator_annotations", "RULES", "RELATIONS", "RuleError",
           "Instruction", "parse_instructions", "follows", "score_ifeval", "ifeval_summary",
           "count_words", "count_sentences", "best_of_n", "REWARDBENCH_SECTIONS",
           "REWARDBENCH_WEIGHTS", "rewardbench_sections"]


# -- GSM8k exact match ---------------------------------------------------------------------------
# A number: optional minus (not a hyphen inside a word: "3-5" is 3 and 5), optional "$",
# digits with thousands commas or plain, optional decimals. Never starts inside a word
# or another number ("x2", "1.5.3").
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\$?(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_MARKER = "####"


def normalize_number(text: str) -> Optional[str]:
    """``"$1,234.50."`` -> ``"1234.5"``; ``"3.0"`` -> ``"3"``; None if not a number."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    s = s.rstrip(".")
    if not s or not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", s):
        return None
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def numbers_equal(a: Optional[str], b: Optional[str]) -> bool:
    """Numeric equality of two number strings (False if either is not a number)."""
    na = normalize_number(a) if a is not None else None
    nb = normalize_number(b) if b is not None else None
    return na is not None and nb is not None and Decimal(na) == Decimal(nb)


def extract_gsm8k(text: str, strict: bool = False) -> Tuple[Optional[str], Optional[str]]:
    """``(answer, how)``: the first number after the last ``####`` (``how="marker"``);
    else, unless ``strict``, the last number in the text (``"last_number"``); else
    ``(None, None)``. The answer is normalised (:func:`normalize_number`)."""
    at = text.rfind(_MARKER)
    if at >= 0:
        m = _NUMBER.search(text, at + len(_MARKER))
        if m:
            return normalize_number(m.group(0)), "marker"
    if strict:
        return None, None
    found = _NUMBER.findall(text)
    if found:
        return normalize_number(found[-1]), "last_number"
    return None, None


def gsm8k_reference(reference: str) -> Optional[str]:
    """A reference answer as a normalised number: a plain number, or a GSM8k worked answer
    (``"... #### 72"``); None if it holds no number."""
    if _MARKER in reference:
        return extract_gsm8k(reference, strict=True)[0]
    return normalize_number(reference)


def score_gsm8k(response: str, reference: str) -> Dict[str, Any]:
    """``{"answer", "how", "correct", "correct_strict"}`` of one response."""
    ref = gsm8k_reference(reference)
    answer, how = extract_gsm8k(response)
    correct = numbers_equal(answer, ref)
    return {"answer": answer, "how": how, "correct": correct,
            "correct_strict": correct and how == "marker"}


def score_builtin(response: str, reference: str) -> Dict[str, Any]:
    """The built-in task's checker: the number after ``####``, compared as a string."""
    from megarlhf.data.task import extract_answer, is_correct

    return {"answer": extract_answer(response), "correct": is_correct(response, reference)}


def strip_calculator_annotations(solution: str) -> str:
    """GSM8k's worked answers carry calculator calls ``<<48/2=24>>``; few-shot exemplars
    leave them out (as open-instruct's GSM8k evaluation does)."""
    return re.sub(r"<<[^<>]*>>", "", solution)


# -- IFEval-style instruction checks ------------------------------------------------------------
RELATIONS = ("less than", "at least", "at most", "more than", "exactly")
"""IFEval uses ``less than`` (count < N) and ``at least`` (count >= N); the other three
make hand-written rule files easier to read."""


def _compare(count: int, relation: str, n: int) -> bool:
    return {"less than": count < n, "at least": count >= n, "at most": count <= n,
            "more than": count > n, "exactly": count == n}[relation]


def count_words(text: str) -> int:
    """Words are ``\\w+`` runs (IFEval counts with ``RegexpTokenizer(r"\\w+")``)."""
    return len(re.findall(r"\w+", text))


_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co",
                  "e.g", "i.e", "a.m", "p.m", "no", "fig")


def count_sentences(text: str) -> int:
    """Sentences end at a run of ``.``, ``!`` or ``?`` (closing quotes or brackets may
    follow) before whitespace or the end; a final piece without one counts too. Decimal
    points and common abbreviations (Mr., Dr., e.g., etc.) do not end a sentence."""
    t = re.sub(r"\b(" + "|".join(re.escape(a) for a in _ABBREVIATIONS) + r")\.", r"\1<prd>",
               text, flags=re.IGNORECASE)
    t = re.sub(r"(\d)\.(\d)", r"\1<prd>\2", t)
    pieces = re.split(r"[.!?]+[\"')\]]*(?=\s|$)", t)
    return sum(1 for p in pieces if re.search(r"\w", p))


def _strip_fence(value: str) -> str:
    v = value.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        if v.startswith(prefix):
            v = v[len(prefix):]
            break
    if v.endswith("```"):
        v = v[:-3]
    return v.strip()


def _is_json(value: str) -> bool:
    try:
        json.loads(_strip_fence(value))
    except ValueError:
        return False
    return True


def _paragraphs_divider(value: str, num_paragraphs: int) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", value)
    n = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if i in (0, len(parts) - 1):
                n -= 1
            else:
                return False  # an empty paragraph between two dividers
    return n == num_paragraphs


def _nth_paragraph_first_word(value: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    parts = value.split("\n\n")
    n = sum(1 for p in parts if p.strip())
    if nth_paragraph > n or nth_paragraph > len(parts):
        return False
    para = parts[nth_paragraph - 1].strip()
    if not para:
        return False
    word = para.split()[0].strip().lstrip("'\"")
    got = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        got += ch.lower()
    return n == num_paragraphs and got == first_word.strip().lower()


def _bullets(value: str) -> int:
    return (len(re.findall(r"^\s*\*[^\*].*$", value, flags=re.MULTILINE))
            + len(re.findall(r"^\s*-.*$", value, flags=re.MULTILINE)))


def _highlights(value: str) -> int:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", value) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", value) if h[2:-2].strip()]
    return len(single) + len(double)


def _sections(value: str, section_spliter: str) -> int:
    return len(re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", value)) - 1


def _postscript(value: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, value.lower(), flags=re.MULTILINE))


def _two_responses(value: str) -> bool:
    parts = value.split("******")
    kept = []
    for i, p in enumerate(parts):
        if not p.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            kept.append(p.strip())
    return len(kept) == 2 and kept[0] != kept[1]


def _language(value: str, language: str) -> bool:
    import langdetect
    from langdetect.lang_detect_exception import LangDetectException

    try:
        return langdetect.detect(value) == language
    except LangDetectException:
        return True  # IFEval counts text it cannot classify as following the instruction


def _has(value: str, word: str) -> bool:
    return word.lower() in value.lower()


_CONSTRAINED = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@dataclass(frozen=True)
class Rule:
    """One verifiable instruction: ``check(response, **kwargs) -> bool`` and its
    arguments by kind (``count`` int >= 0, ``index`` int >= 1, ``text``, ``words``
    list of strings, ``relation`` one of :data:`RELATIONS`, ``letter`` one letter)."""

    check: Callable[..., bool]
    params: Dict[str, str]
    doc: str


RULES: Dict[str, Rule] = {
    "punctuation:no_comma": Rule(lambda v: "," not in v, {}, "no comma anywhere"),
    "change_case:english_lowercase": Rule(lambda v: v.islower(), {}, "all letters lowercase"),
    "change_case:english_capital": Rule(lambda v: v.isupper(), {}, "all letters uppercase"),
    "change_case:capital_word_frequency": Rule(
        lambda v, capital_frequency, capital_relation: _compare(
            sum(1 for w in re.findall(r"\w+", v) if w.isupper()), capital_relation, capital_frequency),
        {"capital_frequency": "count", "capital_relation": "relation"},
        "words in capitals <relation> capital_frequency"),
    "startend:end_checker": Rule(
        lambda v, end_phrase: v.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
        {"end_phrase": "text"}, "ends with end_phrase (case-insensitive)"),
    "startend:start_checker": Rule(
        lambda v, start_phrase: v.strip().strip('"').lower().startswith(start_phrase.strip().lower()),
        {"start_phrase": "text"}, "starts with start_phrase (case-insensitive; not in IFEval)"),
    "startend:quotation": Rule(lambda v: len(v.strip()) > 1 and v.strip()[0] == '"' == v.strip()[-1], {},
                               'wrapped in double quotes'),
    "keywords:existence": Rule(lambda v, keywords: all(_has(v, k) for k in keywords),
                               {"keywords": "words"}, "every keyword appears (case-insensitive)"),
    "keywords:forbidden_words": Rule(
        lambda v, forbidden_words: not any(re.search(r"\b" + re.escape(w) + r"\b", v, flags=re.IGNORECASE)
                                           for w in forbidden_words),
        {"forbidden_words": "words"}, "none of the words appears as a whole word"),
    "keywords:frequency": Rule(
        lambda v, keyword, frequency, relation: _compare(
            len(re.findall(re.escape(keyword), v, flags=re.IGNORECASE)), relation, frequency),
        {"keyword": "text", "frequency": "count", "relation": "relation"},
        "occurrences of keyword <relation> frequency"),
    "keywords:letter_frequency": Rule(
        lambda v, letter, let_frequency, let_relation: _compare(
            Counter(v.lower())[letter.lower()], let_relation, let_frequency),
        {"letter": "letter", "let_frequency": "count", "let_relation": "relation"},
        "occurrences of the letter <relation> let_frequency"),
    "length_constraints:number_words": Rule(
        lambda v, num_words, relation: _compare(count_words(v), relation, num_words),
        {"num_words": "count", "relation": "relation"}, "words <relation> num_words"),
    "length_constraints:number_sentences": Rule(
        lambda v, num_sentences, relation: _compare(count_sentences(v), relation, num_sentences),
        {"num_sentences": "count", "relation": "relation"}, "sentences <relation> num_sentences"),
    "length_constraints:number_paragraphs": Rule(
        _paragraphs_divider, {"num_paragraphs": "count"},
        "exactly num_paragraphs paragraphs separated by the markdown divider ***"),
    "length_constraints:nth_paragraph_first_word": Rule(
        _nth_paragraph_first_word,
        {"num_paragraphs": "count", "nth_paragraph": "index", "first_word": "text"},
        "num_paragraphs paragraphs (blank-line separated), paragraph nth_paragraph starting with first_word"),
    "detectable_format:json_format": Rule(_is_json, {}, "the whole response is JSON (a ``` fence allowed)"),
    "detectable_format:number_bullet_lists": Rule(
        lambda v, num_bullets: _bullets(v) == num_bullets, {"num_bullets": "count"},
        "exactly num_bullets markdown bullet points (* or -)"),
    "detectable_format:title": Rule(
        lambda v: any(t[2:-2].strip() for t in re.findall(r"<<[^\n]+>>", v)), {},
        "a title in <<double angular brackets>>"),
    "detectable_format:constrained_response": Rule(
        lambda v: any(c in v.strip() for c in _CONSTRAINED), {},
        "contains 'My answer is yes.', 'My answer is no.' or 'My answer is maybe.'"),
    "detectable_format:number_highlighted_sections": Rule(
        lambda v, num_highlights: _highlights(v) >= num_highlights, {"num_highlights": "count"},
        "at least num_highlights *highlighted* sections"),
    "detectable_format:multiple_sections": Rule(
        lambda v, section_spliter, num_sections: _sections(v, section_spliter) >= num_sections,
        {"section_spliter": "text", "num_sections": "count"},
        "at least num_sections sections headed '<section_spliter> <number>'"),
    "detectable_content:number_placeholders": Rule(
        lambda v, num_placeholders: len(re.findall(r"\[.*?\]", v)) >= num_placeholders,
        {"num_placeholders": "count"}, "at least num_placeholders [placeholders]"),
    "detectable_content:postscript": Rule(_postscript, {"postscript_marker": "text"},
                                          "a postscript starting with postscript_marker"),
    "combination:two_responses": Rule(_two_responses, {}, "two different responses separated by ******"),
    "combination:repeat_prompt": Rule(
        lambda v, prompt_to_repeat: v.strip().lower().startswith(prompt_to_repeat.strip().lower()),
        {"prompt_to_repeat": "text"}, "starts by repeating prompt_to_repeat"),
    "language:response_language": Rule(_language, {"language": "text"},
                                       "written in language (ISO 639-1 code; needs langdetect)"),
}


class RuleError(ValueError):
    """A rule row that cannot be checked; ``field`` names where (``kwargs[1].num_words``)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"field {field!r}: {message}")


Instruction = Tuple[str, Dict[str, Any]]


def _argument(kind: str, value: Any, field: str) -> Any:
    if kind in ("count", "index"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # Parquet/pandas may store the integers as floats
        if not isinstance(value, int) or isinstance(value, bool):
            raise RuleError(field, f"expected an integer, got {value!r}")
        low = 1 if kind == "index" else 0
        if value < low:
            raise RuleError(field, f"expected an integer >= {low}, got {value}")
        return value
    if kind == "text":
        if not isinstance(value, str) or not value.strip():
            raise RuleError(field, f"expected a non-empty string, got {value!r}")
        return value
    if kind == "words":
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(w, str) and w.strip() for w in value)):
            raise RuleError(field, f"expected a non-empty list of strings, got {value!r}")
        return list(value)
    if kind == "relation":
        if value not in RELATIONS:
            raise RuleError(field, f"expected one of {', '.join(repr(r) for r in RELATIONS)}, got {value!r}")
        return value
    if kind == "letter":
        if not isinstance(value, str) or len(value) != 1 or not value.isalpha():
            raise RuleError(field, f"expected a single letter, got {value!r}")
        return value.lower()
    raise AssertionError(kind)


def parse_instructions(row: Dict[str, Any]) -> List[Instruction]:
    """A row's ``instruction_id_list`` and ``kwargs`` (IFEval's layout; ``kwargs`` may be
    left out when no instruction takes arguments) as checked ``(id, arguments)`` pairs.
    Arguments that are null are ignored (the Hugging Face copy of IFEval fills every
    argument name in); anything else wrong raises :class:`RuleError` naming the field."""
    ids = row.get("instruction_id_list")
    if not isinstance(ids, (list, tuple)) or not ids:
        raise RuleError("instruction_id_list", f"expected a non-empty list of instruction ids, got {ids!r}")
    kwargs = row.get("kwargs")
    if kwargs is None:
        kwargs = [{} for _ in ids]
    if not isinstance(kwargs, (list, tuple)) or len(kwargs) != len(ids):
        raise RuleError("kwargs", f"expected a list of {len(ids)} argument objects (one per instruction), "
                                  f"got {kwargs!r}")
    out: List[Instruction] = []
    for i, (rid, kw) in enumerate(zip(ids, kwargs)):
        if not isinstance(rid, str) or rid not in RULES:
            raise RuleError(f"instruction_id_list[{i}]", f"unknown instruction id {rid!r} (supported: "
                                                         f"{', '.join(sorted(RULES))})")
        if rid == "language:response_language":
            try:
                import langdetect  # noqa: F401
            except ImportError:
                raise RuleError(f"instruction_id_list[{i}]", f"{rid!r} needs the langdetect package "
                                                             "(pip install langdetect)") from None
        if kw is None:
            kw = {}
        if not isinstance(kw, dict):
            raise RuleError(f"kwargs[{i}]", f"expected an object, got {type(kw).__name__}")
        given = {k: v for k, v in kw.items()
                 if v is not None and not (isinstance(v, float) and math.isnan(v))}
        params = RULES[rid].params
        for k in given:
            if k not in params:
                expected = ", ".join(params) or "none"
                raise RuleError(f"kwargs[{i}].{k}", f"unexpected argument for {rid!r} (expected: {expected})")
        args = {}
        for name, kind in params.items():
            if name not in given:
                raise RuleError(f"kwargs[{i}].{name}", f"missing (needed by {rid!r})")
            args[name] = _argument(kind, given[name], f"kwargs[{i}].{name}")
        out.append((rid, args))
    return out


def _loose_variants(response: str) -> List[str]:
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    variants = [response, first, last, both]
    return variants + [v.replace("*", "") for v in variants]


def follows(response: str, instruction: Instruction, loose: bool = False) -> bool:
    """Whether ``response`` follows one instruction (an empty response follows none)."""
    rid, args = instruction
    check = RULES[rid].check
    candidates = _loose_variants(response) if loose else [response]
    return any(c.strip() and check(c, **args) for c in candidates)


def score_ifeval(response: str, instructions: Sequence[Instruction]) -> Dict[str, Any]:
    """Per instruction, strict and loose; ``correct`` = every instruction followed strictly."""
    strict = [follows(response, ins) for ins in instructions]
    loose = [follows(response, ins, loose=True) for ins in instructions]
    return {"ids": [rid for rid, _ in instructions], "strict": strict, "loose": loose,
            "correct": all(strict), "correct_loose": all(loose)}


def ifeval_summary(scores: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Prompt-level and instruction-level accuracy (strict and loose) and strict accuracy
    per instruction id (``instruction/<id>``), from :func:`score_ifeval` results."""
    if not scores:
        raise ValueError("no scored prompts")
    out = {"prompt_strict": sum(s["correct"] for s in scores) / len(scores),
           "prompt_loose": sum(s["correct_loose"] for s in scores) / len(scores)}
    flat = [(rid, st, lo) for s in scores for rid, st, lo in zip(s["ids"], s["strict"], s["loose"])]
    out["instruction_strict"] = sum(st for _, st, _ in flat) / len(flat)
    out["instruction_loose"] = sum(lo for _, _, lo in flat) / len(flat)
    per: Dict[str, List[bool]] = {}
    for rid, st, _ in flat:
        per.setdefault(rid, []).append(st)
    for rid in sorted(per):
        out[f"instruction/{rid}"] = sum(per[rid]) / len(per[rid])
    return out


# -- best-of-N -----------------------------------------------------------------------------------
def best_of_n(rewards: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]]) -> Dict[str, Any]:
    """Per prompt, N reward-model scores and N correctness flags -> ``accuracy`` of the
    highest-scored sample (the first on ties), ``mean_sample`` (mean over all samples:
    the expected accuracy of one sample), ``pass_at_n`` (any sample right: what a
    perfect reward model would reach), ``all_correct`` (every sample right: what any
    pick reaches), and ``selected`` (the index picked per prompt)."""
    if not rewards or len(rewards) != len(correct):
        raise ValueError("best_of_n needs one row of rewards and of flags per prompt")
    n = len(rewards[0])
    if n == 0 or any(len(r) != n or len(c) != n for r, c in zip(rewards, correct)):
        raise ValueError("best_of_n needs the same number of samples (>= 1) for every prompt")
    selected = [max(range(n), key=lambda k: (r[k], -k)) for r in rewards]
    p = len(rewards)
    return {"n": n,
            "accuracy": sum(bool(c[k]) for c, k in zip(correct, selected)) / p,
            "mean_sample": sum(sum(map(bool, c)) for c in correct) / (p * n),
            "pass_at_n": sum(any(c) for c in correct) / p,
            "all_correct": sum(all(c) for c in correct) / p,
            "selected": selected}


# -- RewardBench ---------------------------------------------------------------------------------
REWARDBENCH_SECTIONS: Dict[str, Tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
# RewardBench's leaderboard weights: each subset's size, except math-prm (447 pairs),
# weighted 984 to count as much as the six code subsets together.
REWARDBENCH_WEIGHTS: Dict[str, int] = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 154,
    "xstest-should-respond": 250, "donotanswer": 136, "math-prm": 984, "hep-cpp": 164, "hep-go": 164,
    "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}


def rewardbench_sections(accuracy: Dict[str, float]) -> Dict[str, float]:
    """Per-subset pair accuracy -> RewardBench's section scores (subsets weighted by
    :data:`REWARDBENCH_WEIGHTS`, over the subsets present), and ``score``, the mean of
    the four sections, when all four are present. Unknown subsets are ignored."""
    out: Dict[str, float] = {}
    for section, subsets in REWARDBENCH_SECTIONS.items():
        present = [s for s in subsets if s in accuracy and not math.isnan(accuracy[s])]
        if present:
            w = sum(REWARDBENCH_WEIGHTS[s] for s in present)
            out[section] = sum(accuracy[s] * REWARDBENCH_WEIGHTS[s] for s in present) / w
    if len(out) == len(REWARDBENCH_SECTIONS):
        out["score"] = sum(out[s] for s in REWARDBENCH_SECTIONS) / len(REWARDBENCH_SECTIONS)
    return out
