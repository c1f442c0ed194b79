#!/usr/bin/env python
"""Plan a PPO job: memory per GPU of each role, the layouts that fit, predicted step time.

    python tools/plan.py --policy llama2-13b --reward llama2-70b --gpu h100-80g \\
        --gpus-per-node 8 [--nodes N] [--critic llama2-13b] [--rollouts 512 ...] \\
        [--attention fused] [--fp8 actor,reference,critic] [--json OUT]

Without ``--nodes`` it finds the fewest nodes on which some layout fits. The memory model
and every assumption are in megarlhf/perf/plan.py and printed with the result; the docs
(docs/performance.md) compare its predictions with measured runs. The flagship job
(examples/ppo_13b_70b_rm.yaml: Transformer Engine layers, FP8 actor, reference and
critic, bf16 reward model):

    python tools/plan.py --policy llama2-13b --reward llama2-70b --nodes 3 \\
        --attention fused --fp8 actor,reference,critic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megarlhf.config.model import PRESETS, preset  # noqa: E402
from megarlhf.perf.plan import (GB, GPUS, ROLES, Assumptions, Models, Precision, Workload,  # noqa: E402
                                plan_ppo)


def allreduce_gbs(nbytes: int = 32 << 20, procs: int = 2, reps: int = 5) -> float:
    """Measured all-reduce bus bandwidth (GB/s) of ``procs`` local gloo processes."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = 29000 + os.getpid() % 1000
    workers = [ctx.Process(target=_allreduce_worker, args=(r, procs, port, nbytes, reps, queue))
               for r in range(procs)]
    for w in workers:
        w.start()
    seconds = queue.get()
    for w in workers:
        w.join()
    return 2 * (procs - 1) / procs * nbytes / seconds / 1e9


def _allreduce_worker(rank, world, port, nbytes, reps, queue):
    import time

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x = torch.ones(nbytes // 4)
    dist.all_reduce(x)
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        queue.put(sorted(times)[len(times) // 2])
    dist.destroy_process_group()


def validate(path: str, link_gbs: float) -> int:
    """Predicted against measured step times of a training sweep (tools/benchmark_scaling.py)."""
    import dataclasses as dc

    from megarlhf.config.model import ModelConfig
    from megarlhf.perf.plan import predict_sweep

    sweep = json.load(open(path))
    fields = {f.name for f in dc.fields(ModelConfig)}
    shape = dict(PRESETS[sweep["preset"]])
    shape.update({k: v for k, v in (sweep.get("model_overrides") or {}).items() if k in fields})
    shape.update({k: v for k, v in sweep["args"].items() if k in fields and v is not None})
    cfg = ModelConfig(**{k: v for k, v in shape.items() if k in fields})
    if not link_gbs:
        link_gbs = allreduce_gbs()
        print(f"measured gloo all-reduce bus bandwidth: {link_gbs:.2f} GB/s (2 processes, 32 MB)")
    peak = sweep["probe"]["tflops"]
    rows = predict_sweep(sweep["rows"], cfg, peak, link_gbs)
    print(f"{sweep['phase']} step, {cfg.num_parameters() / 1e6:.1f}M parameters; device peak "
          f"{peak:.3f} TFLOP/s ({sweep['mfu_basis']}); MFU fitted on the smallest layout: "
          f"{rows[0]['fitted_mfu']:.3f}" if rows else "no measured rows")
    print(f"{'layout':12s} {'devices':>7s} {'measured s':>10s} {'predicted s':>11s} {'ratio':>6s}  "
          "compute / tp / dp (s)")
    for r in rows:
        print(f"{r['layout']:12s} {r['devices']:7d} {r['measured_s']:10.3f} {r['predicted_s']:11.3f} "
              f"{r['ratio']:6.2f}  {r['compute']:.3f} / {r['tp_comm']:.3f} / {r['dp_comm']:.3f}")
    return 0


def _fp8_roles(text: str) -> Precision:
    roles = [r.strip() for r in text.split(",") if r.strip() and r.strip() != "none"]
    try:
        return Precision.with_fp8(roles)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="the flagship (docs/slurm.md; TE layers, FP8 actor, reference and critic, bf16 reward "
        "model):\n  python tools/plan.py --policy llama2-13b --reward llama2-70b --nodes 3 "
        "--attention fused --fp8 actor,reference,critic")
    ap.add_argument("--validate", metavar="SWEEP_JSON",
                    help="compare the planner with a measured training sweep and exit")
    ap.add_argument("--link-gbs", type=float, default=0.0,
                    help="with --validate: all-reduce bandwidth (GB/s); 0 measures gloo here")
    ap.add_argument("--policy", choices=sorted(PRESETS), help="actor and reference")
    ap.add_argument("--reward", choices=sorted(PRESETS), help="the frozen scorer")
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
    ap.add_argument("--mfu", type=float, default=a.mfu, help="share of the bf16 peak reached")
    ap.add_argument("--fp8", type=_fp8_roles, default=Precision(), metavar="ROLES",
                    help=f"roles whose Transformer Engine layers run FP8 (delayed scaling, bf16 "
                    f"parameters), comma-separated from {','.join(ROLES)}; default none (all "
                    "bf16). FP8 adds a cached FP8 copy of each layer weight (2 B per GEMM "
                    "parameter for actor and critic: data + transpose; 1 B for a frozen role), "
                    "shrinks some saved activations, and runs the layers' GEMMs at --fp8-mfu of "
                    "the FP8 peak. Generation is bf16 whatever is set here")
    ap.add_argument("--fp8-mfu", type=float, default=a.fp8_mfu,
                    help="share of the FP8 peak that the GEMMs of FP8 layers reach")
    ap.add_argument("--hbm-efficiency", type=float, default=a.hbm_efficiency)
    ap.add_argument("--comm-efficiency", type=float, default=a.comm_efficiency)
    ap.add_argument("--decode-overhead-ms", type=float, default=a.decode_overhead_ms)
    ap.add_argument("--attention", choices=["local", "fused"], default=a.attention,
                    help="local: megatron's attention keeps the score matrices; fused: flash or "
                    "Transformer Engine attention (what TE layers, and so FP8 roles, use)")
    ap.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    ap.add_argument("--reserve-gb", type=float, default=a.reserve_gb)
    ap.add_argument("--top", type=int, default=8, help="candidates listed")
    ap.add_argument("--json", help="write the full result here")
    return ap.parse_args(argv)


_COLUMNS = (("weights", "weights"), ("fp8_weights", "fp8 copies"), ("fp8_meta", "fp8 meta"),
            ("gradients", "gradients"), ("optimizer", "optimizer"), ("resident", "resident"),
            ("activations", "activations"), ("kv_cache", "kv cache"), ("forward", "forward"))


def print_memory(c, precision: Precision) -> None:
    """Each role's terms (GB per GPU) of candidate ``c``: the rows of docs/slurm.md's table."""
    print("memory per GPU of the best candidate (GB); activations include the micro-batch's fp32 "
          "logits, forward is a frozen role's working set:")
    print(f"{'role':10s} {'precision':9s} {'layout':12s} " + " ".join(f"{t:>11s}" for _, t in _COLUMNS))
    for role in ("actor", "critic", "reference", "reward"):
        mem = c.memory[role]
        lay = c.reward if role == "reward" and c.reward else c.policy
        print(f"{role:10s} {getattr(precision, role):9s} {str(lay):12s} "
              + " ".join(f"{getattr(mem, k) / GB:11.3f}" for k, _ in _COLUMNS))
    resident = sum(c.memory[r].resident for r in ("actor", "critic", "reference")) / GB
    print(f"policy side: resident {resident:.2f} + {c.peak_phase} "
          f"{c.policy_peak_gb - resident - (c.detail['reward_gb'] if c.reward is None else 0):.2f}"
          + (f" + reward model {c.detail['reward_gb']:.2f}" if c.reward is None else "")
          + f" = peak {c.policy_peak_gb:.2f}; reward model: {c.reward_peak_gb:.2f}"
          + ("" if c.reward else " (colocated)"))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.validate:
        return validate(args.validate, args.link_gbs)
    if not args.policy or not args.reward:
        raise SystemExit("--policy and --reward are required (or --validate SWEEP_JSON)")
    models = Models(preset(args.policy), preset(args.critic or args.policy), preset(args.reward))
    work = Workload(args.rollouts, args.prompt_len, args.response_len, args.gen_batch, args.micro_batch,
                    args.minibatch, args.ppo_epochs)
    assume = Assumptions(mfu=args.mfu, fp8_mfu=args.fp8_mfu, hbm_efficiency=args.hbm_efficiency,
                         comm_efficiency=args.comm_efficiency, decode_overhead_ms=args.decode_overhead_ms,
                         attention=args.attention,
                         recompute=None if args.recompute == "none" else args.recompute,
                         distributed_optimizer=not args.no_distributed_optimizer,
                         reserve_gb=args.reserve_gb)
    gpu = GPUS[args.gpu]
    precision = args.fp8
    if precision.any_fp8 and gpu.fp8_tflops is None:
        raise SystemExit(f"--fp8: {gpu.name} has no FP8 tensor cores")
    for name, value in (("--rollouts", work.rollouts), ("--minibatch", work.minibatch),
                        ("--micro-batch", work.micro_batch), ("--gen-batch", work.gen_batch)):
        if value <= 0:
            raise SystemExit(f"{name}={value}: must be positive")
    node_range = [args.nodes] if args.nodes else range(1, args.max_nodes + 1)
    cands, nodes = [], 0
    for n in node_range:
        cands = plan_ppo(models, gpu, n, args.gpus_per_node, work, assume, precision)
        nodes = n
        if cands and cands[0].fits:
            break
    print(f"PPO: policy {args.policy}, critic {args.critic or args.policy}, reward {args.reward}; "
          f"{nodes} node(s) x {args.gpus_per_node} {gpu.name} (usable {gpu.memory_gb - assume.reserve_gb:.0f} "
          f"of {gpu.memory_gb:.0f} GB; {assume.reserve_gb:.0f} GB kept for CUDA/NCCL/fragmentation)")
    print(f"step: {work.rollouts} rollouts of {work.prompt_len}+{work.response_len} tokens, decoded "
          f"{work.gen_batch} at a time per replica; minibatch {work.minibatch}, micro-batch "
          f"{work.micro_batch}, {work.ppo_epochs} PPO epoch(s)")
    print(f"precision: {precision}")
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
        print()
        print_memory(best, precision)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"nodes": nodes, "gpu": dataclasses.asdict(gpu), "workload": dataclasses.asdict(work),
                       "assumptions": dataclasses.asdict(assume), "precision": dataclasses.asdict(precision),
                       "candidates": [{"placement": c.placement, "policy": dataclasses.asdict(c.policy),
                                       "reward": c.reward and dataclasses.asdict(c.reward),
                                       "policy_peak_gb": c.policy_peak_gb, "reward_peak_gb": c.reward_peak_gb,
                                       "fits": c.fits, "step_s": c.step_s, "phases_s": c.times.phases,
                                       "memory_gb": c.detail, "peak_phase": c.peak_phase,
                                       "roles_gb": {r: {k: v / GB for k, v in dataclasses.asdict(mem).items()}
                                                    for r, mem in c.memory.items()}}
                                      for c in cands]}, f, indent=1)
        print(args.json)
    return 0 if cands and cands[0].fits else 1


if __name__ == "__main__":
    sys.exit(main())
