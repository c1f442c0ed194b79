"""The built-in verifiable task: multi-step arithmetic word problems with GSM8k-style
answers (``... #### 42``), generated deterministically from a seed.

    files = write_task_files("runs/task", TaskConfig(seed=0))

writes ordinary JSONL files that the regular loaders read (nothing special-cased):

* ``sft.jsonl``         ``{"messages": [user, assistant]}`` worked solutions
* ``preference.jsonl``  ``{"prompt", "chosen", "rejected"}``: a correct solution against a
  plausible wrong one (an arithmetic slip, a dropped step, a wrong operation)
* ``ultrafeedback.jsonl`` the same problems as raw UltraFeedback-style completions with
  per-aspect ratings (the loader turns them into pairs by the mean of aspects)
* ``prompts.jsonl``     ``{"prompt", "reference", "solution"}`` for PPO (and for pairs built
  from the policy's own samples, where ``solution`` is the fallback chosen answer)
* ``eval.jsonl``        held-out ``{"prompt", "reference"}`` problems (disjoint questions)
* ``validation.jsonl``  held-out ``{"prompt", "reference"}`` problems for choosing settings:
  their questions are in none of the other files

A solution is scored by exact match of the number after ``####``.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Set, Tuple

__all__ = ["TaskConfig", "Problem", "generate_problem", "extract_answer", "is_correct",
           "write_task_files", "wrong_solution", "task_texts", "task_problems", "TASK_FILES"]

_NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena",
          "Max", "Nia", "Omar", "Pia", "Ravi", "Sam", "Tess", "Uma"]
_ITEMS = ["apples", "books", "coins", "pens", "stamps", "shells", "cards", "marbles", "eggs",
          "plums", "nails", "beads"]
_GAIN = ["buys", "finds", "gets", "receives", "picks up"]
_LOSS = ["gives away", "loses", "sells", "uses", "eats"]

TASK_FILES = ("sft", "preference", "ultrafeedback", "prompts", "eval", "validation")
"""Names of the files :func:`write_task_files` writes (``<name>.jsonl``)."""


@dataclass(frozen=True)
class TaskConfig:
    """The generated task."""

    seed: int = 0
    """Seed of everything generated."""
    min_steps: int = 1
    """Fewest operations in a problem."""
    max_steps: int = 2
    """Most operations in a problem."""
    max_value: int = 12
    """Largest starting value and operand."""
    num_sft: int = 18000
    """Worked solutions for supervised fine-tuning."""
    num_preference: int = 3000
    """Correct-vs-wrong preference pairs."""
    num_prompts: int = 2000
    """PPO prompts with reference answers."""
    num_eval: int = 500
    """Held-out evaluation problems (never in the other files)."""
    num_validation: int = 500
    """Held-out problems for choosing settings, disjoint from eval and every training file."""


def task_problems(cfg: TaskConfig, prefix: str = "task") -> List[str]:
    """Values of ``cfg`` that cannot generate a task, each naming its key."""
    p: List[str] = []
    if cfg.seed < 0:
        p.append(f"{prefix}.seed={cfg.seed} must be >= 0")
    if cfg.min_steps < 1:
        p.append(f"{prefix}.min_steps={cfg.min_steps} must be >= 1")
    if cfg.max_steps < cfg.min_steps:
        p.append(f"{prefix}.max_steps={cfg.max_steps} is below {prefix}.min_steps={cfg.min_steps}")
    if cfg.max_value < 2:
        p.append(f"{prefix}.max_value={cfg.max_value} must be >= 2")
    for name in ("num_sft", "num_preference", "num_prompts", "num_eval", "num_validation"):
        if getattr(cfg, name) < 1:
            p.append(f"{prefix}.{name}={getattr(cfg, name)} must be >= 1")
    return p


@dataclass(frozen=True)
class Problem:
    question: str
    steps: Tuple[Tuple[str, int, int, int], ...]  # (op, left, right, result)
    answer: int

    def solution(self) -> str:
        lines = [f"{a} {op} {b} = {r}." for op, a, b, r in self.steps]
        return " ".join(lines) + f"\n#### {self.answer}"


def generate_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(2, cfg.max_value)
    text = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(rng.randint(cfg.min_steps, cfg.max_steps)):
        if value > 1 and rng.random() < 0.5:
            b = rng.randint(1, value - 1)
            text.append(f"{name} {rng.choice(_LOSS)} {b}.")
            steps.append(("-", value, b, value - b))
            value -= b
        else:
            b = rng.randint(1, cfg.max_value)
            text.append(f"{name} {rng.choice(_GAIN)} {b} more.")
            steps.append(("+", value, b, value + b))
            value += b
    text.append(f"How many {item} does {name} have now?")
    return Problem(" ".join(text), tuple(steps), value)


_ANSWER = re.compile(r"####\s*(-?[\d,]+)")


def extract_answer(text: str) -> Optional[str]:
    """The number after the last ``####`` (commas removed), or None."""
    found = _ANSWER.findall(text)
    return found[-1].replace(",", "") if found else None


def is_correct(text: str, reference: str) -> bool:
    got = extract_answer(text)
    return got is not None and got == str(reference).replace(",", "").strip()


def wrong_solution(p: Problem, rng: random.Random) -> str:
    """A plausible wrong worked solution: one slip that propagates to the answer."""
    steps = list(p.steps)
    kind = rng.choice(["slip", "slip", "operation", "drop"] if len(steps) > 1 else
                      ["slip", "slip", "operation"])
    k = rng.randrange(len(steps))
    out = []
    value = steps[0][1]
    for i, (op, _, b, _) in enumerate(steps):
        if kind == "drop" and i == k:
            continue
        use_op = op
        if kind == "operation" and i == k:
            use_op = "+" if op == "-" else "-"
        r = value + b if use_op == "+" else value - b
        if kind == "slip" and i == k:
            r += rng.choice([-10, -2, -1, 1, 2, 10])
        out.append(f"{value} {use_op} {b} = {r}.")
        value = r
    if value == p.answer:  # the slip cancelled out; make it visibly wrong
        value += 1
        out[-1] = out[-1].rsplit("=", 1)[0] + f"= {value}."
    return " ".join(out) + f"\n#### {value}"


def _problems(seed: int, cfg: TaskConfig) -> Iterator[Problem]:
    rng = random.Random(seed)
    while True:
        yield generate_problem(rng, cfg)


def task_texts(cfg: TaskConfig, n: int = 4000) -> List[str]:
    """Sample texts (questions and solutions) for training the built-in tokenizer."""
    gen = _problems(cfg.seed + 7, cfg)
    rng = random.Random(cfg.seed + 8)
    out = []
    for _ in range(n):
        p = next(gen)
        out += [p.question, p.solution(), wrong_solution(p, rng)]
    return out


def write_task_files(out_dir: str, cfg: TaskConfig) -> Dict[str, str]:
    """Write the task's JSONL files (deterministic for ``cfg``); returns their paths.

    The validation problems come from their own seeded stream, drawn last and skipping
    every question of the other files, so ``num_validation`` changes no other file."""
    os.makedirs(out_dir, exist_ok=True)
    eval_set = _distinct(_problems(cfg.seed * 1000 + 1, cfg), cfg.num_eval, set(), "eval")
    held = {p.question for p in eval_set}
    gen = _problems(cfg.seed * 1000 + 2, cfg)
    rng = random.Random(cfg.seed * 1000 + 3)

    def fresh(n: int) -> List[Problem]:
        out = []
        while len(out) < n:
            p = next(gen)
            if p.question not in held:
                out.append(p)
        return out

    sft, pref, prompts = fresh(cfg.num_sft), fresh(cfg.num_preference), fresh(cfg.num_prompts)
    used = held | {p.question for p in sft + pref + prompts}
    validation = _distinct(_problems(cfg.seed * 1000 + 4, cfg), cfg.num_validation, used, "validation")
    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in TASK_FILES}
    _write(paths["sft"], ({"messages": [{"role": "user", "content": p.question},
                                        {"role": "assistant", "content": p.solution()}]} for p in sft))
    _write(paths["preference"], ({"prompt": p.question, "chosen": p.solution(),
                                  "rejected": wrong_solution(p, rng)} for p in pref))
    uf_rows = []
    for p in pref[: max(1, len(pref) // 4)]:
        good, bad = p.solution(), wrong_solution(p, rng)
        uf_rows.append({
            "instruction": p.question,
            "completions": [
                {"response": bad, "annotations": _ratings(rng, 1, 2)},
                {"response": good, "annotations": _ratings(rng, 4, 5)},
            ],
        })
    _write(paths["ultrafeedback"], uf_rows)
    _write(paths["prompts"], ({"prompt": p.question, "reference": str(p.answer), "solution": p.solution()}
                              for p in prompts))
    for name, rows in (("eval", eval_set), ("validation", validation)):
        _write(paths[name], ({"prompt": p.question, "reference": str(p.answer)} for p in rows))
    return paths


def _distinct(gen: Iterator[Problem], n: int, excluded: Set[str], what: str,
              patience: int = 200_000) -> List[Problem]:
    """The first ``n`` problems of ``gen`` with distinct questions outside ``excluded``; an
    error after ``patience`` draws in a row found none (too few distinct questions)."""
    out: List[Problem] = []
    seen = set(excluded)
    misses = 0
    while len(out) < n:
        p = next(gen)
        if p.question in seen:
            misses += 1
            if misses > patience:
                raise ValueError(f"the task's settings give too few distinct questions for {n} {what} "
                                 f"problems beside the other files (found {len(out)}): raise max_value "
                                 f"or max_steps, or ask for fewer")
            continue
        misses = 0
        seen.add(p.question)
        out.append(p)
    return out


def _ratings(rng: random.Random, lo: int, hi: int) -> Dict[str, Dict[str, str]]:
    aspects = ("helpfulness", "honesty", "instruction_following", "truthfulness")
    return {a: {"Rating": str(rng.randint(lo, hi))} for a in aspects}


def _write(path: str, rows) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
