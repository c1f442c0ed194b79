"""torchrun worker: train N steps saving at step K, or resume from step K and finish;
the final weights (and optimizer state) are written for comparison."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megarlhf.config import ParallelConfig, preset  # noqa: E402
from megarlhf.data.batch import pad_examples  # noqa: E402
from megarlhf.models.checkpoint import CheckpointMeta, _bare  # noqa: E402
from megarlhf.models.llama import build_model  # noqa: E402
from megarlhf.parallel import destroy, init_distributed, initialize_model_parallel  # noqa: E402
from megarlhf.recipes.common import lm_forward_step  # noqa: E402
from megarlhf.train.checkpoint import find_checkpoint, load_train_state, save_train_state  # noqa: E402
from megarlhf.train.optim import OptimConfig, build_optimizer, wrap_ddp  # noqa: E402
from megarlhf.train.schedule import ScheduleConfig, build_scheduler  # noqa: E402
from megarlhf.train.step import train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--save-at", type=int, default=3)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dist-opt", action="store_true")
    ap.add_argument("--fused-adam", action="store_true",
                    help="megatron builds a mirror of Transformer Engine's FusedAdam")
    args = ap.parse_args()
    if args.fused_adam:
        from tests.train import fused_adam_mirror

        fused_adam_mirror.install()
    torch.set_num_threads(1)
    init_distributed()
    mp = initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=args.tp), seed=5)
    cfg = preset("tiny", vocab_size=300, num_layers=2, max_position_embeddings=64,
                 params_dtype=args.dtype)
    chunks = build_model(cfg, mp)
    for c in chunks:
        c.config.calculate_per_token_loss = True
    ddp = wrap_ddp(chunks, mp, args.dist_opt)
    opt = build_optimizer(ddp, OptimConfig(lr=3e-3, weight_decay=0.1, use_distributed_optimizer=args.dist_opt), mp)
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=2), 3e-3, 1e-4, args.steps, 0.1)
    fwd = lm_forward_step(mp, cfg, torch.device("cpu"))
    start = 0
    if args.resume:
        ckpt = find_checkpoint(args.out, "auto")
        state = load_train_state(ckpt, chunks, opt, sched)
        start = state["step"]
        assert state["consumed"] == start * 4
    for step in range(start + 1, args.steps + 1):
        g = torch.Generator().manual_seed(1000 * step + mp.dp_rank)  # data depends on step only
        ex = [(torch.randint(3, 300, (20,), generator=g).tolist(), [True] * 20) for _ in range(2)]
        batch = pad_examples(ex, 24, 0)
        train_step(ddp, opt, mp, fwd, [batch], 24, 2)
        sched.step(1)
        if step == args.save_at and not args.resume:
            save_train_state(args.out, step, chunks, opt, sched, {"consumed": step * 4},
                             CheckpointMeta(model=cfg), keep=1)
    weights = {n: p.detach().clone() for n, p in _bare(chunks[0]).named_parameters()}
    torch.save({"weights": weights, "lr": opt.param_groups[0]["lr"]},
               os.path.join(args.out, f"final_{'resumed' if args.resume else 'full'}_rank{torch.distributed.get_rank()}.pt"))
    destroy()


if __name__ == "__main__":
    main()
