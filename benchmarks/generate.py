"""Generation speed: megarlhf's KV-cached engine against transformers ``generate``.

    python benchmarks/generate.py --layers 4 --hidden 256 --heads 8 --kv-heads 2 --ffn 688 \
        --vocab 4096 --batch 16 --prompt-len 32 --new-tokens 64

Random weights, one process. Both sample at temperature 1 with no stop token, so every
row yields exactly ``--new-tokens`` tokens. The two are timed alternately in the same
process (this machine is shared and noisy) and the medians are compared. The last line
printed is one JSON object: ``tokens_per_s`` (generated tokens per second, megarlhf),
``peak_rss_mb``, and the transformers figures and ratio when transformers is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--profile", action="store_true", help="print where megarlhf's time goes")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from megarlhf.config import ModelConfig, ParallelConfig
    from megarlhf.models.llama import build_model
    from megarlhf.parallel import init_single_process, initialize_model_parallel
    from megarlhf.rollout.engine import MegatronEngine, SamplingParams

    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                      num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                      vocab_size=args.vocab, max_position_embeddings=args.prompt_len + args.new_tokens,
                      params_dtype=args.dtype)
    init_single_process()
    mp = initialize_model_parallel(ParallelConfig(), seed=0)
    chunks = build_model(cfg, mp)
    engine = MegatronEngine(chunks, mp, cfg.vocab_size, max_batch=args.batch)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=g)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=1)
    n_tokens = args.batch * args.new_tokens

    def run_ours() -> float:
        t0 = time.perf_counter()
        out = engine.generate(prompts.tolist(), params)
        dt = time.perf_counter() - t0
        assert sum(len(r) for r in out.response_ids) == n_tokens
        return dt

    hf = None
    if not args.no_hf:
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError:
            print("transformers is not installed: no baseline", file=sys.stderr)
        else:
            hcfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                               intermediate_size=args.ffn, num_hidden_layers=args.layers,
                               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                               max_position_embeddings=args.prompt_len + args.new_tokens)
            hf = LlamaForCausalLM(hcfg).eval().to(getattr(torch, args.dtype))

    def run_hf() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(prompts, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              use_cache=True, pad_token_id=0)
        dt = time.perf_counter() - t0
        assert out.shape == (args.batch, args.prompt_len + args.new_tokens)
        return dt

    run_ours()  # warm-up
    if hf is not None:
        run_hf()
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(run_ours())
        if hf is not None:
            theirs.append(run_hf())
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_ours()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    result = {
        "tokens_per_s": round(n_tokens / statistics.median(ours), 1),
        "seconds": round(statistics.median(ours), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "layers": args.layers, "hidden": args.hidden, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "repeats": args.repeats,
    }
    if theirs:
        result["hf_tokens_per_s"] = round(n_tokens / statistics.median(theirs), 1)
        result["speedup_vs_hf"] = round(statistics.median(theirs) / statistics.median(ours), 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
