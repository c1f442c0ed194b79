#!/usr/bin/env python
"""Plan a PPO job: memory per GPU of each role, the layouts that fit, predicted step time.

    python tools/plan.py --policy llama2-13b --reward llama2-70b --gpu h100-80g \\
        --gpus-per-node 8 [--nodes N] [--critic llama2-13b] [--rollouts 512 ...] [--json OUT]

Without ``--nodes`` it finds the fewest nodes on which some layout fits. The memory model
and every assumption are in megarlhf/perf/plan.py and printed with the result; the docs
(docs/performance.md) compare its predictions with measured runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megarlhf.config.model import PRESETS, preset  # noqa: E402
from megarlhf.perf.plan import GB, GPUS, Assumptions, Models, Workload, plan_ppo  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", required=True, choices=sorted(PRESETS), help="actor and reference")
    ap.add_argument("--reward", required=True, choices=sorted(PRESETS), help="the frozen scorer")
    ap.add_argument("--critic", choices=sorted(PRESETS), help="default: the policy's shape")
    ap.add_argument("--gpu", default="h100-80g", choices=sorted(GPUS))
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=0, help="0: the fewest that fit")
    ap.add_argument("--max-nodes", type=int, default=128)
    w, a = Workload(), Assumptions()
    ap.add_argument("--rollouts", type=int, default=w.rollouts, help="sequences per PPO step")
    ap.add_argument("--prompt-len", type=int, default=w.prompt_len)
    ap.add_argument("--response-len", type=int, default=w.response_len)
    ap.add_argument("--gen-batch", type=int, default=w.gen_batch,
                    help="sequences an actor replica decodes at once")
    ap.add_argument("--micro-batch", type=int, default=w.micro_batch)
    ap.add_argument("--minibatch", type=int, default=w.minibatch, help="sequences per optimizer step")
    ap.add_argument("--ppo-epochs", type=int, default=w.ppo_epochs)
    ap.add_argument("--mfu", type=float, default=a.mfu)
    ap.add_argument("--hbm-efficiency", type=float, default=a.hbm_efficiency)
    ap.add_argument("--comm-efficiency", type=float, default=a.comm_efficiency)
    ap.add_argument("--decode-overhead-ms", type=float, default=a.decode_overhead_ms)
    ap.add_argument("--attention", choices=["local", "fused"], default=a.attention)
    ap.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    ap.add_argument("--reserve-gb", type=float, default=a.reserve_gb)
    ap.add_argument("--top", type=int, default=8, help="candidates listed")
    ap.add_argument("--json", help="write the full result here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    models = Models(preset(args.policy), preset(args.critic or args.policy), preset(args.reward))
    work = Workload(args.rollouts, args.prompt_len, args.response_len, args.gen_batch, args.micro_batch,
                    args.minibatch, args.ppo_epochs)
    assume = Assumptions(mfu=args.mfu, hbm_efficiency=args.hbm_efficiency,
                         comm_efficiency=args.comm_efficiency, decode_overhead_ms=args.decode_overhead_ms,
                         attention=args.attention,
                         recompute=None if args.recompute == "none" else args.recompute,
                         distributed_optimizer=not args.no_distributed_optimizer,
                         reserve_gb=args.reserve_gb)
    gpu = GPUS[args.gpu]
    for name, value in (("--rollouts", work.rollouts), ("--minibatch", work.minibatch),
                        ("--micro-batch", work.micro_batch), ("--gen-batch", work.gen_batch)):
        if value <= 0:
            raise SystemExit(f"{name}={value}: must be positive")
    node_range = [args.nodes] if args.nodes else range(1, args.max_nodes + 1)
    cands, nodes = [], 0
    for n in node_range:
        cands = plan_ppo(models, gpu, n, args.gpus_per_node, work, assume)
        nodes = n
        if cands and cands[0].fits:
            break
    print(f"PPO: policy {args.policy}, critic {args.critic or args.policy}, reward {args.reward}; "
          f"{nodes} node(s) x {args.gpus_per_node} {gpu.name} (usable {gpu.memory_gb - assume.reserve_gb:.0f} "
          f"of {gpu.memory_gb:.0f} GB; {assume.reserve_gb:.0f} GB kept for CUDA/NCCL/fragmentation)")
    print(f"step: {work.rollouts} rollouts of {work.prompt_len}+{work.response_len} tokens, decoded "
          f"{work.gen_batch} at a time per replica; minibatch {work.minibatch}, micro-batch "
          f"{work.micro_batch}, {work.ppo_epochs} PPO epoch(s)")
    print("assumptions: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(assume).items()))
    if not cands or not cands[0].fits:
        print(f"nothing fits on {nodes} node(s)" + ("" if args.nodes else f" (searched up to {args.max_nodes})"))
    print()
    print(f"{'placement':30s} {'policy side':15s} {'reward model':15s} {'GB/GPU pol':>10s} "
          f"{'GB/GPU rm':>9s} {'fits':>4s} {'step s':>8s}  phases (s)")
    for c in cands[:args.top]:
        phases = " ".join(f"{k}={v:.1f}" for k, v in c.times.phases.items())
        print(f"{c.placement:30s} {str(c.policy):15s} {str(c.reward or '(colocated)'):15s} "
              f"{c.policy_peak_gb:10.1f} {c.reward_peak_gb:9.1f} {'yes' if c.fits else 'no':>4s} "
              f"{c.step_s:8.1f}  {phases}")
    if cands:
        best = cands[0]
        print(f"\nbest: {best.placement}, policy side {best.policy}, reward model "
              f"{best.reward or 'colocated'}: predicted {best.step_s:.1f} s per step")
        print("memory per GPU on the policy side (GB): " +
              ", ".join(f"{k[:-3]} {v:.1f}" for k, v in best.detail.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"nodes": nodes, "gpu": dataclasses.asdict(gpu), "workload": dataclasses.asdict(work),
                       "assumptions": dataclasses.asdict(assume),
                       "candidates": [{"placement": c.placement, "policy": dataclasses.asdict(c.policy),
                                       "reward": c.reward and dataclasses.asdict(c.reward),
                                       "policy_peak_gb": c.policy_peak_gb, "reward_peak_gb": c.reward_peak_gb,
                                       "fits": c.fits, "step_s": c.step_s, "phases_s": c.times.phases,
                                       "memory_gb": c.detail} for c in cands]}, f, indent=1)
        print(args.json)
    return 0 if cands and cands[0].fits else 1


if __name__ == "__main__":
    sys.exit(main())
