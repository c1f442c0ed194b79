"""Plain functions the recipes share (no recipe inherits from another)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from megarlhf.algos.logprobs import token_logprobs, vocab_start_of
from megarlhf.config import ModelConfig
from megarlhf.parallel import ModelParallel

__all__ = ["lm_forward_step", "ExactMatch", "gather_outcomes", "exact_match_eval", "checkpoint_exact_match",
           "Evaluator"]


def lm_forward_step(mp: ModelParallel, model_cfg: ModelConfig, device) -> Callable:
    """megatron ``forward_step_func`` for next-token loss on :class:`LMBatch` microbatches.

    Returns the token-summed loss and the number of loss tokens (megatron divides by the
    global count when ``calculate_per_token_loss`` is set), so packing does not change it.
    """
    from megarlhf.models.llama import padded_vocab

    tp = mp.config.tp
    vstart = vocab_start_of(mp.tp_rank, padded_vocab(model_cfg, tp), tp)

    def forward_step(data_iter, model):
        b = next(data_iter).to(device)
        logits = model(b.tokens, b.position_ids, attention_mask=b.attention_mask,
                       packed_seq_params=b.packed_seq_params)

        def loss_fn(output):
            lp = token_logprobs(output, b.labels, mp.tp_group, vstart)
            loss_sum = -(lp * b.loss_mask).sum()
            n = b.loss_mask.sum().to(torch.int)
            return loss_sum, n, {"lm_loss": torch.stack([loss_sum.detach().clone(),
                                                         n.detach().float()])}
        return logits, loss_fn

    return forward_step


@dataclass(frozen=True)
class ExactMatch:
    """One exact-match evaluation: its figure and what it is made of."""

    accuracy: float
    """Share of the problems answered right."""
    outcomes: List[bool]
    """Whether each problem was answered right, in the prompt file's row order."""
    seconds: float
    """Wall time of the evaluation."""

    @property
    def n(self) -> int:
        """Problems scored."""
        return len(self.outcomes)


def gather_outcomes(mine: Sequence[bool], share: range, n: int, mp: ModelParallel) -> List[bool]:
    """The outcomes of all ``n`` problems, in order, on every rank: each data-parallel
    replica holds those of its contiguous ``share`` (:func:`~megarlhf.train.roles.replica_share`)."""
    from megarlhf import platform

    if len(mine) != len(share):
        raise ValueError(f"{len(mine)} outcomes for a share of {len(share)} problems")
    full = torch.zeros(n, dtype=torch.int32, device=platform.current().device)
    if len(share):
        full[share.start:share.stop] = torch.tensor([int(x) for x in mine], dtype=torch.int32, device=full.device)
    dist.all_reduce(full, group=mp.dp_group)
    return [bool(x) for x in full.tolist()]


def exact_match_eval(chunks, mp: ModelParallel, model_cfg: ModelConfig, template, prompts_path: str,
                     num_prompts: int, max_new_tokens: int, batch_size: int) -> ExactMatch:
    """Greedy answers to verifiable prompts, scored by the number after ``####``.
    Prompts are split over the data-parallel replicas; every rank gets every outcome."""
    from megarlhf.data.load import SourceConfig, load_examples
    from megarlhf.data.task import is_correct
    from megarlhf.rollout.engine import MegatronEngine, SamplingParams
    from megarlhf.train.roles import replica_share

    t0 = time.time()
    rows, _ = load_examples([SourceConfig(path=prompts_path)], "prompts", dedup=False)
    rows = [r for r in rows if r.get("reference") is not None][:num_prompts]
    if not rows:
        raise ValueError(f"{prompts_path}: no prompts with a reference answer to score")
    share = replica_share(len(rows), mp)
    mine = rows[share.start:share.stop]
    # Never sample an id the tokenizer cannot decode (a model's embedding may be larger).
    vocab = min(model_cfg.vocab_size, template.tok.vocab_size)
    engine = MegatronEngine(chunks, mp, vocab, max_batch=batch_size)
    out = engine.generate([template.encode_prompt(r["prompt"]) for r in mine],
                          SamplingParams(max_new_tokens=max_new_tokens, greedy=True,
                                         stop_ids=template.stop_ids()))
    right = [is_correct(template.tok.decode(resp), r["reference"]) for resp, r in zip(out.response_ids, mine)]
    outcomes = gather_outcomes(right, share, len(rows), mp)
    return ExactMatch(sum(outcomes) / len(outcomes), outcomes, time.time() - t0)


def checkpoint_exact_match(ckpt: str, mp: ModelParallel, prompts_path: str, num_prompts: int,
                           max_new_tokens: int, batch_size: int) -> ExactMatch:
    """:func:`exact_match_eval` of a saved policy: its model, tokenizer and chat template
    from ``ckpt``, built on ``mp``'s layout for this call only."""
    from megarlhf.models.checkpoint import load_model, read_meta
    from megarlhf.models.llama import build_model
    from megarlhf.recipes.pairs_common import tokenizer_of

    meta = read_meta(ckpt)
    _, template = tokenizer_of(meta, ckpt)
    chunks = build_model(meta.model, mp)
    load_model(chunks, ckpt)
    return exact_match_eval(chunks, mp, meta.model, template, prompts_path, num_prompts, max_new_tokens, batch_size)


class Evaluator:
    """Exact-match evaluation of one model as ``eval`` (an :class:`EvalConfig`) and
    ``train.eval_interval`` say, the same in every recipe: before the first step with
    ``eval.at_start`` (not on resume), every ``eval_interval`` steps during training, and at
    the end. Each result goes to the metrics log as ``exact_match``."""

    def __init__(self, chunks, mp: ModelParallel, model_cfg: ModelConfig, template, cfg, prompts, interval: int,
                 say: Callable[[str], None]):
        self.chunks, self.mp, self.model_cfg, self.template = chunks, mp, model_cfg, template
        self.cfg, self.prompts, self.interval, self.say = cfg, prompts, interval, say
        self.last_n = 0
        """Prompts the last evaluation scored."""

    def due(self, step: int, total_steps: int) -> bool:
        """Whether to evaluate after ``step`` during training (the end has its own call)."""
        return bool(self.prompts and self.interval and step % self.interval == 0 and step < total_steps)

    def __call__(self, step: int, log) -> Optional[float]:
        """Accuracy (None without prompts, or on ranks that hold no part of the model)."""
        if not self.prompts or self.mp is None:
            return None
        em = exact_match_eval(self.chunks, self.mp, self.model_cfg, self.template, self.prompts,
                              self.cfg.num_prompts, self.cfg.max_new_tokens, self.cfg.batch_size)
        self.last_n = em.n
        self.say(f"step {step}: exact match on {em.n} held-out prompts ({self.prompts}): {em.accuracy:.1%} "
                 f"(greedy, {em.seconds:.1f} s)")
        log.log(step, {"exact_match": em.accuracy, "eval_prompts": em.n}, echo=False)
        return em.accuracy
