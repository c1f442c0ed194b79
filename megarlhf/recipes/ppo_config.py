"""The configuration of the PPO recipe and of its critic-free relatives (GRPO, Dr. GRPO,
RLOO, REINFORCE++), checked before any process group exists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional

from megarlhf.algos.ppo import KL_ESTIMATORS
from megarlhf.config import ConfigError, ModelConfig, ParallelConfig, RuntimeConfig, runtime_problems
from megarlhf.data.chat import ChatTemplateConfig
from megarlhf.data.dataset import DataConfig
from megarlhf.train.metrics import LogConfig
from megarlhf.train.loop import EvalConfig, LoopConfig
from megarlhf.train.schedule import ScheduleConfig

__all__ = ["PPOConfig", "RoleConfig", "PPOLossConfig", "RolloutConfig", "PPOTrainConfig", "Algorithm",
           "ALGORITHMS", "ROLES", "TRAINED", "SCORES"]


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
    """The objective (each of the paper's ablation switches is a field). Fields left unset
    (null) take the value of the job's ``algo`` (:data:`ALGORITHMS`)."""

    advantage: Optional[str] = None
    """Advantage estimator (``megarlhf/algos/advantages.py``): ``gae`` (with a critic),
    ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp``."""
    policy_loss: Optional[str] = None
    """``ppo_clip`` or ``dual_clip`` (``megarlhf/algos/policy_losses.py``)."""
    dual_clip: float = 3.0
    """With ``policy_loss: dual_clip``: the cap ``c`` on a negative advantage's loss."""
    loss_aggregation: Optional[str] = None
    """``token_mean``, ``seq_mean_token_mean`` or ``seq_mean_token_sum_norm`` (divided by
    ``rollout.max_new_tokens``)."""
    kl_coef: Optional[float] = None
    """Weight of the KL penalty: in the per-token reward for gae/rloo/reinforce_pp (the
    paper: 0.05 with a 13B RM, 0.0325 with 70B), in the loss for grpo/dr_grpo."""
    kl_target: Optional[float] = None
    """Adaptive KL controller target (per-sequence KL); none: fixed coefficient."""
    kl_horizon: int = 10000
    """Adaptive controller horizon, in sequences."""
    kl_estimator: Optional[str] = None
    """Per-token KL estimate: ``k1`` (log-ratio), ``k3`` or ``abs``."""
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
    whiten_advantages: Optional[bool] = None
    """Whiten the advantages over the whole batch (every DP rank's tokens)."""
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
    """Slots of the rollout engine per data-parallel replica: sequences generated at once
    (bounds the KV cache); a slot whose sequence ends takes the next waiting prompt."""
    sync_every: int = 0
    """Decode steps between the engine's looks at which sequences ended (each look waits
    for the device); 0: every step on CPU, every 8 on a GPU."""
    score_chunks: int = 4
    """Partitioned placement: each actor replica sends its finished responses to the reward
    model's ranks in this many chunks while it still generates, and they are scored as they
    arrive; 0: scored after generation."""
    cuda_graphs: bool = True
    """On a GPU, capture the engine's decode step as CUDA graphs (one per slot-count
    bucket, per call) and replay them; not with pipeline stages, nothing on CPU."""


@dataclass(frozen=True)
class PPOTrainConfig(LoopConfig):
    """The loop (:class:`~megarlhf.train.loop.LoopConfig`): a step is one rollout batch and
    its updates; ``epochs`` are passes over the prompts."""

    micro_batch_size: int = 8
    """Sequences per forward pass of any role."""
    actor_lr: float = 1e-6
    critic_lr: float = 1e-6
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(style="constant", warmup_ratio=0.1))
    distributed_optimizer: bool = True
    """Shard the actor's and critic's optimizer states over their data-parallel ranks
    when DP > 1."""
    out_dir: str = "runs/ppo"
    packing: bool = False
    """Every role's forward passes over rollout rows (reference and old log-probs, values,
    scores, the updates) see each microbatch's rows as one row of their real tokens end
    to end (megatron's ``thd`` layout), not padded to the step's longest row. The same
    results, less padding. Local layers attend through SDPA (``auto`` becomes ``sdpa``);
    Transformer Engine layers get megatron's ``thd`` layout in their fused attention."""

    POSITIVE: ClassVar[tuple] = ("micro_batch_size", "actor_lr", "critic_lr")


@dataclass(frozen=True)
class Algorithm:
    """What one step computes: the ``algo`` preset with the ``ppo:`` fields set over it."""

    name: str
    advantage: str
    policy_loss: str
    loss_aggregation: str
    kl_coef: float
    kl_estimator: str
    whiten_advantages: bool

    @property
    def estimator(self):
        from megarlhf.algos.advantages import ESTIMATORS

        return ESTIMATORS[self.advantage]

    @property
    def needs_critic(self) -> bool:
        return self.estimator.needs_critic

    @property
    def kl_in_reward(self) -> bool:
        return self.estimator.kl_in_reward


# The presets of ``algo``, each as its source ran it.
ALGORITHMS: Dict[str, Dict[str, object]] = {
    # Ouyang et al. 2022 / Ivison et al. 2024 (the paper): GAE with a critic, KL in the reward
    "ppo": dict(advantage="gae", policy_loss="ppo_clip", loss_aggregation="token_mean", kl_coef=0.05,
                kl_estimator="k1", whiten_advantages=True),
    # Shao et al. 2024: group-normalised scores, k3 KL in the loss with beta 0.04, per-sequence mean
    "grpo": dict(advantage="grpo", policy_loss="ppo_clip", loss_aggregation="seq_mean_token_mean",
                 kl_coef=0.04, kl_estimator="k3", whiten_advantages=False),
    # Liu et al. 2025: no std division, token sums over a constant length, no KL term
    "dr_grpo": dict(advantage="dr_grpo", policy_loss="ppo_clip", loss_aggregation="seq_mean_token_sum_norm",
                    kl_coef=0.0, kl_estimator="k3", whiten_advantages=False),
    # Ahmadian et al. 2024: leave-one-out baseline of the KL-penalised sequence reward
    "rloo": dict(advantage="rloo", policy_loss="ppo_clip", loss_aggregation="token_mean", kl_coef=0.05,
                 kl_estimator="k1", whiten_advantages=False),
    # Hu 2025: token-level KL in the reward, returns-to-go whitened over the batch (its own whitening)
    "reinforce_pp": dict(advantage="reinforce_pp", policy_loss="ppo_clip", loss_aggregation="token_mean",
                         kl_coef=0.01, kl_estimator="k1", whiten_advantages=False),
}



@dataclass(frozen=True)
class PPOConfig:
    actor: RoleConfig = field(default_factory=lambda: RoleConfig(init_from="runs/sft/checkpoint"))
    reference: RoleConfig = field(default_factory=RoleConfig)
    critic: RoleConfig = field(default_factory=lambda: RoleConfig(init_from="runs/rm/final"))
    reward: RoleConfig = field(default_factory=lambda: RoleConfig(init_from="runs/rm/final"))
    algo: str = "ppo"
    """``ppo`` (the paper's), ``grpo``, ``dr_grpo``, ``rloo`` or ``reinforce_pp``: a preset of
    the ``ppo:`` fields left unset (:data:`ALGORITHMS`). Only ``gae`` (ppo) builds a critic."""
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
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(at_start=True))
    log: LogConfig = field(default_factory=LogConfig)
    world: int = 1

    def world_size(self) -> int:
        return self.world

    def algorithm(self) -> Algorithm:
        """The ``algo`` preset with every ``ppo:`` field that is set over it."""
        preset = ALGORITHMS[self.algo]
        return Algorithm(name=self.algo, **{k: preset[k] if getattr(self.ppo, k) is None else getattr(self.ppo, k)
                                            for k in preset})

    def roles(self) -> tuple:
        """The models this job builds: no critic for a critic-free algorithm, no reward
        model when a rule scores."""
        from megarlhf.algos.advantages import ESTIMATORS

        drop = set()
        # an unknown algorithm or estimator keeps the critic: validate() names the key
        advantage = self.algorithm().advantage if self.algo in ALGORITHMS else None
        if advantage in ESTIMATORS and not ESTIMATORS[advantage].needs_critic:
            drop.add("critic")
        if self.score != "model":
            drop.add("reward")
        return tuple(r for r in ROLES if r not in drop)

    def init_paths(self) -> Dict[str, str]:
        """The checkpoint each built role starts from (the reference: the actor's unless set)."""
        inits = {"actor": self.actor.init_from, "reference": self.reference.init_from or self.actor.init_from,
                 "critic": self.critic.init_from, "reward": self.reward.init_from}
        return {role: inits[role] for role in self.roles()}

    def spans(self) -> Dict[str, tuple]:
        from megarlhf.train.roles import placement_spans

        return placement_spans(self.placement, self.world, self.reward_ranks, self.roles(), ("reward",))

    def resolved_models(self) -> Dict[str, ModelConfig]:
        """Each role's model, keyed ``<role>.model``: its starting checkpoint's, run as the
        role's ``model`` says (reads checkpoint metadata; no process group needed)."""
        from megarlhf.models.checkpoint import read_meta

        from megarlhf.models.llama import packed_model

        return {f"{role}.model": packed_model(getattr(self, role).model.apply(read_meta(path).model),
                                              self.train.packing, prefix=f"{role}.model", strict=False)
                for role, path in self.init_paths().items()}

    def process_groups(self) -> List[List[str]]:
        """The ``resolved_models`` keys of the roles that share processes."""
        spans = self.spans()
        groups: Dict[tuple, List[str]] = {}
        for role in self.roles():
            groups.setdefault(spans[role], []).append(f"{role}.model")
        return list(groups.values())

    def validate(self) -> None:
        p = self._range_problems()
        if p:  # the checks below divide by these sizes
            raise ConfigError(p)
        p = self._algorithm_problems() + self._placement_problems()
        for role in ROLES:
            p += runtime_problems(getattr(self, role).model, f"{role}.model")
            if self.train.packing:
                from megarlhf.models.llama import packing_problems

                p += packing_problems(getattr(self, role).model, f"{role}.model")
        if not p:
            p += self._layout_problems()
        p += self._rollout_problems() + self._input_problems()
        if p:
            raise ConfigError(p)

    def _range_problems(self) -> List[str]:
        from megarlhf.config import parallel_problems, range_problems
        from megarlhf.data.dataset import data_problems

        p, r, ro = [], self.ppo, self.rollout
        for role in ROLES:
            p += parallel_problems(getattr(self, role).parallel, f"{role}.parallel")
        p += self.train.problems() + data_problems(self.data)
        p += range_problems(self, "", positive=("world",), non_negative=("reward_ranks",))
        p += range_problems(ro, "rollout", positive=("prompts_per_step", "samples_per_prompt",
                                                     "max_new_tokens", "max_batch", "temperature"),
                            non_negative=("top_k", "sync_every", "score_chunks"))
        if not 0 < ro.top_p <= 1:
            p.append(f"rollout.top_p={ro.top_p} must be in (0, 1]")
        p += range_problems(r, "ppo", positive=("clip", "minibatch_size", "ppo_epochs", "kl_horizon",
                                                "kl_target", "value_clip", "dual_clip"),
                            non_negative=("kl_coef", "value_loss_coef", "critic_warmup_steps"),
                            fraction=("gamma", "lam"),
                            finite=("kl_clamp_min", "kl_clamp_max", "missing_eos_penalty"))
        if r.kl_clamp_min is not None and r.kl_clamp_max is not None and r.kl_clamp_min > r.kl_clamp_max:
            p.append(f"ppo.kl_clamp_min={r.kl_clamp_min} is above ppo.kl_clamp_max={r.kl_clamp_max}")
        p += self.eval.problems()
        p += range_problems(self.log, "log", positive=("interval",))
        return p

    def _algorithm_problems(self) -> List[str]:
        from megarlhf.algos.advantages import ESTIMATORS
        from megarlhf.algos.policy_losses import AGGREGATIONS, POLICY_LOSSES

        if self.algo not in ALGORITHMS:
            return [f"algo={self.algo!r}: expected one of {', '.join(ALGORITHMS)}"]
        a, r, p = self.algorithm(), self.ppo, []
        for name, value, known in (("advantage", a.advantage, ESTIMATORS), ("policy_loss", a.policy_loss, POLICY_LOSSES),
                                   ("loss_aggregation", a.loss_aggregation, AGGREGATIONS),
                                   ("kl_estimator", a.kl_estimator, KL_ESTIMATORS)):
            if value not in known:
                p.append(f"ppo.{name}={value!r}: expected one of {', '.join(known)}")
        if p:
            return p
        if a.policy_loss == "dual_clip" and r.dual_clip <= 1:
            p.append(f"ppo.dual_clip={r.dual_clip} must be > 1")
        if a.estimator.needs_groups and self.rollout.samples_per_prompt < 2:
            p.append(f"algo={self.algo} (ppo.advantage={a.advantage}) compares the samples of a prompt: "
                     "set rollout.samples_per_prompt >= 2")
        if r.score_baseline not in ("none", "loo"):
            p.append(f"ppo.score_baseline={r.score_baseline!r}: expected 'none' or 'loo'")
        elif r.score_baseline == "loo" and (self.rollout.samples_per_prompt < 2 or a.advantage != "gae"):
            p.append("ppo.score_baseline=loo is for ppo.advantage=gae with rollout.samples_per_prompt >= 2 "
                     "(the group estimators have their own baseline)")
        if not a.needs_critic and r.critic_warmup_steps:
            p.append(f"ppo.critic_warmup_steps={r.critic_warmup_steps}: algo={self.algo} "
                     f"(ppo.advantage={a.advantage}) has no critic")
        return p

    def _placement_problems(self) -> List[str]:
        p = []
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
        return p

    def _layout_problems(self) -> List[str]:
        p, r = [], self.ppo
        n = self.rollout.prompts_per_step * self.rollout.samples_per_prompt
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
            if n % dp or (role in TRAINED and r.minibatch_size % dp):
                p.append(f"rollout.prompts_per_step x samples_per_prompt = {n} and "
                         f"ppo.minibatch_size = {r.minibatch_size} must divide over the "
                         f"{role}'s {dp} data-parallel replicas")
        if n % r.minibatch_size:
            p.append(f"ppo.minibatch_size={r.minibatch_size} must divide rollout.prompts_per_step x "
                     f"samples_per_prompt = {n}")
        return p

    def _rollout_problems(self) -> List[str]:
        p, r, ro = [], self.ppo, self.rollout
        if r.old_logprobs not in ("recompute", "rollout"):
            p.append(f"ppo.old_logprobs={r.old_logprobs!r}: expected 'recompute' or 'rollout'")
        elif r.old_logprobs == "rollout" and (ro.top_p < 1 or ro.top_k):
            p.append("ppo.old_logprobs=rollout with rollout.top_p < 1 or rollout.top_k: the engine's "
                     "log-probs are of the truncated distribution, which the training pass does not "
                     "apply (use ppo.old_logprobs=recompute)")
        return p

    def _input_problems(self) -> List[str]:
        p = []
        if not self.actor.init_from:
            p.append("actor.init_from is empty: give the SFT checkpoint")
        for role in ("critic", "reward"):
            if role in self.roles() and not getattr(self, role).init_from:
                p.append(f"{role}.init_from is empty: give a reward-model checkpoint")
        if not self.data.sources:
            p.append("data.sources is empty: give prompts")
        return p


ROLES = ("actor", "reference", "critic", "reward")
TRAINED = ("actor", "critic")
SCORES = ("model", "exact_match")
