"""Reward model training (Bradley-Terry) and pair-accuracy evaluation.

    megarlhf rm --config examples/tiny/rm.yaml [key=value ...]
    megarlhf rm-eval --ckpt runs/rm/final --data rewardbench.jsonl [--tp N] [--pp N]

Steps: tokenizer, chat template and model from the SFT checkpoint (its LM head replaced
by a fresh scalar head, as the paper does) -> preference data -> megatron DDP, optimizer,
LR schedule -> loop over global batches of pairs, chosen and rejected in one forward,
reward read at each sequence's last token, loss ``-log sigma(r_c - r_r - margin)``
averaged over the pairs of the global batch -> held-out pair accuracy -> checkpoints
(resumable) and the final model.

Departures from the paper's setup: none in the loss; the tiny defaults use a larger
learning rate and batch suited to a 3M-parameter model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from megarlhf.config import ConfigError, ModelConfig, ParallelConfig, RuntimeConfig, check_layout, runtime_problems
from megarlhf.data.chat import ChatTemplateConfig
from megarlhf.data.dataset import DataConfig
from megarlhf.recipes.pairs_common import PairsTrainConfig
from megarlhf.train.roles import replica_share
from megarlhf.train.metrics import LogConfig

__all__ = ["RMConfig", "run", "evaluate_pairs", "eval_main"]


@dataclass(frozen=True)
class RMConfig:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: RuntimeConfig = field(default_factory=RuntimeConfig)
    """How the model runs (precision, layers, FP8, recomputation); unset fields keep the
    starting checkpoint's."""
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=128, max_prompt_length=96,
                                                                eval_size=200))
    """Preference pairs (``data.eval_size`` of them held out for pair accuracy)."""
    chat_template: ChatTemplateConfig = field(default_factory=ChatTemplateConfig)
    """How conversations are formatted: ``auto`` (default) is the starting checkpoint's own
    template; naming another is reported once at start."""
    train: PairsTrainConfig = field(default_factory=lambda: PairsTrainConfig(
        lr=1e-4, min_lr=1e-5, epochs=2.0, global_batch_size=32, micro_batch_size=8, out_dir="runs/rm"))
    margin: float = 0.0
    """Constant margin in the Bradley-Terry loss (0: the paper's plain loss)."""
    pooling: str = "last"
    """Where the reward is read: ``last`` (the last token; the paper's), ``min`` or
    ``mean`` over the response's tokens. Saved with the model; PPO and rm-eval use it."""
    log: LogConfig = field(default_factory=LogConfig)
    world: int = 1
    """Processes started when launched without torchrun/srun."""

    def world_size(self) -> int:
        return self.world

    def resolved_models(self) -> Dict[str, ModelConfig]:
        """The model this job builds: the starting checkpoint's, run as ``model`` says
        (reads the checkpoint's metadata; no process group needed)."""
        from megarlhf.models.checkpoint import read_meta

        return {"model": self.model.apply(read_meta(self.train.init_from).model)}

    def validate(self) -> None:
        from megarlhf.config import parallel_problems, range_problems
        from megarlhf.data.dataset import data_problems

        problems = runtime_problems(self.model) + parallel_problems(self.parallel)
        problems += self.train.problems() + data_problems(self.data)
        problems += range_problems(self, "", positive=("world",), finite=("margin",))
        problems += range_problems(self.log, "log", positive=("interval",))
        if problems:  # the checks below divide by these sizes
            raise ConfigError(problems)
        t = self.train
        if self.world % self.parallel.model_parallel_size:
            problems.append(f"world={self.world} is not divisible by TP x PP = "
                            f"{self.parallel.model_parallel_size}")
        dp = max(1, self.world // self.parallel.model_parallel_size)
        if t.global_batch_size % (dp * t.micro_batch_size):
            problems.append(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                            f"DP={dp} x train.micro_batch_size={t.micro_batch_size}")
        if t.seq_length < self.data.max_length:
            problems.append(f"train.seq_length={t.seq_length} is shorter than data.max_length="
                            f"{self.data.max_length}")
        from megarlhf.algos.preference import POOLINGS
        if self.pooling not in POOLINGS:
            problems.append(f"pooling={self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if not self.data.sources:
            problems.append("data.sources is empty: give preference pairs (e.g. from `megarlhf pairs`)")
        if problems:
            raise ConfigError(problems)


def reward_forward_step(mp, device, pooling: str = "last"):
    """megatron forward step: one reward per row (``pooling``), Bradley-Terry per pair.
    ``stats`` = [loss sum, pairs, correct, margin sum, reward sum, reward^2 sum]."""
    from megarlhf.algos.preference import bradley_terry_loss, pool_rewards, response_positions

    def forward_step(data_iter, model):
        b = next(data_iter).to(device)
        values = model(b.tokens, b.position_ids, attention_mask=None)

        def loss_fn(output, non_loss_data=False):
            resp = None if pooling == "last" else response_positions(b.loss_mask)
            r = pool_rewards(output[..., 0].float(), resp, b.last_index,
                             pooling)
            rc, rr = r[0::2], r[1::2]
            w = b.weights().float()
            loss = (bradley_terry_loss(rc, rr, 0.0 if b.margin is None else b.margin) * w).sum()
            n = w.sum().to(torch.int)
            w2 = w.repeat_interleave(2).double()
            stats = torch.stack([loss.detach().double(), w.double().sum(), ((rc > rr).double() * w).sum(),
                                 ((rc - rr).double() * w).sum().detach(), (r.double() * w2).sum().detach(),
                                 (r.double() ** 2 * w2).sum().detach()])
            if non_loss_data:
                keep = w > 0
                return {"stats": stats, "chosen": rc.detach()[keep], "rejected": rr.detach()[keep]}
            return loss, n, {"stats": stats}
        return values, loss_fn

    return forward_step


def _summary(stats: torch.Tensor) -> Dict[str, float]:
    loss, n, correct, margin, rsum, rsq = stats.tolist()
    mean = rsum / (2 * n)
    return {"loss": loss / n, "accuracy": correct / n, "margin": margin / n, "reward_mean": mean,
            "reward_std": max(rsq / (2 * n) - mean ** 2, 0.0) ** 0.5}


def evaluate_pairs(chunks, mp, ds, mbs: int, seq_length: int, pad_id: int, device,
                   subsets: bool = False, pooling: str = "last") -> Dict[str, float]:
    """Pair accuracy (and loss, margin) of a reward model on a tokenized pair dataset, split
    over data-parallel replicas; with ``subsets``, also the accuracy per ``subset``."""
    from megarlhf.models.llama import sequence_multiple_of
    from megarlhf.recipes.pairs_common import pair_microbatches, reduce_stats
    from megarlhf.train.step import forward_only

    n = len(ds)
    mine = list(replica_share(n, mp))
    micro, seq = pair_microbatches(ds, mine, mbs, seq_length, pad_id, multiple=sequence_multiple_of(chunks))
    step = reward_forward_step(mp, device, pooling)
    outs = forward_only(chunks, mp, step, micro, seq, 2 * mbs) if micro else []
    result = _summary(reduce_stats(outs, mp, device))
    if subsets:
        names = ds["subset"]
        groups = sorted({s for s in names if s is not None})
        correct = {g: 0.0 for g in groups}
        count = {g: 0.0 for g in groups}
        if outs:
            wins = torch.cat([(o["chosen"] > o["rejected"]).double() for o in outs]).tolist()
            for i, w in zip(mine, wins):
                if names[i] is not None:
                    correct[names[i]] += w
                    count[names[i]] += 1
        t = torch.tensor([[correct[g], count[g]] for g in groups] or [[0.0, 0.0]],
                         dtype=torch.float64, device=device)
        if mp.config.pp > 1:
            torch.distributed.all_reduce(t, group=mp.pp_group)
        torch.distributed.all_reduce(t, group=mp.dp_group)
        for g, (c, k) in zip(groups, t.tolist()):
            result[f"accuracy/{g}"] = c / k if k else float("nan")
    return result


def run(cfg: RMConfig) -> dict:
    from megarlhf import platform
    from megarlhf.data.dataset import build_dataset
    from megarlhf.data.sampler import ShardedSampler
    from megarlhf.models.checkpoint import read_meta, save_model
    from megarlhf.models.llama import build_model, check_row_length, describe
    from megarlhf.parallel import DistEnv, destroy, init_distributed, initialize_model_parallel
    from megarlhf.recipes.pairs_common import load_init, output_meta, pair_microbatches, reduce_stats, tokenizer_of
    from megarlhf.train.checkpoint import find_checkpoint, load_train_state, save_train_state
    from megarlhf.train.metrics import MetricsLog
    from megarlhf.train.optim import OptimConfig, build_optimizer, wrap_ddp
    from megarlhf.train.preemption import Preemption
    from megarlhf.train.schedule import build_scheduler
    from megarlhf.train.step import train_step
    from megarlhf.train.guard import BadSteps

    t = cfg.train
    preempt = Preemption(t.preemption)  # signal handlers first: a signal only sets a flag
    env = DistEnv.from_environ()
    init_distributed(env)
    plat = platform.current()
    mp = initialize_model_parallel(cfg.parallel, seed=t.seed)
    log = MetricsLog(t.out_dir, cfg.log, dataclasses.asdict(cfg))
    log.say(f"megarlhf rm: {env.world_size} process(es) on {plat.describe()}")

    # -- tokenizer, data, model ----------------------------------------------------------------
    init_meta = read_meta(t.init_from)
    tokenizer, template = tokenizer_of(init_meta, t.init_from, cfg.chat_template, log.say)
    data = build_dataset(cfg.data, "preference", template)
    for line in data.summary():
        log.say(f"data: {line}")
    model_cfg = cfg.model.apply(init_meta.model)
    check_layout(model_cfg, cfg.parallel, env.world_size)
    multiple = check_row_length(t.seq_length, model_cfg, cfg.parallel)
    chunks = build_model(model_cfg, mp, kind="reward")
    fresh = load_init(chunks, t.init_from, "reward", init_meta.kind)
    log.say(f"model: {describe(model_cfg, mp)}; reward head "
            f"{'initialised fresh' if fresh else 'loaded'} from {t.init_from}")
    for c in chunks:  # losses are sums over pairs; megatron divides by the global count
        c.config.calculate_per_token_loss = True
    use_dist_opt = t.distributed_optimizer and mp.dp_size > 1
    ddp = wrap_ddp(chunks, mp, use_dist_opt)
    optimizer = build_optimizer(ddp, OptimConfig(
        lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta2=t.adam_beta2,
        clip_grad=t.clip_grad, use_distributed_optimizer=use_dist_opt), mp)
    sampler = ShardedSampler(len(data.train), t.global_batch_size, mp.dp_rank, mp.dp_size, seed=t.seed)
    total_steps = t.max_steps or max(1, int(t.epochs * sampler.steps_per_epoch))
    scheduler = build_scheduler(optimizer, t.schedule, t.lr, t.min_lr, total_steps, t.weight_decay)
    meta = output_meta(model_cfg, "reward", tokenizer.path, template, init_meta, recipe="rm",
                       reward_pooling=cfg.pooling, init_from=os.path.abspath(t.init_from))

    # -- resume ------------------------------------------------------------------------------
    step, consumed = 0, 0
    ckpt = find_checkpoint(t.out_dir, t.resume)
    if ckpt:
        state = load_train_state(ckpt, chunks, optimizer, scheduler)
        step, consumed = state["step"], state["consumed_samples"]
        log.say(f"resumed from {ckpt} at step {step} ({consumed} pairs consumed)")
    log.say(f"training {total_steps} steps of {t.global_batch_size} pairs "
            f"({sampler.steps_per_epoch} per epoch)")

    # -- loop --------------------------------------------------------------------------------
    forward_step = reward_forward_step(mp, plat.device, cfg.pooling)
    batches = sampler.batches(consumed)
    guard = BadSteps(t.max_bad_steps)
    log.start_progress(total_steps, step)
    while step < total_steps:
        indices = next(batches)
        micro, seq = pair_microbatches(data.train, indices, t.micro_batch_size, t.seq_length,
                                       tokenizer.pad_id, margin=cfg.margin, multiple=multiple)
        t0 = time.time()
        res = train_step(ddp, optimizer, mp, forward_step, micro, seq, 2 * t.micro_batch_size)
        if res["applied"]:
            scheduler.step(1)
        guard.record(res["skipped"], step + 1, preempt)
        step += 1
        consumed += t.global_batch_size
        stats = _summary(reduce_stats(res["outputs"], mp, plat.device))
        tokens = sum(int((m.tokens != tokenizer.pad_id).sum()) for m in micro) * mp.dp_size
        dt = time.time() - t0
        log.log(step, {**stats, "lr": optimizer.param_groups[0]["lr"],
                       **({"skipped_steps": guard.total} if guard.total else {}),
                       "grad_norm": float(res["grad_norm"] or 0.0), "tokens_per_s": round(tokens / dt),
                       "step_s": round(dt, 3)})
        if data.eval is not None and t.eval_interval and step % t.eval_interval == 0:
            ev = evaluate_pairs(chunks, mp, data.eval, t.micro_batch_size, t.seq_length,
                                tokenizer.pad_id, plat.device, pooling=cfg.pooling)
            log.log(step, {f"eval_{k}": v for k, v in ev.items()})
        preempt.end_of_step(step, total_steps, t.save_interval, lambda: save_train_state(
            t.out_dir, step, chunks, optimizer, scheduler, {"consumed_samples": consumed}, meta,
            keep=t.keep_checkpoints), log)  # collective; a signal on any rank stops every rank
    log.close()

    result: Dict[str, object] = {"steps": step}
    if data.eval is not None:
        ev = evaluate_pairs(chunks, mp, data.eval, t.micro_batch_size, t.seq_length,
                            tokenizer.pad_id, plat.device, pooling=cfg.pooling)
        log.log(step, {f"eval_{k}": v for k, v in ev.items()}, echo=False)
        log.say(f"held-out pair accuracy {ev['accuracy']:.1%} on {len(data.eval)} pairs "
                f"(loss {ev['loss']:.4f}, margin {ev['margin']:.3f})")
        result["eval"] = ev
    save_train_state(t.out_dir, step, chunks, optimizer, scheduler, {"consumed_samples": consumed},
                     meta, keep=t.keep_checkpoints)
    final = os.path.join(t.out_dir, "final")
    save_model(chunks, final, dataclasses.replace(meta, extra={**meta.extra, "steps": step}))
    log.say(f"saved {final}")
    result["final"] = final
    destroy()
    return result


def eval_main(argv: List[str]) -> int:
    """``megarlhf rm-eval``: pair accuracy of a reward checkpoint on a preference file,
    per subset when rows carry one (RewardBench style)."""
    import argparse
    import json

    from megarlhf import platform
    from megarlhf.data.dataset import build_dataset
    from megarlhf.data.load import SourceConfig
    from megarlhf.models.checkpoint import load_model, read_meta
    from megarlhf.models.llama import build_model
    from megarlhf.parallel import DistEnv, destroy, init_distributed, initialize_model_parallel
    from megarlhf.recipes.pairs_common import tokenizer_of

    ap = argparse.ArgumentParser(prog="megarlhf rm-eval", description=eval_main.__doc__)
    ap.add_argument("--ckpt", required=True, help="reward model checkpoint")
    ap.add_argument("--data", required=True, help="preference pairs (JSONL/JSON/Parquet)")
    ap.add_argument("--schema", default="auto")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16, help="pairs per forward")
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    meta = read_meta(args.ckpt)
    if meta.kind != "reward":
        raise ValueError(f"{args.ckpt} is a {meta.kind} checkpoint, not a reward model")
    env = DistEnv.from_environ()
    par = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    check_layout(meta.model, par, env.world_size, prefix="--tp/--pp")
    init_distributed(env)
    mp = initialize_model_parallel(par)
    tokenizer, template = tokenizer_of(meta, args.ckpt)
    data = build_dataset(DataConfig(sources=[SourceConfig(path=args.data, schema=args.schema)],
                                    dedup=False, max_length=args.max_length,
                                    max_prompt_length=args.max_length), "preference", template)
    chunks = build_model(meta.model, mp, kind="reward")
    load_model(chunks, args.ckpt)
    seq = max(max(len(x) for x in data.train["chosen_ids"]), max(len(x) for x in data.train["rejected_ids"]))
    pooling = meta.extra.get("reward_pooling", "last")
    result = evaluate_pairs(chunks, mp, data.train, args.batch, seq, tokenizer.pad_id,
                            platform.current().device, subsets=True, pooling=pooling)
    result["pairs"] = len(data.train)
    result["pooling"] = pooling
    result["dropped"] = {s.name: dataclasses.asdict(s) for s in data.report.sources}
    if env.rank == 0:
        for line in data.summary():
            print(f"data: {line}")
        print(f"pair accuracy {result['accuracy']:.2%} on {len(data.train)} pairs")
        for k, v in sorted(result.items()):
            if k.startswith("accuracy/"):
                print(f"  {k[9:]}: {v:.2%}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    destroy()
    return 0

