"""Direct preference optimisation of a policy.

    megarlhf dpo --config examples/tiny/dpo.yaml [key=value ...]

Steps: tokenizer, chat template and policy from the SFT checkpoint -> preference data ->
reference log-probs, by default precomputed in one pass of the initial policy over the
data (it *is* the reference), or computed on the fly by a frozen copy
(``dpo.reference=online``) -> megatron DDP, optimizer, LR schedule -> loop over global
batches of pairs: chosen and rejected in one forward, per-token log-probs from the
vocabulary-parallel logits (never gathered), summed (or averaged, ``length_normalized``)
over response tokens, DPO loss averaged over the pairs of the global batch -> exact-match
evaluation of greedy answers -> checkpoints (resumable) and the final policy.

Paper settings (Ivison et al. 2024): sigmoid loss, beta 0.1, summed log-probs, lr 5e-7
linear decay, warmup ratio 0.1, 3 epochs, batch 32. The tiny defaults keep beta and the
loss and use a learning rate suited to a 3M-parameter model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Dict

import torch
import torch.distributed as dist

from megarlhf.algos.preference import LOSS_TYPES
from megarlhf.config import ConfigError
from megarlhf.data.dataset import DataConfig
from megarlhf.recipes.pairs_common import PairsJobConfig, PairsTrainConfig, pair_job_problems
from megarlhf.train.roles import replica_share
from megarlhf.train.loop import EvalConfig
from megarlhf.train.schedule import ScheduleConfig

__all__ = ["DPOConfig", "DPOLossConfig", "run"]


@dataclass(frozen=True)
class DPOLossConfig:
    """The DPO objective."""

    beta: float = 0.1
    """Strength of the implicit KL constraint (the paper: 0.1)."""
    loss_type: str = "sigmoid"
    """``sigmoid`` (DPO, the paper's) or ``ipo``."""
    label_smoothing: float = 0.0
    """Conservative DPO: assumed probability that a preference label is flipped (sigmoid only)."""
    length_normalized: bool = False
    """Average instead of summed response log-probs."""
    reference: str = "precomputed"
    """``precomputed`` (one pass before training) or ``online`` (a frozen copy each step)."""
    nll_weight: float = 0.0
    """RPO (Pang et al. 2024): weight of the chosen response's negative log-likelihood,
    each pair's own token mean, added to the pair's loss (0: plain DPO, the paper's). TRL's
    ``rpo_alpha`` instead averages over all chosen tokens of the batch."""


@dataclass(frozen=True)
class DPOConfig(PairsJobConfig):
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=128, max_prompt_length=96,
                                                                eval_size=0))
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)
    train: PairsTrainConfig = field(default_factory=lambda: PairsTrainConfig(
        lr=1e-4, min_lr=0.0, epochs=1.0, global_batch_size=32, micro_batch_size=8,
        schedule=ScheduleConfig(style="linear", warmup_ratio=0.1), out_dir="runs/dpo"))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        from megarlhf.config import range_problems

        problems = pair_job_problems(self) + self.eval.problems()
        d = self.dpo
        if d.loss_type not in LOSS_TYPES:
            problems.append(f"dpo.loss_type={d.loss_type!r}: expected one of {LOSS_TYPES}")
        if d.label_smoothing and d.loss_type != "sigmoid":
            problems.append("dpo.label_smoothing applies to dpo.loss_type='sigmoid' only")
        if not 0.0 <= d.label_smoothing < 0.5:
            problems.append(f"dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
        problems += range_problems(d, "dpo", positive=("beta",), non_negative=("nll_weight",))
        if d.reference not in ("precomputed", "online"):
            problems.append(f"dpo.reference={d.reference!r}: expected 'precomputed' or 'online'")
        if d.reference == "online" and self.parallel.pp > 1:
            problems.append("dpo.reference='online' runs the reference inside the policy's "
                            "forward step, which needs pipeline_model_parallel_size=1; use "
                            "'precomputed' with pipeline parallelism")
        if not self.data.sources:
            problems.append("data.sources is empty: give preference pairs")
        if problems:
            raise ConfigError(problems)


def sequence_logprobs_fn(mp, model_cfg, average: bool):
    """``(logits [2n, s, V/tp], batch) -> [2n]`` response log-probs (vocab-parallel)."""
    from megarlhf.algos.logprobs import token_logprobs, vocab_start_of
    from megarlhf.algos.preference import sequence_logprobs
    from megarlhf.models.llama import padded_vocab

    tp = mp.config.tp
    vstart = vocab_start_of(mp.tp_rank, padded_vocab(model_cfg, tp), tp)

    def seq_lp(logits, b):
        lp = token_logprobs(logits, b.labels, mp.tp_group, vstart)
        return sequence_logprobs(b.seqwise(lp), b.seqwise(b.loss_mask), average=average)

    return seq_lp


def dpo_forward_step(mp, model_cfg, d: DPOLossConfig, device, ref_chunks=None):
    """megatron forward step. ``stats`` = [loss sum, pairs, accuracy, reward chosen sum,
    reward rejected sum, policy chosen log-prob sum, policy rejected log-prob sum]."""
    from megarlhf.algos.preference import chosen_nll, dpo_loss, dpo_rewards

    seq_lp = sequence_logprobs_fn(mp, model_cfg, d.length_normalized)

    def forward_step(data_iter, model):
        b = next(data_iter).to(device)
        logits = model(b.tokens, b.position_ids, attention_mask=b.attention_mask,
                       packed_seq_params=b.packed_seq_params)
        if ref_chunks is not None:
            with torch.no_grad():
                ref = seq_lp(ref_chunks[0](b.tokens, b.position_ids, attention_mask=b.attention_mask,
                                           packed_seq_params=b.packed_seq_params), b)
        else:
            ref = b.ref_logprobs

        def loss_fn(output, non_loss_data=False):
            pol = seq_lp(output, b)
            pc, pr, rc, rr = pol[0::2], pol[1::2], ref[0::2], ref[1::2]
            w = b.weights().float()
            per_pair = dpo_loss(pc, pr, rc, rr, d.beta, d.loss_type, d.label_smoothing)
            if d.nll_weight:
                n_tok = b.seqwise(b.loss_mask)[0::2].sum(-1)
                per_pair = per_pair + d.nll_weight * chosen_nll(pc * n_tok if d.length_normalized else pc,
                                                                n_tok)
            loss = (per_pair * w).sum()
            chosen_r, rejected_r = dpo_rewards(pc, pr, rc, rr, d.beta)
            stats = torch.stack([x.double() for x in (
                loss.detach(), w.sum(), ((chosen_r > rejected_r).float() * w).sum(),
                (chosen_r.detach() * w).sum(), (rejected_r.detach() * w).sum(),
                (pc.detach() * w).sum(), (pr.detach() * w).sum())])
            if non_loss_data:
                return {"stats": stats, "seq_logprobs": pol.detach()}
            return loss, w.sum().to(torch.int), {"stats": stats}
        return logits, loss_fn

    return forward_step


def _summary(stats: torch.Tensor) -> Dict[str, float]:
    loss, n, acc, rc, rr, pc, pr = stats.tolist()
    return {"loss": loss / n, "accuracy": acc / n, "reward_chosen": rc / n, "reward_rejected": rr / n,
            "margin": (rc - rr) / n, "logp_chosen": pc / n, "logp_rejected": pr / n}


def precompute_reference(chunks, mp, model_cfg, ds, d: DPOLossConfig, mbs: int, seq_length: int,
                         pad_id: int, device, packing: bool = False):
    """Sequence log-probs of every pair under the initial policy (the reference), computed
    in one forward pass split over data-parallel replicas (``packing``: in packed rows, see
    :func:`~megarlhf.recipes.pairs_common.pair_microbatches`); returns the dataset with
    ``ref_chosen`` and ``ref_rejected`` columns (identical on every rank)."""
    from megarlhf.models.llama import sequence_multiple_of
    from megarlhf.recipes.pairs_common import micro_rows, pair_microbatches
    from megarlhf.train.step import forward_only

    seq_lp = sequence_logprobs_fn(mp, model_cfg, d.length_normalized)
    n = len(ds)
    mine = list(replica_share(n, mp))
    micro, seq = pair_microbatches(ds, mine, mbs, seq_length, pad_id, multiple=sequence_multiple_of(chunks),
                                   packing=packing, trim=mp.config.pp == 1)

    def step(it, model):
        b = next(it).to(device)
        out = model(b.tokens, b.position_ids, attention_mask=b.attention_mask, packed_seq_params=b.packed_seq_params)
        return out, lambda o, non_loss_data=True: (seq_lp(o, b).double(), b.weights())

    outs = forward_only(chunks, mp, step, micro, seq, micro_rows(micro, mbs)) if micro else []
    values = torch.zeros(n, 2, dtype=torch.float64, device=device)
    if outs:
        lp = torch.cat([o[0][o[1].repeat_interleave(2) > 0] for o in outs]).view(-1, 2)
        values[mine[0]:mine[0] + len(lp)] = lp
    if mp.config.pp > 1:  # only the last stage computed them
        dist.all_reduce(values, group=mp.pp_group)
    dist.all_reduce(values, group=mp.dp_group)
    v = values.cpu().tolist()
    return ds.add_column("ref_chosen", [x[0] for x in v]).add_column("ref_rejected", [x[1] for x in v])


def run(cfg: DPOConfig) -> dict:
    from megarlhf.data.sampler import ShardedSampler
    from megarlhf.models.checkpoint import save_model
    from megarlhf.models.llama import build_model, describe
    from megarlhf.parallel import destroy
    from megarlhf.recipes.common import Evaluator
    from megarlhf.recipes.pairs_common import load_init, micro_rows, output_meta, pair_microbatches, set_up_pairs
    from megarlhf.train.step import reduce_stats
    from megarlhf.train.job import make_trainable, resume, save_state, start_run, total_steps_of
    from megarlhf.train.step import forward_only

    t, d = cfg.train, cfg.dpo
    run_ = start_run("dpo", cfg, cfg.parallel)
    mp, log, dev = run_.mp, run_.log, run_.device

    # -- tokenizer, data, policy, reference ----------------------------------------------------
    su = set_up_pairs(cfg, run_, "causal")
    tokenizer, template, chunks, model_cfg, multiple = su.tokenizer, su.template, su.chunks, su.model_cfg, su.multiple
    log.say(f"policy: {describe(model_cfg, mp)} from {t.init_from}")
    ref_chunks = None
    train_ds, eval_ds = su.data.train, su.data.eval
    if d.reference == "precomputed":
        t0 = time.time()
        train_ds = precompute_reference(chunks, mp, model_cfg, train_ds, d, t.micro_batch_size,
                                        t.seq_length, tokenizer.pad_id, dev, t.packing)
        if eval_ds is not None:
            eval_ds = precompute_reference(chunks, mp, model_cfg, eval_ds, d, t.micro_batch_size,
                                           t.seq_length, tokenizer.pad_id, dev, t.packing)
        log.say(f"reference log-probs precomputed for {len(train_ds)} pairs in {time.time() - t0:.1f} s")
    else:
        ref_chunks = build_model(model_cfg, mp, kind="causal")
        load_init(ref_chunks, t.init_from, "causal", su.init_meta.kind)
        for c in ref_chunks:
            c.eval()
            c.requires_grad_(False)
    sampler = ShardedSampler(len(train_ds), t.global_batch_size, mp.dp_rank, mp.dp_size, seed=t.seed)
    total_steps = total_steps_of(t, sampler.steps_per_epoch)
    tr = make_trainable(chunks, mp, t, t.lr, t.min_lr, total_steps, t.distributed_optimizer)
    meta = output_meta(model_cfg, "causal", tokenizer.path, template, su.init_meta, recipe="dpo",
                       init_from=os.path.abspath(t.init_from))
    step, consumed = resume(run_, t, chunks, tr, "pairs")
    log.say(f"training {total_steps} steps of {t.global_batch_size} pairs "
            f"({sampler.steps_per_epoch} per epoch), loss {d.loss_type}, beta {d.beta}")

    # -- loop --------------------------------------------------------------------------------
    forward_step = dpo_forward_step(mp, model_cfg, d, dev, ref_chunks)
    with_ref = ref_chunks is None
    evaluate = Evaluator(chunks, mp, model_cfg, template, cfg.eval, cfg.eval.prompts, t.eval_interval, log.say)
    if step == 0 and cfg.eval.at_start:
        evaluate(0, log)
    batches = sampler.batches(consumed)
    log.start_progress(total_steps, step)
    while step < total_steps:
        micro, seq = pair_microbatches(train_ds, next(batches), t.micro_batch_size, t.seq_length,
                                       tokenizer.pad_id, with_ref=with_ref, multiple=multiple,
                                       packing=t.packing, trim=mp.config.pp == 1)
        step += 1
        res = tr.step(mp, forward_step, micro, seq, micro_rows(micro, t.micro_batch_size), step, run_.preempt)
        consumed += t.global_batch_size
        tokens = sum(int((m.tokens != tokenizer.pad_id).sum()) for m in micro) * mp.dp_size
        log.log(step, {**_summary(reduce_stats(res["outputs"], mp, dev)), **tr.record(res, tokens)})
        if evaluate.due(step, total_steps):
            evaluate(step, log)
        run_.preempt.end_of_step(step, total_steps, t.save_interval, lambda: save_state(
            t, step, consumed, chunks, tr, meta), log)  # collective; a signal on any rank stops every rank

    result: Dict[str, object] = {"steps": step}
    if eval_ds is not None:
        micro, seq = pair_microbatches(eval_ds, list(replica_share(len(eval_ds), mp)), t.micro_batch_size,
                                       t.seq_length, tokenizer.pad_id, with_ref=with_ref, multiple=multiple)
        outs = forward_only(chunks, mp, forward_step, micro, seq, 2 * t.micro_batch_size) if micro else []
        ev = result["eval_pairs"] = _summary(reduce_stats(outs, mp, dev))
        log.say(f"held-out implicit-reward accuracy {ev['accuracy']:.1%} on {len(eval_ds)} pairs")
    acc = evaluate(step, log)
    if acc is not None:
        result.update(exact_match=acc, eval_prompts=evaluate.last_n)
    save_state(t, step, consumed, chunks, tr, meta)
    result["final"] = os.path.join(t.out_dir, "final")
    save_model(chunks, result["final"], dataclasses.replace(
        meta, extra={**meta.extra, "steps": step, **({"exact_match": acc} if acc is not None else {})}))
    log.say(f"saved {result['final']}")
    log.close()
    destroy()
    return result
