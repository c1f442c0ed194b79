"""``megarlhf eval``: exact match, instruction following, best-of-N and reward-model pair
accuracy, written as JSON and a markdown table.

    megarlhf eval --ckpt runs/sft/checkpoint --data gsm8k_test.jsonl --few-shot gsm8k_train.jsonl
    megarlhf eval --ckpt runs/ppo/final --data runs/sft/task/eval.jsonl --task builtin --tp 2
    megarlhf eval --ckpt runs/sft/checkpoint --data ifeval.jsonl --max-new-tokens 1024
    megarlhf eval --ckpt runs/sft/checkpoint --data runs/sft/task/eval.jsonl \\
        --reward-ckpt runs/rm/final --best-of 16 --pairs rewardbench.jsonl
    megarlhf eval --ckpt runs/rm/final --pairs rewardbench.jsonl

Steps: arguments, checkpoints and data checked (before any process starts) -> the policy
answers every prompt greedily with the rollout engine (any TP x PP; further processes
are data-parallel replicas) -> with ``--best-of N``, N samples per prompt (randomness
keyed by the prompt, so any layout samples the same) -> the policy is freed and the
reward model is loaded on the same ranks (its own TP x PP) -> it scores every sample
(prompt + response rendered with its chat template, read with the pooling it was
trained with) and the highest-scored sample is kept -> pair accuracy on ``--pairs``
(per subset, and RewardBench's sections when the subsets are RewardBench's) -> rank 0
writes ``OUT/eval.json`` (metrics, counts, settings, seconds), ``OUT/eval.md`` and
``OUT/samples.jsonl`` (every prompt's responses and their scores) and prints the table.

Tasks (``--task``, default ``auto``: ``ifeval`` when rows carry ``instruction_id_list``,
else ``gsm8k``): ``gsm8k`` scores the final number as GSM8k does (the number after the
last ``####``, else the last number; compared as numbers; ``exact_match_strict`` needs
the ``####``); ``builtin`` uses the built-in task's checker; ``ifeval`` checks the
instructions each row lists (IFEval's ``instruction_id_list``/``kwargs``; the ids are in
``megarlhf.eval.metrics.RULES``). Rows: ``prompt`` (text or messages), ``messages`` (the
prompt is what precedes the last assistant message) or ``question`` (GSM8k); the
reference answer in ``reference`` (``--reference-field``) or, GSM8k style, the number
after ``####`` in ``answer``. Few-shot exemplars (``--few-shot``) are earlier chat turns:
question, then its worked answer (``answer``, ``solution``, ``response`` or the last
assistant message; GSM8k's ``<<...>>`` calculator notes removed).

Departures from the paper's evaluation: no built-in exemplar set (the paper's GSM8k is
8-shot chain of thought: pass its exemplars with ``--few-shot``); the reward model sees
the question without the exemplars, and a response cut at ``--max-new-tokens`` is
scored as a finished turn (as any chat-template scorer does; ``finish_reason`` in the
samples file tells them apart).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megarlhf.eval import metrics as M

__all__ = ["EvalRow", "read_eval_rows", "with_shots", "processes", "main"]

TASKS = ("auto", "gsm8k", "builtin", "ifeval")
Message = Dict[str, str]


# -- data -----------------------------------------------------------------------------------------
@dataclass
class EvalRow:
    """One prompt to answer."""

    prompt: List[Message]
    reference: Optional[str] = None
    """The reference answer (``gsm8k``, ``builtin``)."""
    instructions: List[M.Instruction] = field(default_factory=list)
    """Checked instructions (``ifeval``)."""
    solution: Optional[str] = None
    """A worked answer, when the row has one (few-shot exemplars)."""
    where: str = ""
    """``FILE: line N`` (``row N`` for JSON/Parquet), for messages."""
    key: Any = None
    """The row's ``key`` or ``id``, copied to the samples file."""


def _solution_of(row: Dict[str, Any]) -> Optional[str]:
    for name in ("solution", "answer", "response", "completion"):
        v = row.get(name)
        if isinstance(v, str) and v.strip():
            return v
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
        v = msgs[-1].get("content")
        return v if isinstance(v, str) and v.strip() else None
    return None


def read_eval_rows(path: str, task: str, reference_field: str = "reference") -> Tuple[List[EvalRow], str]:
    """Rows of an evaluation file (JSONL, JSON, Parquet or a hub dataset) checked for
    ``task``, and the task (``auto`` resolved). ``task="shots"`` reads few-shot exemplars
    (a prompt and a worked answer each). A bad row raises ``DataError`` naming the file,
    the line (or row) and the field."""
    from megarlhf.data.load import DataError, SourceConfig, read_rows
    from megarlhf.data.schemas import RowError, parse_prompt_row

    unit = "line" if path.endswith(".jsonl") else "row"
    out: List[EvalRow] = []
    for n, row in read_rows(SourceConfig(path=path)):
        where = f"{path}: {unit} {n}"
        if isinstance(row, RowError):
            raise DataError(f"{where}: {row}")
        if task == "auto":
            task = "ifeval" if "instruction_id_list" in row else "gsm8k"
        try:
            if "prompt" not in row and "messages" not in row and "question" in row:
                q = row["question"]
                if not isinstance(q, str) or not q.strip():
                    raise RowError("question", f"expected a non-empty string, got {q!r}")
                parsed = {"prompt": [{"role": "user", "content": q}], "reference": None}
                ref = row.get(reference_field)
                parsed["reference"] = None if ref is None else str(ref)
            else:
                parsed = parse_prompt_row(row, reference_field)
            ex = EvalRow(prompt=parsed["prompt"], solution=_solution_of(row), where=where,
                         key=row.get("key", row.get("id")))
            if task == "shots":
                if ex.solution is None:
                    raise RowError("answer", "a few-shot exemplar needs a worked answer ('answer', "
                                             "'solution', 'response' or a last assistant message)")
            elif task == "ifeval":
                ex.instructions = M.parse_instructions(row)
            else:
                ref = parsed["reference"]
                if ref is None and isinstance(row.get("answer"), str):
                    ref = M.gsm8k_reference(row["answer"])  # GSM8k: "... #### 72"
                    if ref is None:
                        raise RowError("answer", "no number after '####' to use as the reference")
                if ref is None:
                    raise RowError(reference_field, "missing (a reference answer is needed to score "
                                                    f"--task {task}; or give GSM8k's 'answer')")
                if task == "gsm8k" and M.gsm8k_reference(ref) is None:
                    raise RowError(reference_field, f"not a number: {ref!r}")
                ex.reference = ref
        except (RowError, M.RuleError) as e:
            raise DataError(f"{where}: {e}") from None
        out.append(ex)
    if not out:
        raise DataError(f"{path}: no rows")
    return out, task


def with_shots(prompt: Sequence[Message], shots: Sequence[EvalRow]) -> List[Message]:
    """The prompt preceded by few-shot exemplars as earlier turns (user question, assistant
    worked answer); the prompt's system message, if any, stays first."""
    system = [m for m in prompt if m["role"] == "system"]
    turns: List[Message] = []
    for s in shots:
        turns += [m for m in s.prompt if m["role"] != "system"]
        turns.append({"role": "assistant", "content": M.strip_calculator_annotations(s.solution or "")})
    return system + turns + [m for m in prompt if m["role"] != "system"]


# -- arguments and checks (before any process starts) ----------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="megarlhf eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="the policy (causal) checkpoint; or a reward model "
                                                  "with --pairs alone")
    ap.add_argument("--data", help="prompts to answer (JSONL/JSON/Parquet or a hub dataset)")
    ap.add_argument("--task", default="auto", choices=TASKS, help="how answers are scored (default: "
                    "ifeval if rows carry instruction_id_list, else gsm8k)")
    ap.add_argument("--reference-field", default="reference", help="field of the reference answer")
    ap.add_argument("--few-shot", metavar="FILE_OR_N", help="exemplars before each prompt: a file "
                    "(its first --shots rows), or N: the first N rows of --data (not scored then)")
    ap.add_argument("--shots", type=int, default=8, help="exemplars taken from a --few-shot file")
    ap.add_argument("--limit", type=int, help="score only the first N prompts")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="most tokens per answer")
    ap.add_argument("--batch", type=int, default=64, help="sequences generated at once per replica")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the policy (--ckpt)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the policy (--ckpt)")
    rm = ap.add_argument_group("reward model")
    rm.add_argument("--reward-ckpt", help="reward model for --best-of and --pairs")
    rm.add_argument("--best-of", type=int, default=0, metavar="N",
                    help="sample N responses per prompt, keep the one the reward model scores highest")
    rm.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for --best-of")
    rm.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for --best-of (1: off)")
    rm.add_argument("--top-k", type=int, default=0, help="top-k sampling for --best-of (0: off)")
    rm.add_argument("--seed", type=int, default=0, help="seed of the per-prompt sampling generators")
    rm.add_argument("--reward-tp", type=int, help="tensor-parallel size of the reward model (default --tp)")
    rm.add_argument("--reward-pp", type=int, help="pipeline-parallel size of the reward model (default --pp)")
    rm.add_argument("--reward-batch", type=int, default=16, help="sequences (pairs for --pairs) per forward")
    rm.add_argument("--pairs", help="preference pairs for the reward model's pair accuracy (per "
                    "subset: RewardBench's file layout)")
    rm.add_argument("--pairs-schema", default="auto", help="schema of --pairs (see the data docs)")
    ap.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                    help="format prompts with this template instead of each checkpoint's own: tulu, "
                         "llama3, or a Hugging Face Jinja template file")
    ap.add_argument("--out", default="runs/eval", help="folder for eval.json, eval.md, samples.jsonl")
    return ap


@dataclass
class _Plan:
    """What a run does, checked; the same in every process."""

    args: argparse.Namespace
    world: int
    policy: Optional[Tuple[str, Any, Any]] = None   # (ckpt, meta, ParallelConfig)
    reward: Optional[Tuple[str, Any, Any]] = None
    task: Optional[str] = None
    rows: List[EvalRow] = field(default_factory=list)
    shots: List[EvalRow] = field(default_factory=list)
    held_out_shots: int = 0


def _plan(args: argparse.Namespace, world: Optional[int] = None) -> _Plan:
    from megarlhf.config import ParallelConfig, check_layout
    from megarlhf.data.load import DataError
    from megarlhf.models.checkpoint import read_meta

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    meta = read_meta(args.ckpt)
    par = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    rpar = ParallelConfig(tensor_model_parallel_size=args.reward_tp or args.tp,
                          pipeline_model_parallel_size=args.reward_pp or args.pp)
    need(args.max_new_tokens >= 1, "--max-new-tokens must be >= 1")
    need(args.batch >= 1 and args.reward_batch >= 1, "--batch and --reward-batch must be >= 1")
    need(args.limit is None or args.limit >= 1, "--limit must be >= 1")
    need(args.best_of >= 0, "--best-of must be >= 1")
    plan = _Plan(args=args, world=1)
    if meta.kind == "reward":
        need(not args.data and not args.best_of and not args.reward_ckpt,
             f"{args.ckpt} is a reward model: it can only be scored with --pairs; give a policy "
             "checkpoint as --ckpt to answer --data (and the reward model as --reward-ckpt)")
        need(bool(args.pairs), f"{args.ckpt} is a reward model: give --pairs to measure its pair accuracy")
        need(args.reward_tp is None and args.reward_pp is None,
             "--reward-tp/--reward-pp apply to --reward-ckpt; this reward model runs at --tp/--pp")
        plan.reward = (args.ckpt, meta, par)
    else:
        need(bool(args.data or args.pairs), "nothing to evaluate: give --data (prompts to answer) "
                                            "and/or --pairs with --reward-ckpt")
        need(not args.pairs or bool(args.reward_ckpt),
             "--pairs measures a reward model: give it as --reward-ckpt")
        need(not args.best_of or bool(args.reward_ckpt and args.data),
             "--best-of N needs --reward-ckpt (the judge) and --data (the prompts)")
        need(not args.reward_ckpt or bool(args.best_of or args.pairs),
             "--reward-ckpt is used by --best-of N and --pairs: give one of them")
        need(not args.best_of or args.temperature > 0, "--temperature must be > 0 for --best-of")
        if args.data:
            need(bool(meta.tokenizer), f"{args.ckpt}: the checkpoint records no tokenizer, so text "
                                       "prompts cannot be encoded")
            plan.policy = (args.ckpt, meta, par)
        if args.reward_ckpt:
            rmeta = read_meta(args.reward_ckpt)
            need(rmeta.kind == "reward", f"--reward-ckpt {args.reward_ckpt} is a {rmeta.kind} checkpoint, "
                                         "not a reward model")
            plan.reward = (args.reward_ckpt, rmeta, rpar)
    if plan.reward is not None:
        need(bool(plan.reward[1].tokenizer), f"{plan.reward[0]}: the reward model records no tokenizer")
    # the job: every model's TP x PP must divide it; processes beyond that are DP replicas
    sizes = [p[2].model_parallel_size for p in (plan.policy, plan.reward) if p is not None]
    plan.world = world or math.lcm(*sizes)
    if plan.policy is not None:
        check_layout(plan.policy[1].model, plan.policy[2], plan.world, prefix="--tp/--pp")
    if plan.reward is not None:
        prefix = "--tp/--pp" if plan.reward[0] == args.ckpt else "--reward-tp/--reward-pp"
        check_layout(plan.reward[1].model, plan.reward[2], plan.world, prefix=prefix)
    if args.data:
        rows, plan.task = read_eval_rows(args.data, args.task, args.reference_field)
        if args.few_shot:
            if args.few_shot.isdigit() and not os.path.exists(args.few_shot):
                k = int(args.few_shot)
                need(0 < k < len(rows), f"--few-shot {k}: needs 0 < N < the {len(rows)} rows of --data")
                for r in rows[:k]:
                    if r.solution is None:
                        raise DataError(f"{r.where}: field 'answer': a few-shot exemplar needs a worked "
                                        "answer ('answer', 'solution', 'response' or a last assistant "
                                        "message)")
                plan.shots, rows, plan.held_out_shots = rows[:k], rows[k:], k
            else:
                need(args.shots >= 1, "--shots must be >= 1")
                plan.shots = read_eval_rows(args.few_shot, "shots")[0][:args.shots]
        plan.rows = rows[:args.limit] if args.limit else rows
    return plan


def processes(argv: List[str]) -> int:
    """Check the arguments, checkpoints and data; the number of processes the run needs
    (the least common multiple of the models' TP x PP). Called before processes start."""
    return _plan(_parser().parse_args(argv)).world


# -- the models at work ----------------------------------------------------------------------------
def _generate(engine, mp, prompts: List[List[int]], params, label: str) -> Tuple[List[List[int]], List[str]]:
    """Responses to ``prompts`` from every data-parallel replica; every rank gets them all."""
    from megarlhf.rollout.engine import generate_everywhere

    out = generate_everywhere(engine, mp, prompts, params, label, unit="seq")
    return out.response_ids, out.finish_reason


@dataclass
class _ScoreBatch:
    """Rows to score. tokens/position_ids/response ``[b, s]``, last_index ``[b]``; the
    first ``real`` rows count (the rest repeat the last row: equal shapes for the pipeline)."""

    tokens: Any
    position_ids: Any
    response: Any
    last_index: Any
    real: int

    def to(self, device) -> "_ScoreBatch":
        return _ScoreBatch(self.tokens.to(device), self.position_ids.to(device), self.response.to(device),
                           self.last_index.to(device), self.real)


def _reward_step(device, pooling: str):
    """Forward-only: one pooled reward per real row."""
    from megarlhf.algos.preference import pool_rewards

    def step(it, model):
        b = next(it).to(device)
        out = model(b.tokens, b.position_ids, attention_mask=None)

        def collect(output, non_loss_data=True):
            return pool_rewards(output[..., 0].float(), b.response, b.last_index, pooling)[:b.real]
        return out, collect
    return step


def _score(chunks, mp, template, conversations: List[List[Message]], pooling: str, batch: int,
           max_len: int, device) -> List[float]:
    """Reward of each conversation (ending with the assistant's response), rendered as the
    reward model was trained (chat template, ending at the end token); every rank gets
    every score."""
    import torch

    from megarlhf.algos.preference import response_positions
    from megarlhf.data.batch import pad_examples
    from megarlhf.models.llama import pad_to, sequence_multiple_of
    from megarlhf.train.roles import is_writer, share_rows
    from megarlhf.train.step import forward_only

    rows = [template.encode(c, end_at_stop=True) for c in conversations]
    for i, (ids, _) in enumerate(rows):
        if len(ids) > max_len:
            raise ValueError(f"sample {i}: {len(ids)} tokens for the reward model exceed its "
                             f"max_position_embeddings={max_len}")
    seq = pad_to(max(len(ids) for ids, _ in rows), sequence_multiple_of(chunks))
    n = len(rows)
    per = -(-n // mp.dp_size)
    mine = range(min(n, mp.dp_rank * per), min(n, (mp.dp_rank + 1) * per))
    micro = []
    for s in range(mine.start, mine.stop, batch):
        part = rows[s:min(s + batch, mine.stop)]
        real = len(part)
        part = part + [part[-1]] * (batch - real)
        lm = pad_examples(part, seq, template.tok.pad_id)
        last = torch.tensor([len(ids) - 1 for ids, _ in part], dtype=torch.long)
        micro.append(_ScoreBatch(lm.tokens, lm.position_ids, response_positions(lm.loss_mask), last, real))
    outs = forward_only(chunks, mp, _reward_step(device, pooling), micro, seq, batch) if micro else []
    values = torch.cat(outs) if outs else None
    return share_rows(n, (), torch.float32, mine, values, is_writer(mp) and bool(outs), device).tolist()


def _pair_accuracy(chunks, mp, template, path: str, schema: str, batch: int, max_len: int, pooling: str,
                   device) -> Tuple[Dict[str, float], Dict[str, int]]:
    """Pair accuracy on a preference file (the reward-model recipe's evaluation), per
    subset, and RewardBench's sections; with the pair counts."""
    from megarlhf.data.dataset import DataConfig, build_dataset
    from megarlhf.data.load import SourceConfig
    from megarlhf.recipes.reward_model import evaluate_pairs

    data = build_dataset(DataConfig(sources=[SourceConfig(path=path, schema=schema)], dedup=False,
                                    max_length=max_len, max_prompt_length=max_len), "preference", template)
    ds = data.train
    seq = max(max(len(x) for x in ds["chosen_ids"]), max(len(x) for x in ds["rejected_ids"]))
    res = evaluate_pairs(chunks, mp, ds, batch, seq, template.tok.pad_id, device, subsets=True,
                         pooling=pooling)
    metrics = {"pairs/accuracy": res["accuracy"], "pairs/margin": res["margin"],
               "pairs/dropped": sum(s.rows - s.kept for s in data.report.sources)}
    counts = {"pairs/accuracy": len(ds), "pairs/margin": len(ds),
              "pairs/dropped": sum(s.rows for s in data.report.sources)}
    subsets = [s for s in ds["subset"] if s is not None]
    per = {k[len("accuracy/"):]: v for k, v in res.items() if k.startswith("accuracy/")}
    for name in sorted(per):
        metrics[f"pairs/accuracy/{name}"] = per[name]
        counts[f"pairs/accuracy/{name}"] = subsets.count(name)
    for section, v in M.rewardbench_sections(per).items():
        key = "pairs/rewardbench" if section == "score" else f"pairs/section/{section}"
        metrics[key] = v
        members = [s for s in M.REWARDBENCH_SECTIONS.get(section, ()) if s in per] if section != "score" \
            else [s for s in per if s in M.REWARDBENCH_WEIGHTS]
        counts[key] = sum(subsets.count(s) for s in members)
    return metrics, counts


def _score_text(task: str, text: str, row: EvalRow) -> Dict[str, Any]:
    if task == "gsm8k":
        return M.score_gsm8k(text, row.reference)
    if task == "builtin":
        return M.score_builtin(text, row.reference)
    return M.score_ifeval(text, row.instructions)


def _task_metrics(task: str, scores: List[Dict[str, Any]],
                  rows: List[EvalRow]) -> Dict[str, Tuple[float, int]]:
    """``name -> (value, n)`` of the greedy answers."""
    n = len(scores)
    if task == "ifeval":
        out = {}
        per_id: Dict[str, int] = {}
        for r in rows:
            for rid, _ in r.instructions:
                per_id[rid] = per_id.get(rid, 0) + 1
        n_ins = sum(per_id.values())
        for k, v in M.ifeval_summary(scores).items():
            size = n if k.startswith("prompt") else per_id[k.split("/", 1)[1]] if "/" in k else n_ins
            out[f"ifeval/{k}"] = (v, size)
        return out
    out = {f"{task}/exact_match": (sum(s["correct"] for s in scores) / n, n)}
    if task == "gsm8k":
        out["gsm8k/exact_match_strict"] = (sum(s["correct_strict"] for s in scores) / n, n)
    out[f"{task}/no_answer"] = (sum(s["answer"] is None for s in scores) / n, n)
    return out


@dataclass
class _Results:
    """What the phases found: ``metrics`` name -> (value, n), one record per prompt (the
    samples file), greedy finish reasons, seconds per phase."""

    metrics: Dict[str, Tuple[float, int]] = field(default_factory=dict)
    records: List[Dict[str, Any]] = field(default_factory=list)
    finish: Dict[str, int] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    samples: List[Tuple[str, str]] = field(default_factory=list)
    """Best-of-N samples (text, finish reason), prompt-major: prompt j's k-th is j * N + k."""


def _answer(plan: _Plan, res: _Results, say):
    """The policy answers every prompt greedily (and samples N per prompt for best-of-N);
    returns its layout. The policy is freed before returning."""
    import gc

    import torch

    from megarlhf.models.checkpoint import load_model
    from megarlhf.models.llama import build_model, describe
    from megarlhf.parallel import initialize_model_parallel
    from megarlhf.data.chat import template_flag
    from megarlhf.recipes.pairs_common import tokenizer_of
    from megarlhf.rollout.engine import MegatronEngine, SamplingParams

    args, (ckpt, meta, par), n = plan.args, plan.policy, plan.args.best_of
    mp = initialize_model_parallel(par, seed=args.seed)
    tok, template = tokenizer_of(meta, ckpt, template_flag(args.chat_template), say=say)
    chunks = build_model(meta.model, mp)
    load_model(chunks, ckpt)
    say(f"policy: {describe(meta.model, mp)} from {ckpt}")
    engine = MegatronEngine(chunks, mp, min(meta.model.vocab_size, tok.vocab_size), max_batch=args.batch)
    ids = [template.encode_prompt(with_shots(r.prompt, plan.shots)) for r in plan.rows]
    limit = meta.model.max_position_embeddings
    for r, p in zip(plan.rows, ids):
        if len(p) + args.max_new_tokens > limit:
            shots = " with the few-shot exemplars" if plan.shots else ""
            raise ValueError(f"{r.where}: the prompt ({len(p)} tokens{shots}) + --max-new-tokens "
                             f"{args.max_new_tokens} exceeds the policy's max_position_embeddings={limit}")
    stop = template.stop_ids()

    def text(resp: List[int]) -> str:
        return tok.decode([t for t in resp if t not in stop])

    t0 = time.time()
    out, reasons = _generate(engine, mp, ids, SamplingParams(
        max_new_tokens=args.max_new_tokens, greedy=True, stop_ids=stop, eos_id=tok.eos_id), "greedy")
    res.seconds["generate"] = time.time() - t0
    if n:
        t0 = time.time()
        s_out, s_reasons = _generate(engine, mp, [p for p in ids for _ in range(n)], SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, stop_ids=stop, eos_id=tok.eos_id, seed=args.seed), f"best-of-{n}")
        res.seconds["sample"] = time.time() - t0
        res.samples = [(text(r), f) for r, f in zip(s_out, s_reasons)]
    del engine, chunks  # one model at a time: the reward model comes next
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    greedy = [text(r) for r in out]
    scores = [_score_text(plan.task, t, r) for t, r in zip(greedy, plan.rows)]
    res.metrics.update(_task_metrics(plan.task, scores, plan.rows))
    for k in reasons:
        res.finish[k] = res.finish.get(k, 0) + 1
    for i, (r, t, s, f) in enumerate(zip(plan.rows, greedy, scores, reasons)):
        rec = {"index": i, "source": r.where, "key": r.key, "prompt": r.prompt, "prompt_tokens": len(ids[i]),
               "reference": r.reference, "response": t, "finish_reason": f, **s}
        if plan.task == "ifeval":
            rec["instructions"] = [{"id": rid, "kwargs": kw} for rid, kw in r.instructions]
        res.records.append(rec)
    return mp


def _judge(plan: _Plan, res: _Results, mp, say) -> None:
    """The reward model, on the same ranks with its own layout, scores the best-of-N
    samples and the ``--pairs``."""
    from megarlhf import platform
    from megarlhf.models.checkpoint import load_model
    from megarlhf.models.llama import build_model, describe
    from megarlhf.data.chat import template_flag
    from megarlhf.parallel import build_layout, initialize_model_parallel
    from megarlhf.recipes.pairs_common import tokenizer_of

    args, (ckpt, meta, par), n = plan.args, plan.reward, plan.args.best_of
    dev = platform.current().device
    if mp is None:
        mp = initialize_model_parallel(par, seed=args.seed)
    elif par != plan.policy[2]:
        mp = build_layout(par, seed=args.seed)  # the same ranks, the reward model's own groups
    _, template = tokenizer_of(meta, ckpt, template_flag(args.chat_template))
    chunks = build_model(meta.model, mp, kind="reward")
    load_model(chunks, ckpt)
    pooling = meta.extra.get("reward_pooling", "last")
    say(f"reward model: {describe(meta.model, mp)} from {ckpt} (reward pooling: {pooling})")
    max_len = meta.model.max_position_embeddings
    if n:
        t0 = time.time()
        convs = [r.prompt + [{"role": "assistant", "content": res.samples[j * n + k][0]}]
                 for j, r in enumerate(plan.rows) for k in range(n)]
        rewards = _score(chunks, mp, template, convs, pooling, args.reward_batch, max_len, dev)
        res.seconds["score"] = time.time() - t0
        scores = [_score_text(plan.task, t, plan.rows[i // n]) for i, (t, _) in enumerate(res.samples)]
        p = len(plan.rows)
        R = [rewards[j * n:(j + 1) * n] for j in range(p)]
        bon = M.best_of_n(R, [[s["correct"] for s in scores[j * n:(j + 1) * n]] for j in range(p)])
        pre = f"{plan.task}/best_of_{n}"
        res.metrics.update({
            f"{pre}/accuracy": (bon["accuracy"], p), f"{pre}/mean_sample": (bon["mean_sample"], p * n),
            f"{pre}/pass_at_{n}": (bon["pass_at_n"], p), f"{pre}/all_correct": (bon["all_correct"], p),
            f"{pre}/reward_mean": (sum(rewards) / len(rewards), p * n),
            f"{pre}/reward_selected_mean": (sum(R[j][k] for j, k in enumerate(bon["selected"])) / p, p)})
        for j, rec in enumerate(res.records):
            rec["samples"] = [{"response": t, "finish_reason": f, "reward": R[j][k], **scores[j * n + k]}
                              for k, (t, f) in enumerate(res.samples[j * n:(j + 1) * n])]
            rec["selected"] = bon["selected"][j]
    if args.pairs:
        t0 = time.time()
        values, counts = _pair_accuracy(chunks, mp, template, args.pairs, args.pairs_schema,
                                        args.reward_batch, max_len, pooling, dev)
        res.seconds["pairs"] = time.time() - t0
        res.metrics.update({k: (v, counts[k]) for k, v in values.items()})


def _run(plan: _Plan) -> Optional[Dict[str, Any]]:
    from megarlhf import platform
    from megarlhf.parallel import DistEnv, destroy, init_distributed

    t_start = time.time()
    env = DistEnv.from_environ()
    init_distributed(env)

    def say(msg: str) -> None:
        if env.rank == 0:
            print(msg, flush=True)

    say(f"megarlhf eval: {env.world_size} process(es) on {platform.current().describe()}")
    res = _Results()
    mp = _answer(plan, res, say) if plan.policy is not None else None
    if plan.reward is not None:
        _judge(plan, res, mp, say)
    res.seconds["total"] = time.time() - t_start
    destroy()
    return _report(plan, env.world_size, res) if env.rank == 0 else None


# -- the report ------------------------------------------------------------------------------------
def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def _settings(plan: _Plan, world: int) -> Dict[str, Any]:
    a = plan.args
    import megarlhf

    s: Dict[str, Any] = {"megarlhf_version": megarlhf.__version__, "processes": world}
    if plan.policy is not None:
        s.update(ckpt=os.path.abspath(a.ckpt), data=a.data, task=plan.task, few_shot=a.few_shot,
                 shots=len(plan.shots), limit=a.limit, max_new_tokens=a.max_new_tokens, decoding="greedy",
                 tp=a.tp, pp=a.pp, dp=world // (a.tp * a.pp))
    if plan.reward is not None:
        rckpt, rmeta, rpar = plan.reward
        s.update(reward_ckpt=os.path.abspath(rckpt), reward_pooling=rmeta.extra.get("reward_pooling", "last"),
                 reward_tp=rpar.tp, reward_pp=rpar.pp)
        if a.best_of:
            s.update(best_of=a.best_of, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed)
        if a.pairs:
            s.update(pairs=a.pairs, pairs_schema=a.pairs_schema)
    return s


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "n/a"
    if key == "pairs/dropped":
        return str(int(v))
    if key.endswith(("reward_mean", "reward_selected_mean", "pairs/margin")):
        return f"{v:.4f}"
    return f"{100 * v:.1f}%"


def markdown_table(metrics: Dict[str, Any], counts: Dict[str, int], title: str = "") -> str:
    """``| metric | value | n |`` rows in the given order; fractions as percentages."""
    lines = ([f"**{title}**", ""] if title else []) + ["| metric | value | n |", "|---|---:|---:|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {_fmt(k, v)} | {counts.get(k, '')} |")
    return "\n".join(lines) + "\n"


def _report(plan: _Plan, world: int, res: _Results) -> Dict[str, Any]:
    args = plan.args
    values = {k: _clean(v) for k, (v, _) in res.metrics.items()}
    counts = {k: n for k, (_, n) in res.metrics.items()}
    finish, seconds = res.finish, res.seconds
    result = {"metrics": values, "counts": counts,
              "prompts": len(plan.rows), "few_shot_held_out": plan.held_out_shots,
              "finish_reasons": finish, "settings": _settings(plan, world),
              "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    what = []
    if plan.policy is not None:
        shots = f", {len(plan.shots)}-shot" if plan.shots else ""
        bon = f"; best of {args.best_of} at temperature {args.temperature}" if args.best_of else ""
        what.append(f"{args.ckpt} on {args.data} ({plan.task}, {len(plan.rows)} prompts, greedy{shots}{bon})")
    if plan.reward is not None:
        what.append(f"reward model {plan.reward[0]}" + (f" on {args.pairs}" if args.pairs else ""))
    table = markdown_table(values, counts, "megarlhf eval: " + "; ".join(what))
    os.makedirs(args.out, exist_ok=True)
    paths = {name: os.path.join(args.out, name) for name in ("eval.json", "eval.md", "samples.jsonl")}
    _write(paths["eval.json"], json.dumps(result, indent=2) + "\n")
    _write(paths["eval.md"], table)
    _write(paths["samples.jsonl"], "".join(json.dumps(r) + "\n" for r in res.records))
    print(table, end="")
    if finish:
        print(f"finish reasons (greedy): {finish}")
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    print(paths["eval.json"])
    return result


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: List[str]) -> int:
    from megarlhf.parallel import DistEnv

    args = _parser().parse_args(argv)
    env = DistEnv.from_environ()
    plan = _plan(args, world=env.world_size if env.source != "single" else None)
    if env.source == "single" and plan.world > 1:
        raise ValueError(f"this evaluation needs {plan.world} processes: run it through `megarlhf eval` "
                         "(which starts them) or torchrun")
    _run(plan)
    return 0
