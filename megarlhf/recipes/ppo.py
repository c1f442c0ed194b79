"""PPO against a reward model (actor, reference, critic, reward model), and its critic-free
relatives: GRPO, Dr. GRPO, RLOO and REINFORCE++ (``algo``; ``recipes/ppo_config.py``).

    megarlhf ppo --config examples/tiny/ppo.yaml [key=value ...]
    megarlhf ppo --config examples/tiny/ppo_grpo.yaml

Set-up: each role is built on its own layout (``actor.parallel``, ``critic.parallel``,
...) with its own process groups: ``placement: colocated`` puts every role on every rank,
``partitioned`` puts the reward model on the last ``reward_ranks`` ranks of the job (a 70B
reward model beside a 13B policy). Every rank holds the whole rollout batch's small
tensors; each role computes its data-parallel share of the rows and shares them over the
job (``megarlhf/train/roles.py``), so both placements compute the same numbers.

One step (:func:`ppo_step`), in timed phases:
  generate    the actor's DP replicas sample responses to this step's prompts (the
              rollout engine on the actor's own weights; randomness keyed by prompt)
  score       the reward model scores prompt + response (at the last token, or pooled
              over the response as the reward model was trained: ``rm pooling``), or the
              exact-match rule; a response cut at max_new_tokens (no EOS) gets
              ``missing_eos_penalty`` instead
  logprobs    reference log-probs, old actor log-probs (recomputed with the training
              forward pass, in the same microbatches as the first update: the first
              minibatch's probability ratio is exactly 1), old critic values; every
              log-prob, here and in the update, is taken at the sampling temperature over
              the ids the sampler can pick
  advantages  the registered estimator of ``ppo.advantage`` (``algos/advantages.py``) on the
              whole batch (groups of a prompt's samples stay whole; whitening covers
              every DP rank's tokens)
  update      minibatches x PPO epochs: the registered policy loss (actor), clipped value
              loss (critic, when there is one); the actor waits during ``critic_warmup_steps``
  metrics     score, KL, entropy, clip fractions, approximate KL, value loss, explained
              variance, train/rollout log-prob mismatch, lengths, EOS rate, time and
              tokens/s per phase

Departures from the paper (Ivison et al. 2024): none in ``algo: ppo``'s defaults (kl_coef
0.05 fixed, k1, gamma 1, lambda 0.95, clips 0.2, value coefficient 0.1, EOS penalty -10,
advantages whitened, rewards not); the tiny config uses a larger learning rate, fewer
prompts per step and shorter responses to fit a small model on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megarlhf.algos import ppo as A
from megarlhf.algos.advantages import AdvantageInputs, estimate_advantages
from megarlhf.algos.policy_losses import loss_weights, policy_token_loss
from megarlhf.config import ConfigError, check_model
from megarlhf.recipes.ppo_config import (ALGORITHMS, Algorithm, PPOConfig, PPOLossConfig, PPOTrainConfig,
                                         RoleConfig, RolloutConfig)
from megarlhf.rollout.batch import (FINISH_CODES, Rollout, build_rollout, microbatches, minibatch_has_tokens,
                                    pad_responses)
from megarlhf.train.roles import Role, build_role, is_writer, make_role_trainable, share_rows, shard_rows

__all__ = ["PPOConfig", "RoleConfig", "PPOLossConfig", "RolloutConfig", "PPOTrainConfig", "ALGORITHMS",
           "Roles", "PromptBatch", "StepContext", "StepState", "StepMetrics", "ppo_step", "run"]


# -- what a step works on ---------------------------------------------------------------------
@dataclass
class Roles:
    """The job's models. ``critic`` is None for critic-free algorithms, ``reward`` when a
    rule scores."""

    actor: Role
    reference: Role
    critic: Optional[Role] = None
    reward: Optional[Role] = None

    def all(self) -> List[Role]:
        return [r for r in (self.actor, self.reference, self.critic, self.reward) if r is not None]

    def trained(self) -> List[Role]:
        """The roles with an optimizer on this rank."""
        return [r for r in (self.actor, self.critic) if r is not None and r.trainer is not None]


@dataclass
class PromptBatch:
    """One step's prompts: a row per sample (a prompt's ``samples_per_prompt`` samples are
    consecutive rows), with the prompt's reference answer (None without one)."""

    prompt_ids: List[List[int]]
    references: List[Optional[str]]

    @property
    def n(self) -> int:
        return len(self.prompt_ids)


@dataclass
class StepContext:
    """What every step of a run shares."""

    cfg: PPOConfig
    algo: Algorithm
    tokenizer: Any
    engine: Any
    """The rollout engine on the actor's weights (None on ranks without the actor)."""
    stop_ids: List[int]
    row_multiple: int
    """Rows are padded to a multiple of this (what every role's layout needs)."""
    vocab_limit: int
    """Ids the sampler can pick: ``[0, vocab_limit)``; training normalises over the same."""
    rm_pooling: Optional[str]
    device: Any
    preempt: Any = None
    stream: Optional["ScoreStream"] = None
    """Partitioned placement: responses go to the reward model's ranks as they finish."""


@dataclass
class StepState:
    """What changes from step to step (and is checkpointed)."""

    step: int
    """Steps done."""
    consumed: int
    """Prompts consumed."""
    kl_ctl: A.KLController


class _Sums:
    """Sums that travel between ranks as one float64 vector, in field order."""

    @classmethod
    def of(cls, vector: torch.Tensor):
        return cls(*vector.tolist())

    def __add__(self, other):
        return type(self)(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


@dataclass
class PolicySums(_Sums):
    loss: float = 0.0
    """Weighted loss sum (divided by ``count`` it is the aggregated loss)."""
    count: float = 0.0
    tokens: float = 0.0
    clipped: float = 0.0
    approx_kl: float = 0.0
    """0.5 (log ratio)^2."""
    ratio: float = 0.0
    ratio_dev: float = 0.0
    """|ratio - 1|."""
    entropy: float = 0.0
    kl: float = 0.0
    """The KL loss term's per-token estimate (algorithms with the KL in the loss)."""


@dataclass
class ValueSums(_Sums):
    loss: float = 0.0
    """Value loss without the coefficient."""
    tokens: float = 0.0
    clipped: float = 0.0


@dataclass
class StepMetrics:
    """One step's metrics (identical on every rank)."""

    score_mean: float
    score_std: float
    reward_mean: float
    """Mean of the scores the estimator used (after the EOS penalty and any baseline)."""
    kl: float
    """Mean per-sequence KL (k1) of the sampling policy against the reference."""
    kl_coef: float
    response_length: float
    eos_rate: float
    advantage_mean: float
    times: Dict[str, float]
    tokens_per_s_generate: float
    tokens_per_s_step: float
    explained_variance: Optional[float] = None
    train_accuracy: Optional[float] = None
    score_correct: Optional[float] = None
    score_wrong: Optional[float] = None
    policy_loss: Optional[float] = None
    clip_fraction: Optional[float] = None
    approx_kl: Optional[float] = None
    ratio_mean: Optional[float] = None
    entropy: Optional[float] = None
    kl_loss: Optional[float] = None
    first_minibatch_ratio_dev: Optional[float] = None
    value_loss: Optional[float] = None
    value_clip_fraction: Optional[float] = None
    rollout_logprob_diff_mean: Optional[float] = None
    """Mean |engine's log-prob - recomputed old log-prob| over response tokens."""
    rollout_logprob_diff_max: Optional[float] = None
    rollout_ratio_outside: Optional[float] = None
    """Fraction of response tokens whose engine/training probability ratio leaves [0.5, 2]."""
    empty_minibatches: int = 0
    skipped_updates: Optional[Dict[str, int]] = None
    actor_lr: Optional[float] = None
    reward_busy_fraction: Optional[float] = None
    """Partitioned placement: the share of the step the reward model's ranks spent scoring
    (during generation)."""
    padding: Optional[Dict[str, float]] = None
    """Per phase over rollout rows: the share of the tokens this rank's models computed
    that were padding (``train.packing`` takes it to the rounding of each packed row)."""

    def as_log(self) -> Dict[str, float]:
        """The flat ``metrics.jsonl`` record (unset fields left out)."""
        out: Dict[str, float] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("times", "skipped_updates", "tokens_per_s_generate", "tokens_per_s_step",
                          "padding") or v is None:
                continue
            if f.name == "empty_minibatches" and not v:
                continue
            out[f.name] = v
        for role, n in (self.skipped_updates or {}).items():
            out[f"skipped_updates/{role}"] = n
        for name, secs in self.times.items():
            out[f"time/{name}"] = round(secs, 3)
        for name, frac in (self.padding or {}).items():
            out[f"padding/{name}"] = frac
        out["tokens_per_s/generate"] = self.tokens_per_s_generate
        out["tokens_per_s/step"] = self.tokens_per_s_step
        return out


# -- forward steps (megatron forward_step_func) ------------------------------------------------
def _sampled_logits(logits: torch.Tensor, temperature: float, vocab_start: int, vocab_limit: int) -> torch.Tensor:
    """Logits of the distribution the rollout sampled from: at the sampling temperature and
    over the ids it can pick (``< vocab_limit``: a model whose embedding is larger than its
    tokenizer), so that log-probs, ratios and KL are the sampling policy's, as open-instruct,
    TRL and verl compute them. ``logits`` is this rank's vocabulary slice."""
    out = logits.float()
    if temperature != 1.0:
        # the padded vocabulary's logits are the most negative float: keep them finite (in
        # place: the quotient is a fresh tensor, and the division's backward does not need it)
        out = (out / temperature).clamp_(min=torch.finfo(torch.float32).min)
    cut = vocab_limit - vocab_start
    if cut < out.shape[-1]:
        ids = torch.arange(out.shape[-1], device=out.device)
        out = out.masked_fill(ids >= max(cut, 0), torch.finfo(torch.float32).min)
    return out


def _logprob_step(role: Role, temperature: float, vocab_limit: int, device):
    """Forward-only: per-token log-probs ``[b, s]`` of the labels (0 off the mask)."""
    from megarlhf.algos.logprobs import token_logprobs

    vstart, group = role.vocab_start, role.mp.tp_group

    def step(it, model):
        b = next(it).to(device)
        out = model(b.tokens, b.position_ids, attention_mask=None, packed_seq_params=b.packed_seq_params)

        def collect(output, non_loss_data=True):
            lp = token_logprobs(_sampled_logits(output, temperature, vstart, vocab_limit), b.labels, group, vstart)
            return {"values": b.unpack(lp).float() * b.mask}
        return out, collect
    return step


def _value_step(device):
    """Forward-only: scalar-head outputs ``[b, s]``."""
    def step(it, model):
        b = next(it).to(device)
        out = model(b.tokens, b.position_ids, attention_mask=None, packed_seq_params=b.packed_seq_params)
        return out, lambda output, non_loss_data=True: {"values": b.unpack(output[..., 0].float())}
    return step


def _actor_step(role: Role, algo: Algorithm, loss_cfg: PPOLossConfig, kl_coef: float, temperature: float,
                vocab_limit: int, device):
    """Training: the registered policy loss (plus ``kl_coef`` x KL when the algorithm puts
    the KL in the loss), weighted per token as ``ppo.loss_aggregation`` says; megatron
    divides the sum by the minibatch's summed counts. ``stats``: :class:`PolicySums`."""
    from megarlhf.algos.logprobs import token_entropy, token_logprobs

    vstart, group = role.vocab_start, role.mp.tp_group
    kl_in_loss = not algo.kl_in_reward and kl_coef > 0

    def step(it, model):
        b = next(it).to(device)
        out = model(b.tokens, b.position_ids, attention_mask=None, packed_seq_params=b.packed_seq_params)

        def loss_fn(output):
            logits = _sampled_logits(output, temperature, vstart, vocab_limit)
            lp = b.unpack(token_logprobs(logits, b.labels, group, vstart)).float()
            per_token, clipped = policy_token_loss(algo.policy_loss, lp, b.old_logprobs, b.advantages, b.mask,
                                                   loss_cfg.clip, loss_cfg.dual_clip)
            kl = torch.zeros_like(lp)
            if kl_in_loss:
                kl = A.kl_estimate(lp, b.ref_logprobs, algo.kl_estimator, loss_cfg.kl_clamp_min,
                                   loss_cfg.kl_clamp_max) * b.mask
                per_token = per_token + kl_coef * kl
            loss = (per_token * b.loss_weights).sum()
            with torch.no_grad():
                log_ratio = (lp - b.old_logprobs) * b.mask
                ratio = torch.exp(log_ratio) * b.mask
                ent = (b.unpack(token_entropy(logits.detach(), group)).float() * b.mask).sum()
                sums = PolicySums(loss=loss.detach(), count=b.loss_counts.sum(), tokens=b.mask.sum(),
                                  clipped=clipped.sum(), approx_kl=(0.5 * log_ratio ** 2).sum(), ratio=ratio.sum(),
                                  ratio_dev=((ratio - 1).abs() * b.mask).sum(), entropy=ent, kl=kl.detach().sum())
                stats = torch.stack([getattr(sums, f.name).double() for f in dataclasses.fields(sums)])
            return loss, b.loss_counts.sum().round().to(torch.int), {"stats": stats}
        return out, loss_fn
    return step


def _critic_step(value_clip: Optional[float], coef: float, device):
    """Training: clipped value loss x coefficient, summed over tokens. ``stats``:
    :class:`ValueSums`."""
    def step(it, model):
        b = next(it).to(device)
        out = model(b.tokens, b.position_ids, attention_mask=None, packed_seq_params=b.packed_seq_params)

        def loss_fn(output):
            v = b.unpack(output[..., 0].float())
            loss, st = A.value_loss(v, b.old_values, b.returns, b.mask, value_clip)
            n = b.mask.sum()
            stats = torch.stack([loss.detach(), n, st["clipped"]]).double()
            return coef * loss, n.to(torch.int), {"stats": stats}
        return out, loss_fn
    return step


# -- the phases of a step ---------------------------------------------------------------------
def minibatch_rows(n: int, minibatch: int, role: Role) -> Iterator[range]:
    """For each minibatch: this rank's rows of it (a ``range`` into the batch)."""
    for start in range(0, n, minibatch):
        mine = shard_rows(minibatch, role.mp)
        yield range(start + mine.start, start + mine.stop)


@contextmanager
def _phase(name: str, times: Dict[str, float]):
    t0 = time.time()
    yield
    times[name] = time.time() - t0


def generate(batch: PromptBatch, actor: Role, ctx: StepContext, step: int) -> Rollout:
    """The actor's replicas sample their share of the rows; every rank gets every row. In
    the partitioned placement the reward model's ranks score the responses meanwhile, as
    the actor's replicas stream them (:class:`ScoreStream`)."""
    from megarlhf.rollout.engine import SamplingParams

    ro_cfg, n, stream = ctx.cfg.rollout, batch.n, ctx.stream
    mine = actor.rows(n)
    vals = None
    if ctx.engine is not None and len(mine):
        sender = stream.sender(mine, ro_cfg.max_new_tokens, ctx.device) if stream and is_writer(actor.mp) else None
        out = ctx.engine.generate(batch.prompt_ids[mine.start:mine.stop], SamplingParams(
            max_new_tokens=ro_cfg.max_new_tokens, temperature=ro_cfg.temperature, top_p=ro_cfg.top_p,
            top_k=ro_cfg.top_k, stop_ids=ctx.stop_ids, eos_id=ctx.tokenizer.eos_id,
            seed=ctx.cfg.train.seed * 100_003 + step), first_index=mine.start,
            on_finished=sender.add if sender else None)
        if sender:
            sender.close()
        vals = pad_responses(out.response_ids, out.sample_logprobs, out.finish_reason, ro_cfg.max_new_tokens)
    elif stream is not None and stream.reward.here:
        stream.score_while_generating(batch, ctx)
    w, dev, max_new = is_writer(actor.mp), ctx.device, ro_cfg.max_new_tokens
    shared = [share_rows(n, tail, dtype, mine, vals and vals[i], w, dev) for i, (tail, dtype) in enumerate(
        (((max_new,), torch.long), ((), torch.long), ((), torch.long), ((max_new,), torch.float32)))]
    return build_rollout(batch.prompt_ids, *shared, ctx.tokenizer.pad_id, ctx.row_multiple)


def _reward_scores(ro: Rollout, reward: Role, rows: List[range], ctx: StepContext, group=None) -> torch.Tensor:
    """[n] the reward model's scores of ``ro`` (its ``rows`` on this rank), pooled as it was
    trained; shared over ``group`` (default: the whole job)."""
    from megarlhf.algos.preference import pool_rewards, response_positions

    values = reward.per_token(_value_step(ctx.device), ro, rows, ctx.cfg.train.micro_batch_size, ctx.device,
                              group=group)
    pooled = None if ctx.rm_pooling == "last" else response_positions(ro.mask)
    return pool_rewards(values, pooled, ro.last_index, ctx.rm_pooling)


class ScoreStream:
    """The partitioned placement's overlap: each actor replica's writer sends its finished
    responses in chunks (:mod:`megarlhf.rollout.stream`) to the first reward rank, and the
    reward model's ranks score each chunk as it arrives, while generation goes on. The
    scores and the reward ranks' busy time are shared with the job in the score phase."""

    def __init__(self, reward: Role, writers: List[int], leader: int, chunk_parts: int):
        self.reward, self.writers, self.leader = reward, writers, leader
        # the reward model's ranks (made with its layout; None on the other ranks)
        self.group = reward.mp.group if reward.here else None
        self.chunk_parts = chunk_parts
        self.scores: Optional[torch.Tensor] = None
        self.busy_s = 0.0

    def chunk(self, share: int) -> int:
        return max(1, -(-share // self.chunk_parts))

    def sender(self, mine: range, max_new: int, device):
        from megarlhf.rollout.stream import ResponseSender

        return ResponseSender(self.leader, self.chunk(len(mine)), max_new, mine.start, len(mine), device)

    def score_while_generating(self, batch: PromptBatch, ctx: StepContext) -> None:
        """On the reward ranks: score every chunk as it arrives (collective over them)."""
        from megarlhf.rollout.stream import receive_responses
        from megarlhf.train.roles import replica_share

        max_new, share = ctx.cfg.rollout.max_new_tokens, batch.n // len(self.writers)
        self.scores, self.busy_s = torch.zeros(batch.n), 0.0
        for msg in receive_responses(self.writers, share, self.chunk(share), max_new, self.leader, self.group,
                                     ctx.device):
            t0 = time.time()
            msg = msg.cpu()
            idx, lens, resp = msg[:, 0], msg[:, 1], msg[:, 2:]
            k = len(idx)
            zeros = torch.zeros(k, dtype=torch.long)
            ro = build_rollout([batch.prompt_ids[i] for i in idx.tolist()], resp, lens, zeros,
                               torch.zeros(k, max_new), ctx.tokenizer.pad_id, ctx.row_multiple)
            self.scores[idx] = _reward_scores(ro, self.reward, [replica_share(k, self.reward.mp)], ctx, self.group)
            self.busy_s += time.time() - t0

    def shared(self, n: int, device) -> Tuple[torch.Tensor, float]:
        """The step's scores and the reward ranks' busy seconds, on every rank (collective
        over the job)."""
        lead = dist.get_rank() == self.leader
        full = torch.zeros(n + 1, device=device)
        if lead:
            full[:n], full[n] = self.scores.to(device), self.busy_s
        dist.all_reduce(full)
        return full[:n].cpu(), float(full[n])


@dataclass
class Scores:
    scores: torch.Tensor
    """[n] the scorer's (reward model or rule)."""
    right: Optional[torch.Tensor]
    """[n] bool: whether the answer is correct (prompts with references only)."""
    reward_busy_s: Optional[float] = None
    """Partitioned placement: seconds the reward model's ranks spent scoring during generation."""


def score(ro: Rollout, batch: PromptBatch, reward: Optional[Role], ctx: StepContext) -> Scores:
    """The reward model on its own replicas (maybe its own ranks), or the exact-match rule."""
    from megarlhf.data.task import is_correct

    right = None
    if batch.references[0] is not None:  # prompts with answers: is each response right?
        ends = (ro.last_index + 1).tolist()
        texts = [ctx.tokenizer.decode(ro.tokens[i, end - int(ro.response_len[i]):end].tolist())
                 for i, end in enumerate(ends)]
        right = torch.tensor([is_correct(x, r) for x, r in zip(texts, batch.references)])
    if reward is None:
        return Scores(right.float(), right)
    if ctx.stream is not None:  # scored during generation
        scores, busy = ctx.stream.shared(ro.n, ctx.device)
        return Scores(scores, right, busy)
    return Scores(_reward_scores(ro, reward, [reward.rows(ro.n)], ctx), right)


@dataclass
class OldOutputs:
    """[n, s] each: the reference's and the sampling policy's log-probs, the critic's values
    (None without a critic)."""

    ref_logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    old_values: Optional[torch.Tensor]


def old_outputs(ro: Rollout, roles: Roles, ctx: StepContext) -> OldOutputs:
    """Reference log-probs; old log-probs recomputed by the training forward pass in the
    first update epoch's microbatches (or the engine's); old values."""
    cfg, mbs, dev = ctx.cfg, ctx.cfg.train.micro_batch_size, ctx.device

    def lp_step(role):  # a role's step exists only where the role is
        return _logprob_step(role, cfg.rollout.temperature, ctx.vocab_limit, dev) if role.here else None

    def first_epoch(role):
        return list(minibatch_rows(ro.n, cfg.ppo.minibatch_size, role))

    ref = roles.reference.per_token(lp_step(roles.reference), ro, [roles.reference.rows(ro.n)], mbs, dev)
    if cfg.ppo.old_logprobs == "recompute":
        old = roles.actor.per_token(lp_step(roles.actor), ro, first_epoch(roles.actor), mbs, dev)
    else:
        old = ro.rollout_logprobs * ro.mask
    values = None
    if roles.critic is not None:
        values = roles.critic.per_token(_value_step(dev), ro, first_epoch(roles.critic), mbs, dev) * ro.mask
    return OldOutputs(ref, old, values)


@dataclass
class Targets:
    """What the update trains towards, ``[n, s]`` unless noted."""

    used_scores: torch.Tensor
    """[n] scores after the EOS penalty and any baseline."""
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: Optional[torch.Tensor]
    loss_weights: torch.Tensor
    loss_counts: torch.Tensor
    """[n]"""


def targets(ro: Rollout, sc: Scores, old: OldOutputs, ctx: StepContext, kl_coef: float) -> Targets:
    """Every rank, on the whole batch: groups stay whole and whitening covers every DP
    rank's tokens."""
    P, algo = ctx.cfg.ppo, ctx.algo
    used = sc.scores.clone()
    if P.missing_eos_penalty is not None:
        used = torch.where(ro.finish == FINISH_CODES["length"], torch.full_like(used, P.missing_eos_penalty), used)
    if P.score_baseline == "loo":
        used = A.leave_one_out(used, ctx.cfg.rollout.samples_per_prompt)
    kl = A.kl_estimate(old.old_logprobs, old.ref_logprobs, algo.kl_estimator, P.kl_clamp_min, P.kl_clamp_max) * ro.mask
    est = estimate_advantages(algo.advantage, AdvantageInputs(
        scores=used, kl=kl, mask=ro.mask, values=old.old_values, kl_coef=kl_coef if algo.kl_in_reward else 0.0,
        group_size=ctx.cfg.rollout.samples_per_prompt, gamma=P.gamma, lam=P.lam, whiten_rewards=P.whiten_rewards))
    adv = A.masked_whiten(est.advantages, ro.mask) if algo.whiten_advantages else est.advantages
    w, counts = loss_weights(ro.mask, algo.loss_aggregation, ctx.cfg.rollout.max_new_tokens)
    return Targets(used, kl, adv, est.returns, w, counts)


@dataclass
class UpdateSums:
    policy: Optional[PolicySums] = None
    value: Optional[ValueSums] = None
    first_ratio_dev: Optional[float] = None
    empty_minibatches: int = 0


def _epoch_order(n: int, group: int, seed: int, step: int, epoch: int) -> Optional[torch.Tensor]:
    """Row order of an update epoch: the rollout's in the first (where the old log-probs
    were recomputed), then a shuffle of whole prompt groups."""
    if not epoch:
        return None
    g = torch.Generator().manual_seed(seed * 7919 + step * 31 + epoch)
    groups = torch.randperm(n // group, generator=g)
    return (groups.unsqueeze(-1) * group + torch.arange(group)).reshape(-1)


def update(ro: Rollout, tg: Targets, old: OldOutputs, roles: Roles, ctx: StepContext, state: StepState) -> UpdateSums:
    """Minibatches x epochs; each minibatch one optimizer step of each trained role."""
    cfg, P, dev, mbs = ctx.cfg, ctx.cfg.ppo, ctx.device, ctx.cfg.train.micro_batch_size
    train_actor = state.step >= P.critic_warmup_steps
    per_token = {"old_logprobs": old.old_logprobs, "ref_logprobs": old.ref_logprobs, "advantages": tg.advantages,
                 "loss_weights": tg.loss_weights, "loss_counts": tg.loss_counts}
    if tg.returns is not None:
        per_token.update(old_values=old.old_values, returns=tg.returns)
    steps = []
    if roles.actor.trainer is not None and train_actor:
        steps.append((roles.actor, _actor_step(roles.actor, ctx.algo, P, state.kl_ctl.coef, cfg.rollout.temperature,
                                               ctx.vocab_limit, dev), PolicySums))
    if roles.critic is not None and roles.critic.trainer is not None:
        steps.append((roles.critic, _critic_step(P.value_clip, P.value_loss_coef, dev), ValueSums))
    out, applied = UpdateSums(), {role.name: False for role, _, _ in steps}
    rows_of = {role.name: list(minibatch_rows(ro.n, P.minibatch_size, role)) for role, _, _ in steps}
    for epoch in range(P.ppo_epochs):
        order = _epoch_order(ro.n, cfg.rollout.samples_per_prompt, cfg.train.seed, state.step, epoch)
        ep_ro = ro if order is None else ro.permuted(order)
        ep_extra = per_token if order is None else {k: v[order] for k, v in per_token.items()}
        for mb in range(ro.n // P.minibatch_size):
            if not minibatch_has_tokens(ep_ro.mask, mb, P.minibatch_size):
                out.empty_minibatches += 1  # every response empty: nothing to learn from
                continue
            for role, step_fn, sums in steps:
                micro, seq, size = role.microbatches(ep_ro, [rows_of[role.name][mb]], mbs, ep_extra)
                st, skipped = role.update(step_fn, micro, seq, size, state.step + 1, ctx.preempt, dev)
                applied[role.name] |= not skipped
                s = sums.of(st)
                if sums is PolicySums:
                    out.policy = s if out.policy is None else out.policy + s
                    if out.first_ratio_dev is None:
                        out.first_ratio_dev = s.ratio_dev / max(s.tokens, 1)
                else:
                    out.value = s if out.value is None else out.value + s
    for role, _, _ in steps:
        if applied[role.name]:  # as every recipe: a skipped update does not advance the schedule
            role.trainer.scheduler.step(1)
    if ctx.engine is not None and applied.get("actor"):
        ctx.engine.update_weights()  # a no-op for the engine on the training weights
    return out


def step_metrics(ro: Rollout, sc: Scores, old: OldOutputs, tg: Targets, up: UpdateSums, roles: Roles,
                 ctx: StepContext, kl_coef: float, times: Dict[str, float]) -> StepMetrics:
    """Everything a step reports, from the whole batch (identical on every rank)."""
    seq_kl = (A.kl_estimate(old.old_logprobs, old.ref_logprobs, "k1") * ro.mask).sum(-1)
    step_s = sum(times.values())
    m = StepMetrics(
        score_mean=float(sc.scores.mean()), score_std=float(sc.scores.std()) if ro.n > 1 else 0.0,
        reward_mean=float(tg.used_scores.mean()), kl=float(seq_kl.mean()), kl_coef=kl_coef,
        response_length=float(ro.response_len.float().mean()), eos_rate=float((ro.finish == FINISH_CODES["eos"]).float().mean()),
        advantage_mean=float(A.masked_mean(tg.advantages, ro.mask)), times={k: round(v, 3) for k, v in times.items()},
        tokens_per_s_generate=round(int(ro.response_len.sum()) / max(times["generate"], 1e-9)),
        tokens_per_s_step=round(int((ro.tokens != ctx.tokenizer.pad_id).sum()) / max(round(step_s, 3), 1e-9)),
        empty_minibatches=up.empty_minibatches)
    m.times["step"] = round(step_s, 3)
    if sc.reward_busy_s is not None:
        m.reward_busy_fraction = round(sc.reward_busy_s / max(step_s, 1e-9), 4)
    if tg.returns is not None:
        m.explained_variance = float(A.explained_variance(old.old_values, tg.returns, ro.mask))
    if sc.right is not None:
        m.train_accuracy = float(sc.right.float().mean())
        if sc.right.any() and not sc.right.all():  # does the scorer still rank this step's samples?
            m.score_correct, m.score_wrong = float(sc.scores[sc.right].mean()), float(sc.scores[~sc.right].mean())
    if ctx.cfg.ppo.old_logprobs == "recompute":  # train/rollout mismatch of the sampling policy
        diff = (ro.rollout_logprobs - old.old_logprobs).abs() * ro.mask
        n = ro.mask.sum().clamp(min=1)
        m.rollout_logprob_diff_mean, m.rollout_logprob_diff_max = float(diff.sum() / n), float(diff.max())
        m.rollout_ratio_outside = float(((diff > math.log(2.0)).float() * ro.mask).sum() / n)
    if up.policy is not None:
        p, n = up.policy, max(up.policy.tokens, 1)
        m.policy_loss, m.clip_fraction, m.approx_kl = p.loss / max(p.count, 1e-12), p.clipped / n, p.approx_kl / n
        m.ratio_mean, m.entropy, m.first_minibatch_ratio_dev = p.ratio / n, p.entropy / n, up.first_ratio_dev
        if not ctx.algo.kl_in_reward:
            m.kl_loss = p.kl / n
    if up.value is not None:
        m.value_loss, m.value_clip_fraction = up.value.loss / max(up.value.tokens, 1), up.value.clipped / max(up.value.tokens, 1)
    skipped = {r.name: r.trainer.guard.total for r in roles.trained() if r.trainer.guard.total}
    m.skipped_updates = skipped or None
    if roles.actor.trainer is not None:
        m.actor_lr = roles.actor.trainer.optimizer.param_groups[0]["lr"]
    return m


@contextmanager
def _padding(name: str, roles: Roles, out: Dict[str, float]):
    """``out[name]``: the padding share of the tokens this rank's roles computed inside."""
    before = [sum(r.tokens_seen[i] for r in roles.all()) for i in (0, 1)]
    yield
    real, computed = (sum(r.tokens_seen[i] for r in roles.all()) - before[i] for i in (0, 1))
    if computed:
        out[name] = round(1.0 - real / computed, 4)


def ppo_step(batch: PromptBatch, roles: Roles, ctx: StepContext, state: StepState) -> StepMetrics:
    """One step of the algorithm on ``batch`` (collective over the whole job): every rank
    calls it with the same batch and gets the same metrics; ``state`` advances by one step."""
    times: Dict[str, float] = {}
    padding: Dict[str, float] = {}
    with _phase("generate", times):
        ro = generate(batch, roles.actor, ctx, state.step)
    with _phase("score", times), _padding("score", roles, padding):
        sc = score(ro, batch, roles.reward, ctx)
    with _phase("logprobs", times), _padding("logprobs", roles, padding):
        old = old_outputs(ro, roles, ctx)
    with _phase("advantages", times):
        kl_coef = state.kl_ctl.coef
        tg = targets(ro, sc, old, ctx, kl_coef)
    with _phase("update", times), _padding("update", roles, padding):
        up = update(ro, tg, old, roles, ctx, state)
    m = step_metrics(ro, sc, old, tg, up, roles, ctx, kl_coef, times)
    m.padding = padding or None
    state.step += 1
    state.consumed += batch.n // ctx.cfg.rollout.samples_per_prompt
    state.kl_ctl.update(m.kl, ro.n)
    return m


# -- the recipe -------------------------------------------------------------------------------
def build_roles(cfg: PPOConfig, log) -> Roles:
    """Every role of the job on its layout, loaded (collective, the same order everywhere)."""
    from megarlhf.models.llama import packed_model
    from megarlhf.parallel import build_layout

    spans, inits = cfg.spans(), cfg.init_paths()
    shapes = {key.split(".")[0]: m for key, m in cfg.resolved_models().items()}
    for role in inits:
        check_model(shapes[role], prefix=f"{role}.model")
    layouts = {role: build_layout(getattr(cfg, role).parallel, *spans[role], seed=cfg.train.seed) for role in inits}
    built = {role: build_role(role, layouts[role], shapes[role], inits[role],
                              "causal" if role in ("actor", "reference") else "reward",
                              frozen=role in ("reference", "reward"), say=log.say) for role in inits}
    roles = Roles(**built)
    for role in roles.all():
        if cfg.train.packing:  # a checkpoint's own Transformer Engine layers (configs are checked in validate)
            packed_model(role.model, True, prefix=f"{role.name}.model")
        role.packing = cfg.train.packing
    for role in (r for r in (roles.critic, roles.reward) if r is not None):
        if role.meta.model.vocab_size != roles.actor.meta.model.vocab_size:
            raise ConfigError([f"{role.name}.init_from={role.init_from}: vocabulary {role.meta.model.vocab_size} "
                               f"differs from the actor's {roles.actor.meta.model.vocab_size}: the roles "
                               "must share the tokenizer"])
    if roles.reward is not None and roles.reward.meta.kind != "reward":
        raise ConfigError([f"reward.init_from={roles.reward.init_from} is a {roles.reward.meta.kind} model; "
                           "the scorer must be a reward model"])
    return roles


def make_optimizers(roles: Roles, t: PPOTrainConfig, total_steps: int) -> None:
    """The actor's and critic's optimizers and LR schedules."""
    for role, lr in ((roles.actor, t.actor_lr), (roles.critic, t.critic_lr)):
        if role is not None:
            make_role_trainable(role, t, lr, total_steps)


def load_prompts(cfg: PPOConfig, template, log):
    from megarlhf.data.dataset import build_dataset
    from megarlhf.data.load import DataError

    data = build_dataset(cfg.data, "prompts", template)
    for line in data.summary():
        log.say(f"data: {line}")
    rows = data.train
    if cfg.score == "exact_match":
        missing = sum(r is None for r in rows["reference"])
        if missing:
            raise DataError(f"score=exact_match: {missing} of {len(rows)} prompt rows of data.sources "
                            f"({', '.join(src.path for src in cfg.data.sources)}) have no 'reference' "
                            "answer to check responses against")
    return rows


@dataclass
class Job:
    """A set-up run: its roles, what every step shares, the state, the prompts."""

    roles: Roles
    ctx: StepContext
    state: StepState
    rows: Any
    """The prompt rows (a ``datasets.Dataset`` with ``prompt_ids`` and ``reference``)."""
    sampler: Any
    total_steps: int
    template: Any
    meta_out: Any
    """The metadata of the checkpoints the run writes."""

    def checkpointed(self) -> Dict[str, tuple]:
        return {r.name: (r.chunks, r.trainer.optimizer, r.trainer.scheduler) for r in self.roles.trained()}

    def batch(self, idx) -> PromptBatch:
        """The step's rows for prompt indices ``idx`` (each prompt's samples consecutive)."""
        k = self.ctx.cfg.rollout.samples_per_prompt
        return PromptBatch([list(self.rows[int(i)]["prompt_ids"]) for i in idx for _ in range(k)],
                           [self.rows[int(i)].get("reference") for i in idx for _ in range(k)])


def score_stream(cfg: PPOConfig, roles: Roles) -> Optional[ScoreStream]:
    """The partitioned placement's overlap of scoring with generation (collective over the
    job), unless ``rollout.score_chunks`` is 0 or the reward model shares ranks with the actor."""
    if cfg.placement != "partitioned" or roles.reward is None or not cfg.rollout.score_chunks:
        return None
    writers: List[Optional[tuple]] = [None] * dist.get_world_size()
    mine = (roles.actor.mp.dp_rank, dist.get_rank()) if is_writer(roles.actor.mp) else None
    dist.all_gather_object(writers, mine)
    start, _ = cfg.spans()["reward"]
    return ScoreStream(roles.reward, [rank for _, rank in sorted(w for w in writers if w is not None)], start,
                       cfg.rollout.score_chunks)


def prepare(cfg: PPOConfig, log, preempt=None) -> Job:
    """Roles, optimizers, prompts and the step context of a run, after the process groups
    exist (collective over the job)."""
    from megarlhf import platform
    from megarlhf.data.sampler import ShardedSampler
    from megarlhf.models.llama import model_sequence_multiple
    from megarlhf.recipes.pairs_common import output_meta, tokenizer_of
    from megarlhf.rollout.engine import MegatronEngine

    R = cfg.rollout
    roles = build_roles(cfg, log)
    actor = roles.actor
    tokenizer, template = tokenizer_of(actor.meta, actor.init_from, cfg.chat_template, log.say)
    rows = load_prompts(cfg, template, log)
    sampler = ShardedSampler(len(rows), R.prompts_per_step, 0, 1, seed=cfg.train.seed)
    total_steps = cfg.train.max_steps or max(1, int(cfg.train.epochs * sampler.steps_per_epoch))
    make_optimizers(roles, cfg.train, total_steps)
    vocab_limit = min(actor.model.vocab_size, tokenizer.vocab_size)
    ctx = StepContext(
        cfg=cfg, algo=cfg.algorithm(), tokenizer=tokenizer, stop_ids=template.stop_ids(), vocab_limit=vocab_limit,
        engine=MegatronEngine(actor.chunks, actor.mp, vocab_limit, max_batch=R.max_batch, sync_every=R.sync_every or None,
                              cuda_graphs=R.cuda_graphs) if actor.here else None,
        row_multiple=math.lcm(*(model_sequence_multiple(r.model, getattr(cfg, r.name).parallel) for r in roles.all())),
        rm_pooling=roles.reward.meta.extra.get("reward_pooling", "last") if roles.reward else None,
        device=platform.current().device, preempt=preempt, stream=score_stream(cfg, roles))
    state = StepState(0, 0, A.KLController(ctx.algo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon))
    meta_out = output_meta(actor.model, "causal", tokenizer.path, template, actor.meta, recipe="ppo",
                           init_from=os.path.abspath(actor.init_from))
    return Job(roles, ctx, state, rows, sampler, total_steps, template, meta_out)


def run(cfg: PPOConfig) -> dict:
    from megarlhf.models.checkpoint import save_model
    from megarlhf.parallel import DistEnv, destroy
    from megarlhf.recipes.common import Evaluator
    from megarlhf.train.checkpoint import find_checkpoint, load_roles_state, save_roles_state
    from megarlhf.train.job import start_run

    t, R = cfg.train, cfg.rollout
    env = DistEnv.from_environ()
    if env.world_size != cfg.world:  # the roles' ranks are laid out from cfg.world
        raise ConfigError([f"world={cfg.world} but the job has {env.world_size} processes "
                           f"({env.source}): set world={env.world_size}"])
    # megatron's global layout only seeds the RNG tracker: each role gets its own groups
    run_ = start_run("ppo", cfg, detail=f", algo {cfg.algo}, placement {cfg.placement}")
    log, preempt = run_.log, run_.preempt
    job = prepare(cfg, log, preempt)
    actor, state, a = job.roles.actor, job.state, job.ctx.algo
    ckpt = find_checkpoint(t.out_dir, t.resume)
    if ckpt:
        saved = load_roles_state(ckpt, job.checkpointed())
        state.step, state.consumed = saved["step"], saved["consumed_samples"]
        state.kl_ctl.load_state_dict(saved["kl_controller"])
        log.say(f"resumed from {ckpt} at step {state.step} ({state.consumed} prompts consumed)")
    log.say(f"training {job.total_steps} steps of {R.prompts_per_step} prompts x {R.samples_per_prompt} "
            f"samples, minibatch {cfg.ppo.minibatch_size}, {cfg.ppo.ppo_epochs} epoch(s); advantages "
            f"{a.advantage}, loss {a.policy_loss} ({a.loss_aggregation}), KL {a.kl_estimator} x {a.kl_coef} "
            f"in the {'reward' if a.kl_in_reward else 'loss'}")

    evaluate = Evaluator(actor.chunks, actor.mp, actor.model, job.template, cfg.eval, cfg.eval.prompts,
                         t.eval_interval, log.say)

    def save() -> str:  # collective
        return save_roles_state(t.out_dir, state.step, job.checkpointed(), {"consumed_samples": state.consumed,
                                "kl_controller": state.kl_ctl.state_dict()}, job.meta_out, keep=t.keep_checkpoints)

    result: Dict[str, Any] = {"history": []}
    if state.step == 0 and cfg.eval.at_start and (acc0 := evaluate(0, log)) is not None:
        result["initial_exact_match"] = acc0
    batches = job.sampler.batches(state.consumed)
    log.start_progress(job.total_steps, state.step)
    while state.step < job.total_steps:
        m = ppo_step(job.batch(next(batches)), job.roles, job.ctx, state).as_log()
        log.log(state.step, m)
        result["history"].append({"step": state.step, **m})
        if evaluate.due(state.step, job.total_steps):
            evaluate(state.step, log)
        preempt.end_of_step(state.step, job.total_steps, t.save_interval, save, log)  # a signal on any rank stops all
    acc = evaluate(state.step, log)
    result.update(steps=state.step, final=os.path.join(t.out_dir, "final"))
    if acc is not None:
        result["exact_match"] = acc
    save()
    save_model(actor.chunks, result["final"], dataclasses.replace(job.meta_out, extra={
        **job.meta_out.extra, "steps": state.step, **({"exact_match": acc} if acc is not None else {})}))
    log.say(f"saved {result['final']}")
    log.close()
    destroy()
    return result
