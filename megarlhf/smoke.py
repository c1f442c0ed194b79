"""A smoke test of a layout: a Llama trained for a few steps at TP=2 on CPU or GPU.

    megarlhf smoke                      # spawns 2 processes (TP=2) itself
    megarlhf smoke parallel.pipeline_model_parallel_size=2   # TP=2 x PP=2 on 4 processes

It builds the tiny preset on megatron-core, trains it with megatron DDP, optimizer and
pipeline schedules on a learnable synthetic sequence task, saves a distributed
checkpoint, reloads it into a fresh model and checks the logits are unchanged, and prints
what each step did.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Dict

import torch

from megarlhf.config import ConfigError, ModelConfig, ParallelConfig, preset

__all__ = ["SmokeConfig", "run", "synthetic_batch"]


def _tiny() -> ModelConfig:
    return preset("tiny")


@dataclass(frozen=True)
class SmokeConfig:
    """The smoke job."""

    model: ModelConfig = field(default_factory=_tiny)
    """Model shape (default: the tiny preset, 4.9M parameters)."""
    parallel: ParallelConfig = field(
        default_factory=lambda: ParallelConfig(tensor_model_parallel_size=2))
    """Layout (default TP=2; the data-parallel size is what the processes leave)."""
    seed: int = 1234
    """Seed of weights and data."""
    steps: int = 20
    """Optimizer steps."""
    micro_batch_size: int = 4
    """Sequences per microbatch."""
    num_microbatches: int = 2
    """Microbatches per step on each data-parallel rank (gradient accumulation)."""
    seq_length: int = 64
    """Tokens per sequence."""
    lr: float = 1e-3
    """AdamW learning rate (constant)."""
    out_dir: str = "runs/smoke"
    """Where the checkpoint is written."""

    def world_size(self) -> int:
        return self.parallel.tp * self.parallel.pp

    def resolved_models(self) -> Dict[str, ModelConfig]:
        return {"model": self.model}

    def validate(self) -> None:
        from megarlhf.config import check_layout

        check_layout(self.model, self.parallel, self.world_size())
        if self.steps < 1 or self.micro_batch_size < 1 or self.num_microbatches < 1:
            raise ConfigError([f"steps={self.steps}, micro_batch_size={self.micro_batch_size} and "
                               f"num_microbatches={self.num_microbatches} must be >= 1"])
        if self.seq_length > self.model.max_position_embeddings:
            raise ConfigError([f"seq_length={self.seq_length} exceeds model.max_position_embeddings="
                               f"{self.model.max_position_embeddings}"])


def synthetic_batch(n: int, seq_length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, seq_length]`` rows counting up from a random start, ``a, a+1, a+2, ...`` over
    the first ``min(vocab, 512)`` ids: each token is predictable from the one before, so
    the loss falls visibly within a few steps."""
    span = min(vocab, 512)
    start = torch.randint(0, span, (n, 1), generator=generator)
    return (start + torch.arange(seq_length).unsqueeze(0)) % span


def run(cfg: SmokeConfig) -> dict:
    from megarlhf import platform
    from megarlhf.algos.logprobs import token_logprobs, vocab_start_of
    from megarlhf.config import check_layout
    from megarlhf.models.checkpoint import CheckpointMeta, load_model, save_model
    from megarlhf.models.llama import build_model, describe, padded_vocab
    from megarlhf.parallel import DistEnv, destroy, init_distributed, initialize_model_parallel
    from megarlhf.train.optim import OptimConfig, build_optimizer, wrap_ddp
    from megarlhf.train.step import forward_only, train_step

    env = DistEnv.from_environ()
    check_layout(cfg.model, cfg.parallel, env.world_size)
    init_distributed(env)
    plat = platform.current()
    mp = initialize_model_parallel(cfg.parallel, seed=cfg.seed)
    say = print if env.rank == 0 else (lambda *a, **k: None)
    say(f"megarlhf smoke: {env.world_size} process(es) ({env.source}) on {plat.describe()}")
    say(f"model: {describe(cfg.model, mp)}")

    chunks = build_model(cfg.model, mp)
    n_local = sum(p.numel() for c in chunks for p in c.parameters())
    say(f"rank 0 holds {n_local / 1e6:.2f}M parameters "
        f"({n_local / cfg.model.num_parameters(padded_vocab(cfg.model, mp.config.tp)):.0%} of the model)")
    ddp = wrap_ddp(chunks, mp)
    opt = build_optimizer(ddp, OptimConfig(lr=cfg.lr, clip_grad=1.0), mp)

    mbs, s = cfg.micro_batch_size, cfg.seq_length
    positions = torch.arange(s, device=plat.device).unsqueeze(0).expand(mbs, -1)
    vstart = vocab_start_of(mp.tp_rank, padded_vocab(cfg.model, mp.config.tp), mp.config.tp)
    # Every DP rank draws its own data; TP/PP ranks of one replica draw the same.
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * mp.dp_rank)

    def forward_step(data_iter, model):
        tokens = next(data_iter).to(plat.device)
        logits = model(tokens, positions, attention_mask=None)

        def loss_fn(output, non_loss_data=False):
            lp = token_logprobs(output[:, :-1], tokens[:, 1:], mp.tp_group, vstart)
            loss = -lp.mean()
            return loss, {"loss": loss.detach().clone()}
        return logits, loss_fn

    losses = []
    tokens_per_step = mbs * s * cfg.num_microbatches * mp.dp_size
    for step in range(1, cfg.steps + 1):
        batch = synthetic_batch(mbs * cfg.num_microbatches, s, cfg.model.vocab_size, gen)
        microbatches = list(batch.split(mbs))
        t0 = time.perf_counter()
        res = train_step(ddp, opt, mp, forward_step, microbatches, s, mbs)
        plat.synchronize()
        dt = time.perf_counter() - t0
        loss = torch.tensor(0.0, device=plat.device)
        if mp.is_last_stage:
            loss = torch.stack([o["loss"] for o in res["outputs"]]).mean()
        # The loss lives on the last pipeline stage; share it for printing.
        torch.distributed.all_reduce(loss, group=mp.pp_group)
        torch.distributed.all_reduce(loss, group=mp.dp_group)
        loss = loss.item() / mp.dp_size
        losses.append(loss)
        say(f"step {step:3d}  loss {loss:7.4f}  grad-norm {float(res['grad_norm']):7.4f}  "
            f"{dt * 1000:7.1f} ms  {tokens_per_step / dt:8.0f} tokens/s")

    ckpt = os.path.join(cfg.out_dir, "checkpoint")
    save_model(chunks, ckpt, CheckpointMeta(model=cfg.model, kind="causal",
                                            extra={"recipe": "demo", "steps": cfg.steps}))
    say(f"saved a megatron distributed checkpoint to {ckpt} (loadable at any TP x PP)")

    # Reload into a fresh model and check that it computes the same logits.
    probe = [synthetic_batch(mbs, s, cfg.model.vocab_size, torch.Generator().manual_seed(7))]

    def logits_step(data_iter, model):
        tokens = next(data_iter).to(plat.device)
        out = model(tokens, positions, attention_mask=None)
        return out, lambda output, non_loss_data=True: output.float()

    before = forward_only(chunks, mp, logits_step, probe, s, mbs)
    fresh = build_model(cfg.model, mp)
    load_model(fresh, ckpt)
    after = forward_only(fresh, mp, logits_step, probe, s, mbs)
    diff = torch.tensor(0.0, device=plat.device)
    if mp.is_last_stage:
        diff = (before[0] - after[0]).abs().max()
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    say(f"reloaded the checkpoint into a fresh model: max |logit difference| = {diff.item():.2e}")
    say(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {cfg.steps} steps")
    result = {"losses": losses, "reload_max_abs_diff": diff.item(), "checkpoint": ckpt,
              "config": dataclasses.asdict(cfg)}
    destroy()
    return result
