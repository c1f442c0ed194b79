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
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from megarlhf.config import ConfigError, ParallelConfig, check_layout
from megarlhf.data.dataset import DataConfig
from megarlhf.recipes.pairs_common import PairsJobConfig, PairsTrainConfig, pair_job_problems
from megarlhf.train.roles import replica_share

__all__ = ["RMConfig", "run", "evaluate_pairs", "eval_main"]


@dataclass(frozen=True)
class RMConfig(PairsJobConfig):
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=128, max_prompt_length=96,
                                                                eval_size=200))
    """Preference pairs (``data.eval_size`` of them held out for pair accuracy)."""
    train: PairsTrainConfig = field(default_factory=lambda: PairsTrainConfig(
        lr=1e-4, min_lr=1e-5, epochs=2.0, global_batch_size=32, micro_batch_size=8, out_dir="runs/rm"))
    margin: float = 0.0
    """Constant margin in the Bradley-Terry loss (0: the paper's plain loss)."""
    pooling: str = "last"
    """Where the reward is read: ``last`` (the last token; the paper's), ``min`` or
    ``mean`` over the response's tokens. Saved with the model; PPO and rm-eval use it."""

    def validate(self) -> None:
        from megarlhf.algos.preference import POOLINGS

        problems = pair_job_problems(self, finite=("margin",))
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
        values = model(b.tokens, b.position_ids, attention_mask=b.attention_mask,
                       packed_seq_params=b.packed_seq_params)

        def loss_fn(output, non_loss_data=False):
            resp = None if pooling == "last" else response_positions(b.seqwise(b.loss_mask))
            r = pool_rewards(b.seqwise(output[..., 0].float()), resp, b.last_index, pooling)
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
    from megarlhf.recipes.pairs_common import pair_microbatches
    from megarlhf.train.step import reduce_stats
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
    from megarlhf.data.sampler import ShardedSampler
    from megarlhf.models.checkpoint import save_model
    from megarlhf.models.llama import describe
    from megarlhf.parallel import destroy
    from megarlhf.recipes.pairs_common import micro_rows, output_meta, pair_microbatches, set_up_pairs
    from megarlhf.train.step import reduce_stats
    from megarlhf.train.job import make_trainable, resume, save_state, start_run, total_steps_of

    t = cfg.train
    run_ = start_run("rm", cfg, cfg.parallel)
    mp, log, dev = run_.mp, run_.log, run_.device

    # -- tokenizer, data, model ----------------------------------------------------------------
    su = set_up_pairs(cfg, run_, "reward")
    tokenizer, data, chunks, model_cfg, multiple = su.tokenizer, su.data, su.chunks, su.model_cfg, su.multiple
    log.say(f"model: {describe(model_cfg, mp)}; reward head "
            f"{'initialised fresh' if su.fresh_head else 'loaded'} from {t.init_from}")
    sampler = ShardedSampler(len(data.train), t.global_batch_size, mp.dp_rank, mp.dp_size, seed=t.seed)
    total_steps = total_steps_of(t, sampler.steps_per_epoch)
    tr = make_trainable(chunks, mp, t, t.lr, t.min_lr, total_steps, t.distributed_optimizer)
    meta = output_meta(model_cfg, "reward", tokenizer.path, su.template, su.init_meta, recipe="rm",
                       reward_pooling=cfg.pooling, init_from=os.path.abspath(t.init_from))
    step, consumed = resume(run_, t, chunks, tr, "pairs")
    log.say(f"training {total_steps} steps of {t.global_batch_size} pairs "
            f"({sampler.steps_per_epoch} per epoch)")

    def evaluate(at_step: int, echo: bool = True) -> Dict[str, float]:
        ev = evaluate_pairs(chunks, mp, data.eval, t.micro_batch_size, t.seq_length, tokenizer.pad_id, dev,
                            pooling=cfg.pooling)
        log.log(at_step, {f"eval_{k}": v for k, v in ev.items()}, echo=echo)
        return ev

    # -- loop --------------------------------------------------------------------------------
    forward_step = reward_forward_step(mp, dev, cfg.pooling)
    batches = sampler.batches(consumed)
    log.start_progress(total_steps, step)
    while step < total_steps:
        micro, seq = pair_microbatches(data.train, next(batches), t.micro_batch_size, t.seq_length,
                                       tokenizer.pad_id, margin=cfg.margin, multiple=multiple,
                                       packing=t.packing, trim=mp.config.pp == 1)
        step += 1
        res = tr.step(mp, forward_step, micro, seq, micro_rows(micro, t.micro_batch_size), step, run_.preempt)
        consumed += t.global_batch_size
        tokens = sum(int((m.tokens != tokenizer.pad_id).sum()) for m in micro) * mp.dp_size
        log.log(step, {**_summary(reduce_stats(res["outputs"], mp, dev)), **tr.record(res, tokens)})
        if data.eval is not None and t.eval_interval and step % t.eval_interval == 0 and step < total_steps:
            evaluate(step)
        run_.preempt.end_of_step(step, total_steps, t.save_interval, lambda: save_state(
            t, step, consumed, chunks, tr, meta), log)  # collective; a signal on any rank stops every rank

    result: Dict[str, object] = {"steps": step}
    if data.eval is not None:
        ev = result["eval"] = evaluate(step, echo=False)
        log.say(f"held-out pair accuracy {ev['accuracy']:.1%} on {len(data.eval)} pairs "
                f"(loss {ev['loss']:.4f}, margin {ev['margin']:.3f})")
    save_state(t, step, consumed, chunks, tr, meta)
    result["final"] = os.path.join(t.out_dir, "final")
    save_model(chunks, result["final"], dataclasses.replace(meta, extra={**meta.extra, "steps": step}))
    log.say(f"saved {result['final']}")
    log.close()
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

