"""Plain functions the recipes share (no recipe inherits from another)."""

from __future__ import annotations

import time
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

from megarlhf.algos.logprobs import token_logprobs, vocab_start_of
from megarlhf.config import ModelConfig
from megarlhf.parallel import ModelParallel

__all__ = ["lm_forward_step", "exact_match_eval", "Evaluator"]


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


def exact_match_eval(chunks, mp: ModelParallel, model_cfg: ModelConfig, template, prompts_path: str,
                     num_prompts: int, max_new_tokens: int, batch_size: int) -> Tuple[float, int, float]:
    """Greedy answers to verifiable prompts, scored by the number after ``####``.
    Prompts are split over the data-parallel replicas; returns (accuracy, n, seconds)."""
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
    correct = sum(is_correct(template.tok.decode(resp), r["reference"])
                  for resp, r in zip(out.response_ids, mine))
    from megarlhf import platform

    counts = torch.tensor([correct, len(mine)], dtype=torch.float64, device=platform.current().device)
    dist.all_reduce(counts, group=mp.dp_group)
    return float(counts[0] / counts[1]), int(counts[1]), time.time() - t0


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
        acc, n, secs = exact_match_eval(self.chunks, self.mp, self.model_cfg, self.template, self.prompts,
                                        self.cfg.num_prompts, self.cfg.max_new_tokens, self.cfg.batch_size)
        self.last_n = n
        self.say(f"step {step}: exact match on {n} held-out prompts ({self.prompts}): {acc:.1%} (greedy, {secs:.1f} s)")
        log.log(step, {"exact_match": acc, "eval_prompts": n}, echo=False)
        return acc
