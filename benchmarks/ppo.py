"""PPO step benchmark: time per phase and per step, tokens/s, peak RSS.

    python benchmarks/ppo.py --layers 4 --hidden 256 --heads 8 --kv-heads 2 --ffn 688 \
        --vocab 4096 --prompts 64 --max-new-tokens 48 --minibatch 16 --steps 6 [--dtype bfloat16]

Runs the real recipe (``megarlhf.recipes.ppo.run``) in one process on the built-in task's
prompts, with randomly initialised policy and reward models of the given shape (speed
does not depend on what the weights know; response lengths do, so the generation budget
is fixed by ``--max-new-tokens`` and reported). The first step is a warm-up and is not
counted. Prints one JSON line last: medians of each phase, step time, the padding
fraction of each phase over rollout rows (``--pack``: packed rows), generated and
processed tokens/s, peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=64, help="prompts per step")
    ap.add_argument("--samples", type=int, default=1, help="responses per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--minibatch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--pack", action="store_true", help="train.packing=true: rollout rows packed end to end")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    return ap.parse_args()


def make_checkpoints(args, root: str):
    """A causal policy and a reward model of the given shape, random weights, with the
    built-in tokenizer recorded; and the task's prompt file."""
    from megarlhf.config import ModelConfig, ParallelConfig
    from megarlhf.data.builtin import prepare_builtin_task
    from megarlhf.data.task import TaskConfig
    from megarlhf.models.checkpoint import CheckpointMeta, save_model
    from megarlhf.models.llama import build_model
    from megarlhf.parallel import destroy, init_single_process, initialize_model_parallel

    files = prepare_builtin_task(os.path.join(root, "task"), TaskConfig(
        num_sft=64, num_preference=16, num_prompts=max(args.prompts * args.steps, 64), num_eval=16))
    from megarlhf.data.tokenizer import load_tokenizer

    vocab = max(load_tokenizer(files["tokenizer"]).vocab_size, args.vocab)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                      num_attention_heads=args.heads, num_query_groups=args.kv_heads, vocab_size=vocab,
                      max_position_embeddings=256, params_dtype=args.dtype)
    init_single_process()
    mp = initialize_model_parallel(ParallelConfig(), seed=0)
    out = {}
    for kind in ("causal", "reward"):
        path = os.path.join(root, kind)
        save_model(build_model(cfg, mp, kind=kind), path, CheckpointMeta(
            model=cfg, kind=kind, tokenizer=os.path.abspath(files["tokenizer"]), chat_template="tulu"))
        out[kind] = path
    destroy()
    return out, files


def main() -> int:
    args = parse_args()
    import torch

    from megarlhf.data.dataset import DataConfig
    from megarlhf.data.load import SourceConfig
    from megarlhf.recipes.ppo import PPOConfig, PPOLossConfig, PPOTrainConfig, RoleConfig, RolloutConfig, run
    from megarlhf.train.metrics import LogConfig

    root = tempfile.mkdtemp(prefix="megarlhf-bench-ppo-")
    ckpts, files = make_checkpoints(args, root)
    cfg = PPOConfig(
        actor=RoleConfig(init_from=ckpts["causal"]), critic=RoleConfig(init_from=ckpts["reward"]),
        reward=RoleConfig(init_from=ckpts["reward"]),
        data=DataConfig(sources=[SourceConfig(path=files["prompts"])], max_length=128, max_prompt_length=128),
        rollout=RolloutConfig(prompts_per_step=args.prompts, samples_per_prompt=args.samples,
                              max_new_tokens=args.max_new_tokens, temperature=1.0,
                              max_batch=args.prompts * args.samples),
        ppo=PPOLossConfig(minibatch_size=args.minibatch),
        train=PPOTrainConfig(max_steps=args.steps, micro_batch_size=args.micro_batch, actor_lr=1e-5,
                             critic_lr=1e-5, out_dir=os.path.join(root, "run"), resume="never",
                             packing=args.pack),
        log=LogConfig(progress_bar=False, interval=1000))
    cfg.validate()
    threads = torch.get_num_threads()
    res = run(cfg)
    rows = res["history"][1:] or res["history"]
    phases = [k for k in rows[0] if k.startswith("time/")]
    out = {
        "benchmark": "ppo_step", "shape": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "kv_heads",
                                                                            "ffn", "vocab")},
        "dtype": args.dtype, "threads": threads, "prompts_per_step": args.prompts,
        "samples_per_prompt": args.samples, "max_new_tokens": args.max_new_tokens,
        "minibatch": args.minibatch, "steps_counted": len(rows),
        **{f"{k.split('/')[1]}_s": round(statistics.median(r[k] for r in rows), 4) for k in phases},
        **{f"padding_{k.split('/')[1]}": round(statistics.median(r[k] for r in rows), 4)
           for k in rows[0] if k.startswith("padding/")},
        "pack": args.pack,
        "response_length": round(statistics.mean(r["response_length"] for r in rows), 2),
        "generate_tokens_per_s": round(statistics.median(r["tokens_per_s/generate"] for r in rows)),
        "tokens_per_s": round(statistics.median(r["tokens_per_s/step"] for r in rows)),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
