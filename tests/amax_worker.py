"""torchrun worker (2 processes): the FP8 amax-reduction group megatron's FP8 context
would use while a model runs forward, for models laid out apart from megatron's globals
(PPO roles), with and without megarlhf.parallel.scope_fp8_amax.

Mirrors megatron/core/fp8_utils.py ``get_fp8_context``: inside the decoder's forward it
asks ``parallel_state.get_amax_reduction_group(with_context_parallel=True,
tp_only_amax_red=...)`` and all-reduces over the group, as Transformer Engine's amax
reduction does when the FP8 autocast exits.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megarlhf.config import ParallelConfig, preset  # noqa: E402
from megarlhf.models.llama import build_model  # noqa: E402
from megarlhf.parallel import (build_layout, destroy, init_distributed, initialize_model_parallel,  # noqa: E402
                               scope_fp8_amax)


def probe(chunk, seen):
    from megatron.core import parallel_state

    def hook(module, args):  # where megatron's TransformerBlock enters its FP8 context
        for tp_only in (False, True):
            g = parallel_state.get_amax_reduction_group(with_context_parallel=True, tp_only_amax_red=tp_only)
            x = torch.ones(1)
            dist.all_reduce(x, group=g)
            seen.append({"tp_only": tp_only, "ranks": dist.get_process_group_ranks(g), "sum": x.item()})
    chunk.decoder.register_forward_pre_hook(hook)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scoped", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    init_distributed()
    initialize_model_parallel(ParallelConfig(), seed=1)  # one global layout over the job, as PPO
    me = dist.get_rank()
    # partitioned: a policy on rank 0, a scorer on rank 1; colocated: a TP=2 model on both
    apart = {"policy": build_layout(ParallelConfig(), 0, 1), "scorer": build_layout(ParallelConfig(), 1, 1)}
    shared = build_layout(ParallelConfig(tensor_model_parallel_size=2), 0, 2)
    cfg = preset("tiny", num_layers=2, vocab_size=256, max_position_embeddings=32)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    result = {}
    for name, mp in [(n, m) for n, m in apart.items() if m is not None] + [("shared", shared)]:
        chunk = build_model(cfg, mp)[0]
        if args.scoped:
            scope_fp8_amax(chunk, mp)
        seen = []
        probe(chunk, seen)
        with torch.no_grad():
            chunk(tokens, pos, attention_mask=None)
        from megatron.core import parallel_state

        restored = dist.get_process_group_ranks(parallel_state.get_amax_reduction_group(with_context_parallel=True))
        result[name] = {"seen": seen, "after": restored}
    with open(f"{args.out}.rank{me}.json", "w") as f:
        json.dump(result, f)
    destroy()


if __name__ == "__main__":
    main()
