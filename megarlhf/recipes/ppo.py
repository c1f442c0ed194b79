"""PPO against a reward model, with actor, reference, critic and reward model.

    megarlhf ppo --config examples/tiny/ppo.yaml [key=value ...]

Set-up: each role is built on its own layout (``actor.parallel``, ``critic.parallel``,
...) with its own process groups: ``placement: colocated`` puts every role on every rank,
``partitioned`` puts the reward model on the last ``reward_ranks`` ranks of the job (a 70B
reward model beside a 13B policy). Every rank holds the whole rollout batch's small
tensors; each role computes its data-parallel share of the rows and shares them over the
job (``megarlhf/train/roles.py``), so both placements compute the same numbers.

One step, in timed phases:
  generate    the actor's DP replicas sample responses to this step's prompts (the
              rollout engine on the actor's own weights; randomness keyed by prompt)
  score       the reward model scores prompt + response (at the last token, or pooled
              over the response as the reward model was trained: ``rm pooling``); a response
              cut at max_new_tokens (no EOS) gets ``missing_eos_penalty`` instead
  logprobs    reference log-probs, old actor log-probs (recomputed with the training
              forward pass, in the same microbatches as the first update: the first
              minibatch's probability ratio is exactly 1), old critic values; every
              log-prob, here and in the update, is taken at the sampling temperature
  advantages  per-token reward -kl_coef * KL + score at the last token; GAE; advantages
              whitened over the whole batch (every DP rank's tokens)
  update      minibatches x PPO epochs: clipped policy loss (actor), clipped value loss
              (critic); the actor waits during ``critic_warmup_steps``
  metrics     score, KL, entropy, clip fractions, approximate KL, value loss, explained
              variance, lengths, EOS rate, time and tokens/s per phase

Departures from the paper (Ivison et al. 2024): none in the defaults of ``ppo:`` (kl_coef
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
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from megarlhf.algos.ppo import KL_ESTIMATORS
from megarlhf.config import (ConfigError, ModelConfig, ParallelConfig, RuntimeConfig, check_model,
                             runtime_problems)
from megarlhf.data.chat import ChatTemplateConfig
from megarlhf.data.dataset import DataConfig
from megarlhf.recipes.dpo import ExactMatchConfig
from megarlhf.train.metrics import LogConfig
from megarlhf.train.preemption import PreemptionConfig
from megarlhf.train.schedule import ScheduleConfig

__all__ = ["PPOConfig", "RoleConfig", "PPOLossConfig", "RolloutConfig", "PPOTrainConfig", "run"]


@dataclass(frozen=True)
class RoleConfig:
    """One model of the job."""

    init_from: str = ""
    """Checkpoint to start from (empty for the reference: the actor's)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The role's own TP/PP; data parallelism takes the role's remaining ranks."""
    model: RuntimeConfig = field(default_factory=RuntimeConfig)
    """How the role's model runs (precision, layers, FP8, recomputation); unset fields
    keep its checkpoint's."""


@dataclass(frozen=True)
class PPOLossConfig:
    """The PPO objective (each of the paper's ablation switches is a field)."""

    kl_coef: float = 0.05
    """Weight of the per-token KL penalty (the paper: 0.05 with a 13B RM, 0.0325 with 70B)."""
    kl_target: Optional[float] = None
    """Adaptive KL controller target (per-sequence KL); none: fixed coefficient."""
    kl_horizon: int = 10000
    """Adaptive controller horizon, in sequences."""
    kl_estimator: str = "k1"
    """Per-token KL estimate in the reward: ``k1`` (log-ratio), ``k3`` or ``abs``."""
    kl_clamp_min: Optional[float] = None
    """Clamp the per-token KL estimate from below (0: no reward for lowering the
    reference's probability); none: no clamp."""
    kl_clamp_max: Optional[float] = None
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    """Policy ratio clip."""
    value_clip: Optional[float] = 0.2
    """Value clip around the old values; none: plain squared error."""
    value_loss_coef: float = 0.1
    missing_eos_penalty: Optional[float] = -10.0
    """Score of a response cut at max_new_tokens (no EOS); none: the reward model's score."""
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    ppo_epochs: int = 1
    minibatch_size: int = 64
    """Sequences per optimizer step (over all data-parallel ranks)."""
    critic_warmup_steps: int = 0
    """Steps at the start that train only the critic."""
    old_logprobs: str = "recompute"
    """``recompute`` (training forward pass; default) or ``rollout`` (the engine's own)."""
    score_baseline: str = "none"
    """``none`` (the paper's); ``loo``: with several samples per prompt, each sample's score
    minus the mean score of the prompt's other samples (RLOO's leave-one-out baseline),
    which removes the reward model's per-prompt offset: a Bradley-Terry model only ranks
    answers to the same prompt."""


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling the responses of a step."""

    prompts_per_step: int = 512
    samples_per_prompt: int = 1
    """Responses per prompt (each is its own sequence in the batch)."""
    max_new_tokens: int = 1024
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_batch: int = 64
    """Sequences generated at once per data-parallel replica (bounds the KV cache)."""


@dataclass(frozen=True)
class PPOTrainConfig:
    """The loop."""

    epochs: float = 1.0
    """Passes over the prompts (sets the number of steps when ``max_steps`` is 0)."""
    max_steps: int = 0
    micro_batch_size: int = 8
    """Sequences per forward pass of any role."""
    actor_lr: float = 1e-6
    critic_lr: float = 1e-6
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(style="constant",
                                                                            warmup_ratio=0.1))
    weight_decay: float = 0.0
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    distributed_optimizer: bool = True
    """Shard the actor's and critic's optimizer states over their data-parallel ranks
    when DP > 1."""
    save_interval: int = 0
    keep_checkpoints: int = 2
    resume: str = "auto"
    eval_interval: int = 0
    """Steps between exact-match evaluations (0: at the start and the end only)."""
    out_dir: str = "runs/ppo"
    max_bad_steps: int = 5
    """Stop (after saving) when this many updates in a row were skipped for a NaN/Inf loss
    or gradient (a skipped update changes nothing; 0: never stop)."""
    seed: int = 1234
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    """Checkpoint and stop on a signal (SLURM's warning before the time limit); requeue."""


@dataclass(frozen=True)
class PPOConfig:
    actor: RoleConfig = field(default_factory=lambda: RoleConfig(init_from="runs/sft/checkpoint"))
    reference: RoleConfig = field(default_factory=RoleConfig)
    critic: RoleConfig = field(default_factory=lambda: RoleConfig(init_from="runs/rm/final"))
    reward: RoleConfig = field(default_factory=lambda: RoleConfig(init_from="runs/rm/final"))
    placement: str = "colocated"
    """``colocated`` (every role on every rank) or ``partitioned`` (the reward model on
    the last ``reward_ranks`` ranks, the other roles on the rest)."""
    reward_ranks: int = 0
    score: str = "model"
    """What scores a response: ``model`` (the reward model, the paper's way) or
    ``exact_match`` (a verifiable reward: 1 when the number after the response's last
    ``####`` equals the prompt row's ``reference``, else 0; no reward model is built and
    every prompt row needs a ``reference``)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=1024, max_prompt_length=1024))
    chat_template: ChatTemplateConfig = field(default_factory=ChatTemplateConfig)
    """How conversations are formatted: ``auto`` (default) is the actor's checkpoint's own
    template; naming another is reported once at start."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOLossConfig = field(default_factory=PPOLossConfig)
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    eval: ExactMatchConfig = field(default_factory=ExactMatchConfig)
    log: LogConfig = field(default_factory=LogConfig)
    world: int = 1

    def world_size(self) -> int:
        return self.world

    def roles(self) -> tuple:
        """The models this job builds (no reward model when a rule scores)."""
        return ROLES if self.score == "model" else tuple(r for r in ROLES if r != "reward")

    def spans(self) -> Dict[str, tuple]:
        from megarlhf.train.roles import placement_spans

        return placement_spans(self.placement, self.world, self.reward_ranks, self.roles(), ("reward",))

    def resolved_models(self) -> Dict[str, ModelConfig]:
        """Each role's model, keyed ``<role>.model``: its starting checkpoint's, run as the
        role's ``model`` says (reads checkpoint metadata; no process group needed)."""
        from megarlhf.models.checkpoint import read_meta

        inits = {"actor": self.actor.init_from, "reference": self.reference.init_from or self.actor.init_from,
                 "critic": self.critic.init_from, "reward": self.reward.init_from}
        return {f"{role}.model": getattr(self, role).model.apply(read_meta(inits[role]).model)
                for role in self.roles()}

    def process_groups(self) -> List[List[str]]:
        """The ``resolved_models`` keys of the roles that share processes."""
        spans = self.spans()
        groups: Dict[tuple, List[str]] = {}
        for role in self.roles():
            groups.setdefault(spans[role], []).append(f"{role}.model")
        return list(groups.values())

    def validate(self) -> None:
        from megarlhf.config import loop_problems, parallel_problems, range_problems
        from megarlhf.data.dataset import data_problems

        p, r, t, ro = [], self.ppo, self.train, self.rollout
        for role in ROLES:
            p += parallel_problems(getattr(self, role).parallel, f"{role}.parallel")
        p += loop_problems(t) + data_problems(self.data)
        p += range_problems(self, "", positive=("world",), non_negative=("reward_ranks",))
        p += range_problems(ro, "rollout", positive=("prompts_per_step", "samples_per_prompt",
                                                     "max_new_tokens", "max_batch", "temperature"),
                            non_negative=("top_k",))
        if not 0 < ro.top_p <= 1:
            p.append(f"rollout.top_p={ro.top_p} must be in (0, 1]")
        p += range_problems(r, "ppo", positive=("clip", "minibatch_size", "ppo_epochs", "kl_horizon",
                                                "kl_target", "value_clip"),
                            non_negative=("kl_coef", "value_loss_coef", "critic_warmup_steps"),
                            fraction=("gamma", "lam"),
                            finite=("kl_clamp_min", "kl_clamp_max", "missing_eos_penalty"))
        if r.kl_clamp_min is not None and r.kl_clamp_max is not None and r.kl_clamp_min > r.kl_clamp_max:
            p.append(f"ppo.kl_clamp_min={r.kl_clamp_min} is above ppo.kl_clamp_max={r.kl_clamp_max}")
        p += range_problems(self.eval, "eval", positive=("num_prompts", "max_new_tokens", "batch_size"))
        p += range_problems(self.log, "log", positive=("interval",))
        if p:  # the checks below divide by these sizes
            raise ConfigError(p)
        if self.score not in SCORES:
            p.append(f"score={self.score!r}: expected one of {', '.join(SCORES)}")
        elif self.score != "model" and self.placement == "partitioned":
            p.append(f"placement=partitioned puts the reward model on its own ranks; score={self.score} "
                     "has none: use placement=colocated")
        if self.placement not in ("colocated", "partitioned"):
            p.append(f"placement={self.placement!r}: expected 'colocated' or 'partitioned'")
        elif self.placement == "partitioned" and not 0 < self.reward_ranks < self.world:
            p.append(f"placement=partitioned needs 0 < reward_ranks ({self.reward_ranks}) < world ({self.world})")
        elif self.placement == "colocated" and self.reward_ranks:
            p.append("reward_ranks is only for placement=partitioned")
        n = ro.prompts_per_step * ro.samples_per_prompt
        for role in ROLES:
            p += runtime_problems(getattr(self, role).model, f"{role}.model")
        if not p:
            for role, (_, size) in self.spans().items():
                par = getattr(self, role).parallel
                if size % par.model_parallel_size:
                    p.append(f"{role}.parallel: TP x PP = {par.model_parallel_size} does not divide "
                             f"the role's {size} ranks")
                    continue
                dp = size // par.model_parallel_size
                if par.vpp > 1:
                    p.append(f"{role}.parallel.virtual_pipeline_model_parallel_size: not supported in PPO "
                             "(generation needs one model chunk per rank)")
                if n % dp or (role in ("actor", "critic") and r.minibatch_size % dp):
                    p.append(f"rollout.prompts_per_step x samples_per_prompt = {n} and "
                             f"ppo.minibatch_size = {r.minibatch_size} must divide over the "
                             f"{role}'s {dp} data-parallel replicas")
        if n % r.minibatch_size:
            p.append(f"ppo.minibatch_size={r.minibatch_size} must divide rollout.prompts_per_step x "
                     f"samples_per_prompt = {n}")
        if r.kl_estimator not in KL_ESTIMATORS:
            p.append(f"ppo.kl_estimator={r.kl_estimator!r}: expected one of {KL_ESTIMATORS}")
        if r.score_baseline not in ("none", "loo"):
            p.append(f"ppo.score_baseline={r.score_baseline!r}: expected 'none' or 'loo'")
        elif r.score_baseline == "loo" and ro.samples_per_prompt < 2:
            p.append("ppo.score_baseline=loo needs rollout.samples_per_prompt >= 2")
        if r.old_logprobs not in ("recompute", "rollout"):
            p.append(f"ppo.old_logprobs={r.old_logprobs!r}: expected 'recompute' or 'rollout'")
        elif r.old_logprobs == "rollout" and (ro.top_p < 1 or ro.top_k):
            p.append("ppo.old_logprobs=rollout with rollout.top_p < 1 or rollout.top_k: the engine's "
                     "log-probs are of the truncated distribution, which the training pass does not "
                     "apply (use ppo.old_logprobs=recompute)")
        if r.kl_target is not None and r.kl_target <= 0:
            p.append(f"ppo.kl_target={r.kl_target} must be > 0")
        for name in ("clip", "minibatch_size", "ppo_epochs"):
            if getattr(r, name) <= 0:
                p.append(f"ppo.{name}={getattr(r, name)} must be > 0")
        if not 0 <= r.gamma <= 1 or not 0 <= r.lam <= 1:
            p.append("ppo.gamma and ppo.lam must be in [0, 1]")
        if ro.temperature <= 0:
            p.append(f"rollout.temperature={ro.temperature} must be > 0")
        if not self.actor.init_from:
            p.append("actor.init_from is empty: give the SFT checkpoint")
        for role in ("critic", "reward") if self.score == "model" else ("critic",):
            if not getattr(self, role).init_from:
                p.append(f"{role}.init_from is empty: give a reward-model checkpoint")
        if not self.data.sources:
            p.append("data.sources is empty: give prompts")
        if p:
            raise ConfigError(p)


ROLES = ("actor", "reference", "critic", "reward")
SCORES = ("model", "exact_match")


# -- forward steps (megatron forward_step_func) ------------------------------------------------
@dataclass
class PPOMicrobatch:
    """Rows of the rollout batch, ``[b, s]`` each, aligned on label positions (index t
    holds the quantity of the token that position t predicts).

    tokens, position_ids, labels   int64
    mask           float32  1 on response tokens
    last_index     [b] int64 index of each row's last real token (where rewards are read)
    old_logprobs, advantages, old_values, returns   float32 (zeros until known)
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    last_index: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    old_values: torch.Tensor
    returns: torch.Tensor

    def to(self, device) -> "PPOMicrobatch":
        return PPOMicrobatch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits of the distribution the rollout sampled from (temperature applied), so that
    log-probs, ratios and KL are those of the sampling policy, as open-instruct, TRL and
    verl compute them."""
    if temperature == 1.0:
        return logits
    # the padded vocabulary's logits are the most negative float: keep them finite (in
    # place: the quotient is a fresh tensor, and the division's backward does not need it)
    return (logits.float() / temperature).clamp_(min=torch.finfo(torch.float32).min)


def _logprob_step(mp, vocab_start: int, device, temperature: float = 1.0):
    """Forward-only: per-token log-probs ``[b, s]`` of the labels (0 off the mask) at the
    sampling temperature."""
    from megarlhf.algos.logprobs import token_logprobs

    def step(it, model):
        b = next(it).to(device)
        out = model(b.tokens, b.position_ids, attention_mask=None)

        def collect(output, non_loss_data=True):
            lp = token_logprobs(_scaled(output, temperature), b.labels, mp.tp_group, vocab_start).float()
            return {"values": lp * b.mask}
        return out, collect
    return step


def _value_step(device):
    """Forward-only: scalar-head outputs ``[b, s]``."""
    def step(it, model):
        b = next(it).to(device)
        out = model(b.tokens, b.position_ids, attention_mask=None)
        return out, lambda output, non_loss_data=True: {"values": output[..., 0].float()}
    return step


def _actor_step(mp, vocab_start: int, clip: float, device, temperature: float = 1.0):
    """Training: clipped policy loss summed over tokens (megatron divides by the
    minibatch's token count), log-probs at the sampling temperature. ``stats`` = [loss
    sum, tokens, clipped, approx KL sum, ratio sum, |ratio - 1| sum, entropy sum]."""
    from megarlhf.algos.logprobs import token_entropy, token_logprobs
    from megarlhf.algos.ppo import policy_loss

    def step(it, model):
        b = next(it).to(device)
        out = model(b.tokens, b.position_ids, attention_mask=None)

        def loss_fn(output):
            logits = _scaled(output, temperature)
            lp = token_logprobs(logits, b.labels, mp.tp_group, vocab_start).float()
            loss, st = policy_loss(lp, b.old_logprobs, b.advantages, b.mask, clip)
            with torch.no_grad():
                ent = (token_entropy(logits.detach(), mp.tp_group).float() * b.mask).sum()
                dev = ((torch.exp(lp.detach() - b.old_logprobs) - 1).abs() * b.mask).sum()
            n = b.mask.sum()
            stats = torch.stack([loss.detach(), n, st["clipped"], st["approx_kl"], st["ratio"],
                                 dev, ent]).double()
            return loss, n.to(torch.int), {"stats": stats}
        return out, loss_fn
    return step


def _critic_step(value_clip: Optional[float], coef: float, device):
    """Training: clipped value loss x coefficient, summed over tokens. ``stats`` =
    [value loss sum (without the coefficient), tokens, clipped]."""
    from megarlhf.algos.ppo import value_loss

    def step(it, model):
        b = next(it).to(device)
        out = model(b.tokens, b.position_ids, attention_mask=None)

        def loss_fn(output):
            v = output[..., 0].float()
            loss, st = value_loss(v, b.old_values, b.returns, b.mask, value_clip)
            n = b.mask.sum()
            stats = torch.stack([loss.detach(), n, st["clipped"]]).double()
            return coef * loss, n.to(torch.int), {"stats": stats}
        return out, loss_fn
    return step


# -- the rollout batch -------------------------------------------------------------------------
@dataclass
class Rollout:
    """The whole step's sequences, identical on every rank. ``[n, s]`` tensors as in
    :class:`PPOMicrobatch`; ``finish`` 0 eos, 1 other stop id, 2 length."""

    tokens: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    last_index: torch.Tensor
    response_len: torch.Tensor
    finish: torch.Tensor
    rollout_logprobs: torch.Tensor
    seq: int

    @property
    def n(self) -> int:
        return self.tokens.shape[0]


def build_rollout(prompts: List[List[int]], resp: torch.Tensor, resp_len: torch.Tensor,
                  finish: torch.Tensor, resp_lp: torch.Tensor, pad_id: int, multiple: int = 8) -> Rollout:
    """Rows ``prompt + response``, right-padded to the longest rounded up to ``multiple``
    (what every role's layout needs: :func:`~megarlhf.models.llama.sequence_multiple`)."""
    from megarlhf.models.llama import pad_to

    n = len(prompts)
    lens = [len(p) + int(l) for p, l in zip(prompts, resp_len)]
    seq = pad_to(max(lens), multiple)
    tokens = torch.full((n, seq), pad_id, dtype=torch.long)
    labels = torch.zeros((n, seq), dtype=torch.long)
    mask = torch.zeros((n, seq))
    lp = torch.zeros((n, seq))
    for i, p in enumerate(prompts):
        lp_len, r = len(p), int(resp_len[i])
        row = torch.tensor(list(p) + resp[i, :r].tolist(), dtype=torch.long)
        tokens[i, :len(row)] = row
        labels[i, :len(row) - 1] = row[1:]
        mask[i, lp_len - 1:lp_len - 1 + r] = 1.0
        lp[i, lp_len - 1:lp_len - 1 + r] = resp_lp[i, :r]
    last = torch.tensor(lens) - 1
    return Rollout(tokens, labels, mask, last, resp_len.clone(), finish.clone(), lp, seq)


def microbatches(ro: Rollout, rows: range, mbs: int, extra: Optional[Dict[str, torch.Tensor]] = None
                 ) -> List[PPOMicrobatch]:
    extra = extra or {}
    zeros = torch.zeros_like(ro.mask)
    out = []
    pos = torch.arange(ro.seq).unsqueeze(0)
    for s in range(rows.start, rows.stop, mbs):
        sl = slice(s, min(s + mbs, rows.stop))
        b = sl.stop - sl.start
        out.append(PPOMicrobatch(
            tokens=ro.tokens[sl], position_ids=pos.expand(b, -1).contiguous(), labels=ro.labels[sl],
            mask=ro.mask[sl], last_index=ro.last_index[sl],
            **{k: extra.get(k, zeros)[sl] for k in ("old_logprobs", "advantages", "old_values", "returns")}))
    return out


def minibatch_rows(n: int, minibatch: int, mp):
    """For each minibatch: this rank's rows (``range`` into the possibly permuted batch)."""
    from megarlhf.train.roles import shard_rows

    for start in range(0, n, minibatch):
        mine = shard_rows(minibatch, mp)
        yield range(start + mine.start, start + mine.stop)


def minibatch_has_tokens(mask: torch.Tensor, index: int, size: int) -> bool:
    """Whether minibatch ``index`` (rows ``[index * size, (index + 1) * size)`` over all DP
    ranks) has any response token: a minibatch of empty responses is skipped, since its
    per-token loss would divide by zero tokens."""
    return bool(mask[index * size:(index + 1) * size].sum() > 0)


# -- the recipe -------------------------------------------------------------------------------
def run(cfg: PPOConfig) -> dict:
    from megarlhf import platform
    from megarlhf.algos import ppo as A
    from megarlhf.algos.logprobs import vocab_start_of
    from megarlhf.algos.preference import pool_rewards, response_positions
    from megarlhf.data.dataset import build_dataset
    from megarlhf.data.sampler import ShardedSampler
    from megarlhf.data.task import is_correct
    from megarlhf.models.checkpoint import load_model, read_meta, save_model
    from megarlhf.models.llama import build_model, describe, model_sequence_multiple, padded_vocab
    from megarlhf.parallel import (DistEnv, build_layout, destroy, init_distributed,
                                   initialize_model_parallel)
    from megarlhf.recipes.common import exact_match_eval
    from megarlhf.recipes.pairs_common import output_meta, reduce_stats, tokenizer_of
    from megarlhf.rollout.engine import MegatronEngine, SamplingParams
    from megarlhf.train.checkpoint import find_checkpoint, load_roles_state, save_roles_state
    from megarlhf.train.metrics import MetricsLog
    from megarlhf.train.optim import OptimConfig, build_optimizer, build_optimizer_elsewhere, wrap_ddp
    from megarlhf.train.preemption import Preemption
    from megarlhf.train.roles import is_writer, share_rows, shard_rows
    from megarlhf.train.schedule import build_scheduler
    from megarlhf.train.guard import BadSteps
    from megarlhf.train.step import forward_only, train_step

    t, P, R = cfg.train, cfg.ppo, cfg.rollout
    preempt = Preemption(t.preemption)  # signal handlers first: a signal only sets a flag
    env = DistEnv.from_environ()
    if env.world_size != cfg.world:  # the roles' ranks are laid out from cfg.world
        raise ConfigError([f"world={cfg.world} but the job has {env.world_size} processes "
                           f"({env.source}): set world={env.world_size}"])
    init_distributed(env)
    plat = platform.current()
    dev = plat.device
    initialize_model_parallel(ParallelConfig(), seed=t.seed)  # the RNG tracker; roles get their own groups
    log = MetricsLog(t.out_dir, cfg.log, dataclasses.asdict(cfg))
    log.say(f"megarlhf ppo: {env.world_size} process(es) on {plat.describe()}, placement {cfg.placement}")

    # -- roles: layouts (collective, same order everywhere), models, weights -----------------
    spans = cfg.spans()
    roles = cfg.roles()
    layouts = {role: build_layout(getattr(cfg, role).parallel, *spans[role], seed=t.seed) for role in roles}
    inits = {"actor": cfg.actor.init_from, "reference": cfg.reference.init_from or cfg.actor.init_from,
             "critic": cfg.critic.init_from, "reward": cfg.reward.init_from}
    inits = {role: inits[role] for role in roles}
    metas = {role: read_meta(path) for role, path in inits.items()}
    shapes = {key.split(".")[0]: m for key, m in cfg.resolved_models().items()}
    for role in roles:
        check_model(shapes[role], prefix=f"{role}.model")
    tokenizer, template = tokenizer_of(metas["actor"], inits["actor"], cfg.chat_template, log.say)
    for role in (r for r in ("critic", "reward") if r in roles):
        if metas[role].model.vocab_size != metas["actor"].model.vocab_size:
            raise ConfigError([f"{role}.init_from={inits[role]}: vocabulary {metas[role].model.vocab_size} "
                               f"differs from the actor's {metas['actor'].model.vocab_size}: the roles "
                               "must share the tokenizer"])
    rm_pooling = metas["reward"].extra.get("reward_pooling", "last") if "reward" in roles else None
    if "reward" in roles and metas["reward"].kind != "reward":
        raise ConfigError([f"reward.init_from={inits['reward']} is a {metas['reward'].kind} model; "
                           "the scorer must be a reward model"])
    models: Dict[str, Optional[List[torch.nn.Module]]] = {}
    for role in roles:
        mp, meta = layouts[role], metas[role]
        kind = "causal" if role in ("actor", "reference") else "reward"
        chunks = build_model(shapes[role], mp, kind=kind) if mp is not None else []
        skip = ("output_layer.",) if kind == "reward" and meta.kind == "causal" else ()
        load_model(chunks, inits[role], skip_prefixes=skip)  # collective over the job
        if mp is not None:
            log.say(f"{role}: {describe(shapes[role], mp)} on ranks {mp.ranks[0]}-{mp.ranks[-1]} "
                    f"from {inits[role]}{' (fresh value head)' if skip else ''}")
        if role in ("reference", "reward"):
            for c in chunks:
                c.eval()
                c.requires_grad_(False)
        models[role] = chunks if mp is not None else None
    actor_mp, critic_mp = layouts["actor"], layouts["critic"]
    model_cfg = shapes["actor"]
    # every role reads the same rows: padded to what each role's layout needs
    row_multiple = math.lcm(*(model_sequence_multiple(shapes[role], getattr(cfg, role).parallel) for role in roles))

    # -- prompts, optimizers, schedules, resume ------------------------------------------------
    data = build_dataset(cfg.data, "prompts", template)
    for line in data.summary():
        log.say(f"data: {line}")
    prompts_ds = data.train
    if cfg.score == "exact_match":
        missing = sum(r is None for r in prompts_ds["reference"])
        if missing:
            from megarlhf.data.load import DataError

            raise DataError(f"score=exact_match: {missing} of {len(prompts_ds)} prompt rows of data.sources "
                            f"({', '.join(src.path for src in cfg.data.sources)}) have no 'reference' "
                            "answer to check responses against")
    sampler = ShardedSampler(len(prompts_ds), R.prompts_per_step, 0, 1, seed=t.seed)
    total_steps = t.max_steps or max(1, int(t.epochs * sampler.steps_per_epoch))
    trainable = {}
    for role, lr in (("actor", t.actor_lr), ("critic", t.critic_lr)):
        mp = layouts[role]
        if mp is None:
            build_optimizer_elsewhere()
            continue
        for c in models[role]:
            c.config.calculate_per_token_loss = True
        dist_opt = t.distributed_optimizer and mp.dp_size > 1
        ddp = wrap_ddp(models[role], mp, dist_opt)
        opt = build_optimizer(ddp, OptimConfig(lr=lr, min_lr=lr if t.schedule.style == "constant" else 0.0,
                                               weight_decay=t.weight_decay, adam_beta2=t.adam_beta2,
                                               clip_grad=t.clip_grad, use_distributed_optimizer=dist_opt), mp)
        sched = build_scheduler(opt, t.schedule, lr, lr if t.schedule.style == "constant" else 0.0,
                                total_steps, t.weight_decay)
        trainable[role] = (ddp, opt, sched)
    kl_ctl = A.KLController(P.kl_coef, P.kl_target, P.kl_horizon)
    ckpt_roles = {role: (models[role], opt, sched) for role, (_, opt, sched) in trainable.items()}
    meta_out = output_meta(model_cfg, "causal", tokenizer.path, template, metas["actor"], recipe="ppo",
                           init_from=os.path.abspath(inits["actor"]))
    step, consumed = 0, 0
    ckpt = find_checkpoint(t.out_dir, t.resume)
    if ckpt:
        state = load_roles_state(ckpt, ckpt_roles)
        step, consumed = state["step"], state["consumed_samples"]
        kl_ctl.load_state_dict(state["kl_controller"])
        log.say(f"resumed from {ckpt} at step {step} ({consumed} prompts consumed)")
    log.say(f"training {total_steps} steps of {R.prompts_per_step} prompts x {R.samples_per_prompt} "
            f"samples, minibatch {P.minibatch_size}, {P.ppo_epochs} PPO epoch(s)")

    vstart = {role: vocab_start_of(layouts[role].tp_rank, padded_vocab(model_cfg, layouts[role].config.tp),
                                   layouts[role].config.tp)
              for role in ("actor", "reference") if layouts[role] is not None}
    engine = MegatronEngine(models["actor"], actor_mp, min(model_cfg.vocab_size, tokenizer.vocab_size),
                            max_batch=R.max_batch) if actor_mp is not None else None
    stop_ids = template.stop_ids()

    def evaluate(at_step: int) -> Optional[float]:
        if not cfg.eval.prompts or actor_mp is None:
            return None
        acc, n, secs = exact_match_eval(models["actor"], actor_mp, model_cfg, template, cfg.eval.prompts,
                                        cfg.eval.num_prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        log.say(f"step {at_step}: exact match on {n} prompts: {acc:.1%} (greedy, {secs:.1f} s)")
        return acc

    def forward_rows(role: str, step_fn, ro: Rollout, row_ranges, extra=None) -> torch.Tensor:
        """Per-token ``[n, s]`` outputs of a role over its rows, shared with every rank."""
        mp = layouts[role]
        rows_all: List[int] = []
        outs: List[torch.Tensor] = []
        if mp is not None:
            micro = []
            for rows in row_ranges(mp):
                micro += microbatches(ro, rows, t.micro_batch_size, extra)
                rows_all += list(rows)
            res = forward_only(models[role], mp, step_fn, micro, ro.seq, t.micro_batch_size)
            outs = [o["values"] for o in res]
        full = torch.zeros(ro.n, ro.seq, device=dev)
        if is_writer(mp) and rows_all:  # one writer per replica: the sum counts each row once
            full[torch.tensor(rows_all, device=dev)] = torch.cat(outs).to(dev)
        torch.distributed.all_reduce(full)
        return full.cpu()

    def first_epoch_rows(mp):  # the minibatch order of the first update epoch
        return list(minibatch_rows(n_seq, P.minibatch_size, mp))

    @contextmanager
    def phase(name: str, times: Dict[str, float]):
        t0 = time.time()
        yield
        times[name] = time.time() - t0

    n_seq = R.prompts_per_step * R.samples_per_prompt
    history: List[Dict[str, float]] = []
    result: Dict[str, object] = {}
    if step == 0:
        acc0 = evaluate(0)
        if acc0 is not None:
            result["initial_exact_match"] = acc0
            log.log(0, {"exact_match": acc0}, echo=False)
    batches = sampler.batches(consumed)
    guards = {role: BadSteps(t.max_bad_steps, name=role) for role in trainable}
    log.start_progress(total_steps, step)
    while step < total_steps:
        times: Dict[str, float] = {}
        idx = next(batches)
        prompts = [list(prompts_ds[int(i)]["prompt_ids"]) for i in idx for _ in range(R.samples_per_prompt)]
        refs = [prompts_ds[int(i)].get("reference") for i in idx for _ in range(R.samples_per_prompt)]

        # 1. generate: the actor's replicas sample their share; every rank gets every row
        with phase("generate", times):
            mine = shard_rows(n_seq, actor_mp)
            out = None
            if engine is not None and len(mine):
                out = engine.generate(prompts[mine.start:mine.stop], SamplingParams(
                    max_new_tokens=R.max_new_tokens, temperature=R.temperature, top_p=R.top_p,
                    top_k=R.top_k, stop_ids=stop_ids, eos_id=tokenizer.eos_id,
                    seed=t.seed * 100_003 + step), first_index=mine.start)
            w = is_writer(actor_mp)
            vals = _pad_responses(out, R.max_new_tokens) if w else None
            resp = share_rows(n_seq, (R.max_new_tokens,), torch.long, mine, vals and vals[0], w, dev)
            resp_len = share_rows(n_seq, (), torch.long, mine, vals and vals[1], w, dev)
            finish = share_rows(n_seq, (), torch.long, mine, vals and vals[2], w, dev)
            resp_lp = share_rows(n_seq, (R.max_new_tokens,), torch.float32, mine, vals and vals[3], w, dev)
            ro = build_rollout(prompts, resp, resp_len, finish, resp_lp, tokenizer.pad_id, row_multiple)

        # 2. score: the reward model on its own replicas (maybe its own ranks), or the rule
        with phase("score", times):
            texts = [tokenizer.decode(resp[i, :int(resp_len[i])].tolist()) for i in range(ro.n)]
            right = (torch.tensor([is_correct(x, r) for x, r in zip(texts, refs)])
                     if refs[0] is not None else None)
            if cfg.score == "model":
                values = forward_rows("reward", _value_step(dev), ro, lambda mp: [shard_rows(n_seq, mp)])
                pooled = None if rm_pooling == "last" else response_positions(ro.mask)
                scores = pool_rewards(values, pooled, ro.last_index, rm_pooling)
            else:
                scores = right.float()

        # 3. reference log-probs, old log-probs (training forward, first-epoch microbatches), values
        with phase("logprobs", times):
            ref_lp = forward_rows("reference", _logprob_step(layouts["reference"], vstart.get("reference", 0), dev,
                                                             R.temperature),
                                  ro, lambda mp: [shard_rows(n_seq, mp)])
            if P.old_logprobs == "recompute":
                old_lp = forward_rows("actor", _logprob_step(actor_mp, vstart.get("actor", 0), dev, R.temperature), ro,
                                      first_epoch_rows)
            else:
                old_lp = ro.rollout_logprobs * ro.mask
            old_values = forward_rows("critic", _value_step(dev), ro, first_epoch_rows) * ro.mask

        # 4. advantages (every rank, the whole batch: whitening covers every DP rank's tokens)
        with phase("advantages", times):
            no_eos = ro.finish == 2
            used = scores.clone()
            if P.missing_eos_penalty is not None:
                used = torch.where(no_eos, torch.full_like(used, P.missing_eos_penalty), used)
            if P.score_baseline == "loo":
                used = A.leave_one_out(used, R.samples_per_prompt)
            kl = A.kl_estimate(old_lp, ref_lp, P.kl_estimator, P.kl_clamp_min, P.kl_clamp_max) * ro.mask
            rewards = A.token_rewards(kl, used, ro.mask, kl_ctl.coef)
            if P.whiten_rewards:
                rewards = A.masked_whiten(rewards, ro.mask, shift_mean=False)
            adv, returns = A.gae(rewards, old_values, ro.mask, P.gamma, P.lam)
            if P.whiten_advantages:
                adv = A.masked_whiten(adv, ro.mask)
            extra = {"old_logprobs": old_lp, "advantages": adv, "old_values": old_values, "returns": returns}

        # 5. updates: minibatches x epochs (the first epoch in rollout order)
        with phase("update", times):
            train_actor = step >= P.critic_warmup_steps
            actor_stats, critic_stats, first_dev = None, None, None
            empty_minibatches = 0
            for epoch in range(P.ppo_epochs):
                order = None
                if epoch:
                    g = torch.Generator().manual_seed(t.seed * 7919 + step * 31 + epoch)
                    order = torch.randperm(n_seq, generator=g)
                ep_extra, ep_ro = extra, ro
                if order is not None:
                    ep_ro = dataclasses.replace(ro, **{k: getattr(ro, k)[order] for k in
                                                       ("tokens", "labels", "mask", "last_index")})
                    ep_extra = {k: v[order] for k, v in extra.items()}
                for mb in range(n_seq // P.minibatch_size):
                    if not minibatch_has_tokens(ep_ro.mask, mb, P.minibatch_size):
                        empty_minibatches += 1  # every response empty: nothing to learn from
                        continue
                    for role, step_fn, enabled in (
                            ("actor", _actor_step(actor_mp, vstart.get("actor", 0), P.clip, dev, R.temperature),
                             train_actor),
                            ("critic", _critic_step(P.value_clip, P.value_loss_coef, dev), True)):
                        mp = layouts[role]
                        if mp is None or not enabled:
                            continue
                        rows = list(minibatch_rows(n_seq, P.minibatch_size, mp))[mb]
                        micro = microbatches(ep_ro, rows, t.micro_batch_size, ep_extra)
                        ddp, opt, _ = trainable[role]
                        res = train_step(ddp, opt, mp, step_fn, micro, ro.seq, t.micro_batch_size)
                        guards[role].record(res["skipped"], step + 1, preempt)
                        st = reduce_stats(res["outputs"], mp, dev).cpu()
                        if role == "actor":
                            actor_stats = st if actor_stats is None else actor_stats + st
                            if first_dev is None:
                                first_dev = float(st[5] / st[1])
                        else:
                            critic_stats = st if critic_stats is None else critic_stats + st
            for role, (_, _, sched) in trainable.items():
                if role == "critic" or train_actor:
                    sched.step(1)

        # 6. metrics (identical on every rank; logged by rank 0)
        step += 1
        consumed += R.prompts_per_step
        seq_kl = (A.kl_estimate(old_lp, ref_lp, "k1") * ro.mask).sum(-1)
        gen_tokens = int(ro.response_len.sum())
        all_tokens = int((ro.tokens != tokenizer.pad_id).sum())
        m: Dict[str, float] = {
            "score_mean": float(scores.mean()), "score_std": float(scores.std()) if ro.n > 1 else 0.0,
            "reward_mean": float(used.mean()), "kl": float(seq_kl.mean()), "kl_coef": kl_ctl.coef,
            "response_length": float(ro.response_len.float().mean()),
            "eos_rate": float((ro.finish == 0).float().mean()),
            "advantage_mean": float(A.masked_mean(adv, ro.mask)),
            "explained_variance": float(A.explained_variance(old_values, returns, ro.mask)),
        }
        if right is not None:
            m["train_accuracy"] = float(right.float().mean())
            if right.any() and not right.all():  # does the scorer still rank this step's samples?
                m["score_correct"] = float(scores[right].mean())
                m["score_wrong"] = float(scores[~right].mean())
        if actor_stats is not None:
            loss, n, clipped, akl, ratio, devsum, ent = actor_stats.tolist()
            m.update(policy_loss=loss / n, clip_fraction=clipped / n, approx_kl=akl / n,
                     ratio_mean=ratio / n, entropy=ent / n, first_minibatch_ratio_dev=first_dev)
        if critic_stats is not None:
            vl, n, vclip = critic_stats.tolist()
            m.update(value_loss=vl / n, value_clip_fraction=vclip / n)
        if empty_minibatches:
            m["empty_minibatches"] = empty_minibatches
        for role, g in guards.items():
            if g.total:
                m[f"skipped_updates/{role}"] = g.total
        if "actor" in trainable:
            m["actor_lr"] = trainable["actor"][1].param_groups[0]["lr"]
        for name, secs in times.items():
            m[f"time/{name}"] = round(secs, 3)
        m["time/step"] = round(sum(times.values()), 3)
        m["tokens_per_s/generate"] = round(gen_tokens / max(times["generate"], 1e-9))
        m["tokens_per_s/step"] = round(all_tokens / max(m["time/step"], 1e-9))
        kl_ctl.update(m["kl"], ro.n)
        log.log(step, m)
        history.append({"step": step, **m})
        if t.eval_interval and step % t.eval_interval == 0 and step < total_steps:
            acc = evaluate(step)
            if acc is not None:
                log.log(step, {"exact_match": acc}, echo=False)
        preempt.end_of_step(step, total_steps, t.save_interval, lambda: save_roles_state(
            t.out_dir, step, ckpt_roles, {"consumed_samples": consumed, "kl_controller": kl_ctl.state_dict()},
            meta_out, keep=t.keep_checkpoints), log)  # collective; a signal on any rank stops every rank
    log.close()

    result["steps"] = step
    result["history"] = history
    acc = evaluate(step)
    if acc is not None:
        result["exact_match"] = acc
        MetricsLog(t.out_dir, dataclasses.replace(cfg.log, progress_bar=False, wandb=False)).log(
            step, {"exact_match": acc}, echo=False)
    save_roles_state(t.out_dir, step, ckpt_roles,
                     {"consumed_samples": consumed, "kl_controller": kl_ctl.state_dict()},
                     meta_out, keep=t.keep_checkpoints)
    final = os.path.join(t.out_dir, "final")
    save_model(models["actor"] or [], final, dataclasses.replace(
        meta_out, extra={**meta_out.extra, "steps": step,
                         **({"exact_match": acc} if acc is not None else {})}))
    log.say(f"saved {final}")
    result["final"] = final
    destroy()
    return result


def _pad_responses(out, max_new: int):
    """Engine output -> (ids [n, max_new], lengths [n], finish codes [n], log-probs [n, max_new])."""
    n = len(out.response_ids)
    ids = torch.zeros(n, max_new, dtype=torch.long)
    lps = torch.zeros(n, max_new)
    for i, (r, lp) in enumerate(zip(out.response_ids, out.sample_logprobs)):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        lps[i, :len(lp)] = torch.tensor(lp)
    lens = torch.tensor([len(r) for r in out.response_ids], dtype=torch.long)
    codes = torch.tensor([{"eos": 0, "stop": 1, "length": 2}[f] for f in out.finish_reason], dtype=torch.long)
    return ids, lens, codes, lps
