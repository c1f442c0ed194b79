"""``megarlhf generate`` and ``megarlhf pairs``: sampling from a checkpoint as a command.

    megarlhf generate --ckpt runs/sft/checkpoint --prompts prompts.jsonl --out out.jsonl --greedy
    torchrun --nproc-per-node 2 -m megarlhf.cli generate --ckpt C --prompts P --out O --tp 2
    megarlhf pairs --ckpt runs/sft/checkpoint --prompts runs/sft/task/prompts.jsonl --out pairs.jsonl

Input rows carry ``prompt`` (text or messages; tokenized with the checkpoint's tokenizer
and chat template: its own, or ``--chat-template``) or ``prompt_ids`` (used as they are;
no tokenizer needed). Output rows
come in input order. Processes beyond TP x PP are data-parallel replicas, each sampling a
contiguous share of the prompts (randomness is keyed by the prompt's index, so the result
does not depend on the number of processes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["generate_main", "pairs_main", "pair_of"]


def _common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--ckpt", required=True, help="checkpoint folder (with megarlhf.json)")
    ap.add_argument("--prompts", required=True, help="JSONL with prompt or prompt_ids per row")
    ap.add_argument("--out", required=True, help="output JSONL")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch", type=int, default=64,
                    help="slots: sequences generated at once (a finished one's slot takes the next prompt)")
    ap.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                    help="format text prompts with this template instead of the checkpoint's own: "
                         "tulu, llama3, or a Hugging Face Jinja template file")


class _Setup:
    """Distributed init, the model from a checkpoint, its tokenizer and chat template."""

    def __init__(self, args):
        from megarlhf.config import ParallelConfig, check_layout
        from megarlhf.models.checkpoint import load_model, read_meta
        from megarlhf.models.llama import build_model
        from megarlhf.parallel import DistEnv, init_distributed, initialize_model_parallel
        from megarlhf.rollout.engine import MegatronEngine

        self.meta = read_meta(args.ckpt)
        env = DistEnv.from_environ()
        par = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
        check_layout(self.meta.model, par, env.world_size, prefix="--tp/--pp")
        init_distributed(env)
        self.rank = env.rank
        self.mp = initialize_model_parallel(par, seed=args.seed)
        self.chunks = build_model(self.meta.model, self.mp)
        load_model(self.chunks, args.ckpt)
        self.tok, self.template = self._template(args.ckpt, args.chat_template)
        # Never sample an id the tokenizer cannot decode (a model's embedding may be larger).
        vocab = self.meta.model.vocab_size
        if self.tok is not None:
            vocab = min(vocab, self.tok.vocab_size)
        self.engine = MegatronEngine(self.chunks, self.mp, vocab, args.max_batch)

    def _template(self, ckpt: str, chosen: Optional[str]):
        """(tokenizer, chat template): the checkpoint's tokenizer (None when it records
        none) and its own template, or ``--chat-template``'s (None without any)."""
        from megarlhf.data.chat import template_flag
        from megarlhf.recipes.pairs_common import tokenizer_of

        if not self.meta.tokenizer:
            return None, None
        say = print if self.rank == 0 else None
        return tokenizer_of(self.meta, ckpt, template_flag(chosen), say=say, require=False)

    def stop_ids(self) -> List[int]:
        """The chat template's stop ids, else the tokenizer's EOS."""
        if self.template is not None:
            return self.template.stop_ids()
        return [self.tok.eos_id] if self.tok is not None else []


def _read_prompts(path: str, template, tok=None) -> Tuple[List[Dict[str, Any]], List[List[int]]]:
    from megarlhf.data.load import DataError, SourceConfig, read_rows
    from megarlhf.data.schemas import RowError, parse_prompt_row

    rows, ids = [], []
    for n, row in read_rows(SourceConfig(path=path)):
        where = f"{path}: line {n}"
        if isinstance(row, RowError):
            raise DataError(f"{where}: {row}")
        if "prompt_ids" in row:
            p = row["prompt_ids"]
            if not (isinstance(p, list) and p and all(isinstance(t, int) and t >= 0 for t in p)):
                raise DataError(f"{where}: field 'prompt_ids': expected a non-empty list of token ids")
            ids.append(p)
        else:
            if tok is None:
                raise DataError(f"{where}: a text prompt needs a tokenizer, and the checkpoint "
                                "records none; give prompt_ids instead")
            if template is None:
                raise DataError(f"{where}: a text prompt needs a chat template, and the checkpoint "
                                "records none (its model came without one): pass --chat-template "
                                "(tulu, llama3, or a Jinja template file), or give prompt_ids instead")
            try:
                parsed = parse_prompt_row(row)
            except RowError as e:
                raise DataError(f"{where}: {e}") from None
            ids.append(template.encode_prompt(parsed["prompt"]))
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no prompts")
    return rows, ids


def _sample(setup: _Setup, ids: List[List[int]], params, label: str) -> Optional[Any]:
    """Responses to ``ids`` from every DP replica, on rank 0 in input order (None elsewhere)."""
    from megarlhf.rollout.engine import generate_everywhere

    for p in ids:
        if len(p) + params.max_new_tokens > setup.meta.model.max_position_embeddings:
            raise ValueError(f"a prompt of {len(p)} tokens + {params.max_new_tokens} new tokens exceeds "
                             f"the model's max_position_embeddings={setup.meta.model.max_position_embeddings}")
    out = generate_everywhere(setup.engine, setup.mp, ids, params, label)
    return out if setup.rank == 0 else None


def _write_jsonl(path: str, rows) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def generate_main(argv: List[str]) -> int:
    from megarlhf.rollout.engine import SamplingParams

    ap = argparse.ArgumentParser(prog="megarlhf generate", description="Sample responses from a checkpoint.")
    _common_args(ap)
    ap.add_argument("--greedy", action="store_true", help="most likely token (no sampling)")
    args = ap.parse_args(argv)
    setup = _Setup(args)
    rows, ids = _read_prompts(args.prompts, setup.template, setup.tok)
    stop = setup.stop_ids()
    eos = setup.tok.eos_id if setup.tok else None
    params = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            stop_ids=stop, seed=args.seed, eos_id=eos)
    out = _sample(setup, ids, params, "generate")
    if setup.rank == 0:
        result = []
        for i, row in enumerate(rows):
            r = {"response_ids": out.response_ids[i], "finish_reason": out.finish_reason[i]}
            if setup.tok:
                r["response"] = setup.tok.decode(out.response_ids[i])
            result.append({**{k: v for k, v in row.items() if k != "prompt_ids"},
                           **({"prompt_ids": row["prompt_ids"]} if "prompt_ids" in row else {}), **r})
        _write_jsonl(args.out, result)
        reasons = {k: out.finish_reason.count(k) for k in sorted(set(out.finish_reason))}
        print(f"wrote {len(result)} responses to {args.out} (finish reasons: {reasons})")
    _teardown()
    return 0


def pairs_main(argv: List[str]) -> int:
    """Preference pairs from the policy's own samples on verifiable prompts: chosen is a
    correct sample (or the row's ``solution`` when none was), rejected a wrong sample."""
    from megarlhf.rollout.engine import SamplingParams

    ap = argparse.ArgumentParser(prog="megarlhf pairs", description=pairs_main.__doc__)
    _common_args(ap)
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.set_defaults(temperature=0.7, max_new_tokens=64)
    args = ap.parse_args(argv)
    setup = _Setup(args)
    if setup.template is None:
        raise SystemExit("megarlhf pairs: the checkpoint records no tokenizer or no chat template "
                         "(--chat-template names one)")
    rows, ids = _read_prompts(args.prompts, setup.template, setup.tok)
    for i, row in enumerate(rows):
        if row.get("reference") is None:
            raise SystemExit(f"{args.prompts}: row {i + 1}: field 'reference' is missing "
                             "(pairs need verifiable prompts)")
    k = args.samples_per_prompt
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, stop_ids=setup.template.stop_ids(),
                            seed=args.seed, eos_id=setup.template.tok.eos_id)
    out = _sample(setup, [p for p in ids for _ in range(k)], params, "pairs")
    if setup.rank == 0:
        tok, rng = setup.template.tok, random.Random(args.seed)
        pairs, counts = [], {"pairs": 0, "all_correct": 0, "no_correct_no_solution": 0,
                             "chosen_from_policy": 0, "chosen_from_solution": 0, "empty_samples": 0,
                             "only_empty_wrong": 0}
        for i, row in enumerate(rows):
            texts = [tok.decode([t for t in out.response_ids[i * k + j] if t not in setup.template.stop_ids()])
                     for j in range(k)]
            pair = pair_of(texts, row, rng, counts)
            if pair is not None:
                pairs.append({"prompt": row["prompt"], "chosen": pair[0], "rejected": pair[1],
                              "reference": row["reference"]})
        counts["pairs"] = len(pairs)
        _write_jsonl(args.out, pairs)
        print(f"wrote {len(pairs)} pairs to {args.out} from {len(rows)} prompts x {k} samples: {counts}")
    _teardown()
    return 0


def pair_of(texts: List[str], row: Dict[str, Any], rng: random.Random,
            counts: Dict[str, int]) -> Optional[Tuple[str, str]]:
    """(chosen, rejected) from one prompt's sampled answers, or None, counting why in
    ``counts``: chosen is the first right answer (else the row's ``solution``), rejected a
    random wrong one, preferring those with a final ``####`` number. Empty answers (the
    policy stopped at once) have no text to train on and are never either side."""
    from megarlhf.data.task import extract_answer, is_correct

    empty = sum(1 for t in texts if not t.strip())
    counts["empty_samples"] += empty
    texts = [t for t in texts if t.strip()]
    good = [t for t in texts if is_correct(t, row["reference"])]
    bad = [t for t in texts if not is_correct(t, row["reference"]) and extract_answer(t) is not None]
    bad = bad or [t for t in texts if not is_correct(t, row["reference"])]
    if not bad:
        counts["only_empty_wrong" if empty else "all_correct"] += 1
        return None
    if good:
        counts["chosen_from_policy"] += 1
        return good[0], rng.choice(bad)
    if isinstance(row.get("solution"), str):
        counts["chosen_from_solution"] += 1
        return row["solution"], rng.choice(bad)
    counts["no_correct_no_solution"] += 1
    return None


def _teardown() -> None:
    from megarlhf.parallel import destroy

    destroy()


if __name__ == "__main__":
    sys.exit(generate_main(sys.argv[1:]))
