"""Generation speed: megarlhf's continuously batched engine against transformers ``generate``.

    python benchmarks/generate.py --layers 4 --hidden 256 --heads 8 --kv-heads 2 --ffn 688 \\
        --vocab 4096 --batch 16 --prompt-len 32 --new-tokens 64
    python benchmarks/generate.py --num-prompts 256 --batch 64 --prompt-len-range 8:96 \\
        --new-tokens 128 --eos-rate 0.03

Random weights, one process, the same weights in both. Prompts are random ids of
``--prompt-len`` tokens, or of lengths drawn uniformly from ``--prompt-len-range A:B``.
Both sample at temperature 1. ``--eos-rate R`` ends responses early by one rule for both
engines: a table drawn once from ``--seed`` says, for each prompt and response position,
whether the response ends there with EOS (probability R each), and a logits processor
makes EOS the only choice at those positions; otherwise EOS is never chosen and every
response has ``--new-tokens`` tokens. megarlhf holds ``--batch`` sequences in its slots;
transformers runs the prompts in batches of ``--batch`` (left-padded). The two are timed
alternately in the same process (this machine is shared and noisy), medians compared.

The last line printed is one JSON object: ``tokens_per_s`` (generated tokens per second,
megarlhf: response tokens, EOS included), ``prefill_tokens_per_s`` (prompt tokens per
second of prefill passes), ``decode_step_ms`` (mean), ``slot_occupancy`` (busy share of
the slot-steps computed; these from one more, timed run), ``peak_rss_mb``, and the
transformers figures and the ratio when transformers is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

EOS = 2


def length_range(text: str):
    a, _, b = text.partition(":")
    lo, hi = int(a), int(b or a)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"--prompt-len-range wants A:B with 1 <= A <= B, got {text!r}")
    return lo, hi


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16, help="megarlhf's slots; transformers' batch size")
    ap.add_argument("--num-prompts", type=int, default=0, help="prompts per run (0: --batch)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prompt-len-range", type=length_range, default=None, metavar="A:B",
                    help="prompt lengths drawn uniformly from A..B (overrides --prompt-len)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--eos-rate", type=float, default=0.0,
                    help="probability that a response ends with EOS at each token, for both engines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--profile", action="store_true", help="print where megarlhf's time goes")
    args = ap.parse_args(argv)
    if not 0.0 <= args.eos_rate < 1.0:
        ap.error(f"--eos-rate must be in [0, 1), got {args.eos_rate}")
    args.num_prompts = args.num_prompts or args.batch
    return args


def make_prompts(args, g: torch.Generator):
    lo, hi = args.prompt_len_range or (args.prompt_len, args.prompt_len)
    lens = torch.randint(lo, hi + 1, (args.num_prompts,), generator=g).tolist()
    # ids 3.. (0-2 are pad/bos/eos)
    return [torch.randint(3, args.vocab, (n,), generator=g).tolist() for n in lens]


def eos_table(args, g: torch.Generator) -> torch.Tensor:
    """[prompts, new_tokens] bool: the response of prompt i ends with EOS at position j."""
    return torch.rand(args.num_prompts, args.new_tokens, generator=g) < args.eos_rate


def force_eos(logits: torch.Tensor, end_here: torch.Tensor) -> torch.Tensor:
    """EOS the only choice where ``end_here`` [b], never elsewhere."""
    eos_col = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    eos_col[EOS] = True
    neg = torch.finfo(logits.dtype).min
    keep = torch.where(end_here[:, None], eos_col[None, :], ~eos_col[None, :])
    return logits.masked_fill(~keep, neg)


def expected_lengths(table: torch.Tensor) -> list:
    """Each response's length under the EOS table (EOS included)."""
    n, new = table.shape
    hit = torch.where(table.any(1), table.float().argmax(1) + 1, torch.full((n,), new))
    return hit.tolist()


def megatron_from_hf(hf, folder: str):
    """transformers' random Llama through megarlhf's converter, loaded on one rank: the
    same weights for both engines."""
    import dataclasses

    from megarlhf.convert.hf_to_megatron import convert_hf_to_megatron
    from megarlhf.models.checkpoint import read_meta

    hf.save_pretrained(os.path.join(folder, "hf"))
    convert_hf_to_megatron(os.path.join(folder, "hf"), os.path.join(folder, "mg"), log=lambda _: None)
    meta = read_meta(os.path.join(folder, "mg"))
    return dataclasses.replace(meta.model, params_dtype=str(hf.dtype).split(".")[-1]), os.path.join(folder, "mg")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from megarlhf.config import ModelConfig, ParallelConfig
    from megarlhf.models.checkpoint import load_model
    from megarlhf.models.llama import build_model
    from megarlhf.parallel import init_single_process, initialize_model_parallel
    from megarlhf.rollout.engine import MegatronEngine, SamplingParams

    g = torch.Generator().manual_seed(args.seed)
    prompts = make_prompts(args, g)
    table = eos_table(args, g)
    want = expected_lengths(table)
    n_tokens, n_prompt_tokens = sum(want), sum(len(p) for p in prompts)
    longest = max(len(p) for p in prompts) + args.new_tokens
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                      num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                      vocab_size=args.vocab, max_position_embeddings=longest, params_dtype=args.dtype)
    init_single_process()
    mp = initialize_model_parallel(ParallelConfig(), seed=0)
    hf = None
    if not args.no_hf:
        try:
            from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList
        except ImportError:
            print("transformers is not installed: no baseline", file=sys.stderr)
        else:
            hcfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                               num_hidden_layers=args.layers, num_attention_heads=args.heads,
                               num_key_value_heads=args.kv_heads, max_position_embeddings=longest,
                               bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
            hf = LlamaForCausalLM(hcfg).eval().to(getattr(torch, args.dtype))

            class EosTable(LogitsProcessor):
                def __init__(self, rows: torch.Tensor, width: int):
                    self.rows, self.width = rows, width

                def __call__(self, input_ids, scores):
                    step = torch.full((len(self.rows),), input_ids.shape[1] - self.width)
                    return force_eos(scores, table[self.rows, step])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if hf is not None:
            cfg, ckpt = megatron_from_hf(hf, tmp)
        chunks = build_model(cfg, mp)
        if ckpt is not None:
            load_model(chunks, ckpt)
    engine = MegatronEngine(chunks, mp, cfg.vocab_size, max_batch=args.batch)
    table_dev = table.to(engine.device)

    def ours_processor(logits, index, step):
        return force_eos(logits, table_dev[index, step])

    # No EOS rate: no stop id and no processor on either side (every response is full length).
    early = args.eos_rate > 0
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=1, stop_ids=[EOS] if early else [],
                            eos_id=EOS, logits_processor=ours_processor if early else None)
    phases = []

    def run_ours() -> float:
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        dt = time.perf_counter() - t0
        assert [len(r) for r in out.response_ids] == want
        phases.append(dict(engine.last_stats))
        return dt

    def run_hf() -> float:
        t0 = time.perf_counter()
        got = []
        for start in range(0, len(prompts), args.batch):
            rows = list(range(start, min(start + args.batch, len(prompts))))
            width = max(len(prompts[i]) for i in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            att = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):  # left padding, as transformers wants for decoder-only models
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                att[r, width - len(prompts[i]):] = 1
            ends = dict(eos_token_id=EOS, logits_processor=LogitsProcessorList([EosTable(torch.tensor(rows), width)])) \
                if early else dict(min_new_tokens=args.new_tokens)
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=att, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=args.new_tokens, use_cache=True, pad_token_id=0, **ends)
            for resp in out[:, width:]:
                hits = (resp == EOS).nonzero() if early else []
                got.append(int(hits[0]) + 1 if len(hits) else len(resp))
        dt = time.perf_counter() - t0
        assert got == want, "transformers did not follow the EOS table"
        return dt

    run_ours()  # warm-up
    if hf is not None:
        run_hf()
    ours, theirs = [], []
    phases.clear()
    for _ in range(args.repeats):
        ours.append(run_ours())
        if hf is not None:
            theirs.append(run_hf())
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_ours()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    med = statistics.median(ours)
    # the phase figures from one more run that waits for the device around each pass (the
    # runs above do not: their times are the throughput)
    engine.timing = True
    run_ours()
    engine.timing = False
    st = phases[-1]
    result = {
        "tokens_per_s": round(n_tokens / med, 1),
        "seconds": round(med, 4),
        "prefill_tokens_per_s": round(n_prompt_tokens / st["prefill_s"], 1) if st["prefill_s"] else None,
        "decode_step_ms": round(1000 * st["decode_s"] / max(st["decode_steps"], 1), 3),
        "slot_occupancy": round(st["busy_slot_steps"] / max(st["slot_steps"], 1), 3),
        "decode_steps": st["decode_steps"], "prefill_passes": st["prefills"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "num_prompts": args.num_prompts, "slots": args.batch, "generated_tokens": n_tokens,
        "prompt_tokens": n_prompt_tokens, "mean_response": round(n_tokens / args.num_prompts, 1),
        "prompt_len": list(args.prompt_len_range or (args.prompt_len, args.prompt_len)),
        "new_tokens": args.new_tokens, "eos_rate": args.eos_rate,
        "layers": args.layers, "hidden": args.hidden, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "repeats": args.repeats,
    }
    if theirs:
        result["hf_tokens_per_s"] = round(n_tokens / statistics.median(theirs), 1)
        result["speedup_vs_hf"] = round(statistics.median(theirs) / med, 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
