"""Shared code of the DPO and reward-model throughput benchmarks (see dpo.py and rm.py).

Both sides train on the same pairs: the built-in arithmetic task's preference pairs,
rendered with the Tulu template, tokenized with the built-in SentencePiece tokenizer
(loaded into transformers for TRL). Throughput counts non-pad tokens of the chosen and
rejected sequences per second of training step (the reference pass that DPO precomputes
is excluded on both sides). The first step of each run is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def parse_args(kind: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=f"{kind} training throughput, megarlhf vs TRL")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--seq-len", type=int, default=128, help="longest sequence kept")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--trl", action="store_true", help="also run TRL's trainer (needs trl)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of each side")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--pack", action="store_true",
                    help="megarlhf packs the pairs (train.packing=true): 2 x batch rows of --seq-len tokens")
    ap.add_argument("--padded-baseline", action="store_true",
                    help="with --pack: also megarlhf's padded step (same attention), alternating, and the ratio")
    ap.add_argument("--len-range", default=None, metavar="A:B",
                    help="synthetic pairs instead of the task's: each sequence's length uniform in [A, B] "
                         "(a third of it prompt), --seq-len at least B; megarlhf only")
    ap.add_argument("--attention-backend", default="auto", choices=["auto", "unfused", "sdpa"],
                    help="megarlhf's core attention (model.attention_backend)")
    args = ap.parse_args()
    if args.len_range:
        lo, hi = (int(x) for x in args.len_range.split(":"))
        if not 2 <= lo <= hi <= args.seq_len:
            ap.error(f"--len-range {args.len_range}: need 2 <= A <= B <= --seq-len ({args.seq_len})")
        if args.trl:
            ap.error("--len-range makes token-id pairs without text: not with --trl")
        args.len_range = (lo, hi)
    return args


def task_pairs(n: int, seq_len: int):
    """(prompt text, chosen, rejected) rows and the tokenizer path."""
    from megarlhf.data.builtin import prepare_builtin_task
    from megarlhf.data.task import TaskConfig

    folder = os.path.join(tempfile.gettempdir(), "megarlhf-bench-task")
    files = prepare_builtin_task(folder, TaskConfig(num_preference=max(n, 64), num_sft=64, num_prompts=16,
                                                    num_eval=16))
    rows = [json.loads(l) for l in open(files["preference"])][:n]
    return rows, files


def synthetic_pairs(n: int, lo: int, hi: int, vocab: int):
    """``n`` pairs of random token ids, each sequence ``lo..hi`` tokens long (uniform), its
    first third a prompt shared by chosen and rejected."""
    import datasets

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        c, r = (int(x) for x in torch.randint(lo, hi + 1, (2,), generator=g))
        p = max(1, min(c, r) // 3)
        prompt = torch.randint(3, vocab, (p,), generator=g).tolist()
        side = lambda k: prompt + torch.randint(3, vocab, (k - p,), generator=g).tolist()  # noqa: E731
        rows.append({"chosen_ids": side(c), "chosen_mask": [False] * p + [True] * (c - p),
                     "rejected_ids": side(r), "rejected_mask": [False] * p + [True] * (r - p)})
    return datasets.Dataset.from_list(rows)


def model_config(args, vocab: int):
    from megarlhf.config import ModelConfig

    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                       num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                       vocab_size=max(vocab, args.vocab), max_position_embeddings=max(args.seq_len, 64),
                       params_dtype=args.dtype, attention_backend=args.attention_backend)


def ours(kind: str, args, rows, files) -> Dict[str, float]:
    """megarlhf: one process, the recipe's own functions."""
    from megarlhf.data.chat import ChatTemplate, ChatTemplateConfig
    from megarlhf.data.dataset import DataConfig, build_dataset
    from megarlhf.data.load import SourceConfig
    from megarlhf.data.tokenizer import load_tokenizer
    from megarlhf.models.llama import build_model
    from megarlhf.parallel import init_single_process, initialize_model_parallel
    from megarlhf.config import ParallelConfig
    from megarlhf.models.llama import packed_model
    from megarlhf.recipes.pairs_common import micro_rows, pair_microbatches
    from megarlhf.train.optim import OptimConfig, build_optimizer, wrap_ddp
    from megarlhf.train.step import train_step

    tok = load_tokenizer(files["tokenizer"])
    template = ChatTemplate(ChatTemplateConfig(name="tulu"), tok)
    path = os.path.join(tempfile.gettempdir(), "megarlhf-bench-pairs.jsonl")
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    if args.len_range:
        train = synthetic_pairs(len(rows), *args.len_range, tok.vocab_size)
    else:
        train = build_dataset(DataConfig(sources=[SourceConfig(path=path)], max_length=args.seq_len,
                                         max_prompt_length=args.seq_len, dedup=False), "preference", template).train
    init_single_process()
    mp = initialize_model_parallel(ParallelConfig(), seed=0)
    cfg = packed_model(model_config(args, tok.vocab_size), args.pack)
    chunks = build_model(cfg, mp, kind="reward" if kind == "rm" else "causal")
    ds = train
    if kind == "dpo":
        from megarlhf.recipes.dpo import DPOLossConfig, dpo_forward_step, precompute_reference

        ds = precompute_reference(chunks, mp, cfg, ds, DPOLossConfig(), args.batch, args.seq_len,
                                  tok.pad_id, torch.device("cpu"), packing=args.pack)
        step_fn = dpo_forward_step(mp, cfg, DPOLossConfig(), torch.device("cpu"))
    else:
        from megarlhf.recipes.reward_model import reward_forward_step

        step_fn = reward_forward_step(mp, torch.device("cpu"))
    for c in chunks:
        c.config.calculate_per_token_loss = True
    ddp = wrap_ddp(chunks, mp)
    opt = build_optimizer(ddp, OptimConfig(lr=1e-5), mp)
    times, tokens, slots = [], [], []
    for s in range(args.steps):
        idx = [(s * args.batch + i) % len(ds) for i in range(args.batch)]
        micro, seq = pair_microbatches(ds, idx, args.batch, args.seq_len, tok.pad_id, with_ref=kind == "dpo",
                                       packing=args.pack, trim=True)
        t0 = time.perf_counter()
        train_step(ddp, opt, mp, step_fn, micro, seq, micro_rows(micro, args.batch))
        times.append(time.perf_counter() - t0)
        tokens.append(sum(len(ds[i]["chosen_ids"]) + len(ds[i]["rejected_ids"]) for i in idx))
        slots.append(sum(m.tokens.numel() for m in micro))
    return {"tokens_per_s": sum(tokens[1:]) / sum(times[1:]), "step_s": statistics.median(times[1:]),
            "padded_tokens_per_s": sum(slots[1:]) / sum(times[1:]),
            "padding_fraction": 1 - sum(tokens[1:]) / sum(slots[1:]), "pairs": len(ds)}


def trl_side(kind: str, args, rows, files) -> Dict[str, float]:
    """TRL's DPOTrainer / RewardTrainer on the same pairs, prompts rendered the same way."""
    import datasets
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    from megarlhf.data.chat import ChatTemplate, ChatTemplateConfig
    from megarlhf.data.tokenizer import load_tokenizer

    tok_ours = load_tokenizer(files["tokenizer"])
    template = ChatTemplate(ChatTemplateConfig(name="tulu"), tok_ours)
    tok_dir = tempfile.mkdtemp(prefix="trl-tok-")
    shutil.copy(files["tokenizer"], os.path.join(tok_dir, "tokenizer.model"))
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                   "legacy": True}, f)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    hf_tok.pad_token = hf_tok.eos_token
    # Tulu-rendered prompts (BOS added by the tokenizer), answers closed by EOS.
    texts = []
    for r in rows:
        prompt = template.render([{"role": "user", "content": r["prompt"]}], True)[0]
        prompt = prompt[len(tok_ours.bos_token):]
        texts.append({"prompt": prompt, "chosen": r["chosen"], "rejected": r["rejected"]})
    hcfg = LlamaConfig(vocab_size=max(tok_ours.vocab_size, args.vocab), hidden_size=args.hidden,
                       intermediate_size=args.ffn, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       max_position_embeddings=max(args.seq_len, 64), pad_token_id=hf_tok.pad_token_id)
    dtype = getattr(torch, args.dtype)
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    common = dict(output_dir=out_dir, per_device_train_batch_size=args.batch, max_steps=args.steps,
                  learning_rate=1e-5, logging_steps=1000, save_strategy="no", report_to=[],
                  use_cpu=True, dataloader_num_workers=0, bf16=args.dtype == "bfloat16",
                  gradient_checkpointing=False, seed=0, disable_tqdm=True)
    times: List[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    ds = datasets.Dataset.from_list(texts)
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = LlamaForCausalLM(hcfg).to(dtype)
        cfg = DPOConfig(max_length=args.seq_len, precompute_ref_log_probs=True, beta=0.1, **common)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=hf_tok,
                             callbacks=[Timer()])
    else:
        from trl import RewardConfig, RewardTrainer

        model = LlamaForSequenceClassification(hcfg.__class__(**{**hcfg.to_dict(), "num_labels": 1})).to(dtype)
        cfg = RewardConfig(max_length=args.seq_len, **common)
        trainer = RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=hf_tok,
                                callbacks=[Timer()])
    lens = [len(x["chosen_ids"]) + len(x["rejected_ids"]) + 2 * len(x.get("prompt_ids", []))
            for x in trainer.train_dataset] if "chosen_ids" in trainer.train_dataset.column_names else None
    trainer.train()
    per_pair = statistics.mean(lens) if lens else float("nan")
    steady = times[1:]
    return {"tokens_per_s": per_pair * args.batch * len(steady) / sum(steady),
            "step_s": statistics.median(steady), "tokens_per_pair": per_pair}


def main(kind: str) -> int:
    args = parse_args(kind)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, files = task_pairs(max(args.batch * args.steps, 64), args.seq_len)
    results: Dict[str, List[Dict[str, float]]] = {"megarlhf": [], "trl": [], "padded": []}
    baseline = args.pack and args.padded_baseline
    for _ in range(args.repeats):
        if baseline:
            results["padded"].append(ours(kind, argparse.Namespace(**{**vars(args), "pack": False}), rows, files))
        results["megarlhf"].append(ours(kind, args, rows, files))
        if args.trl:
            results["trl"].append(trl_side(kind, args, rows, files))
    med = lambda side: statistics.median(r["tokens_per_s"] for r in results[side])  # noqa: E731
    ours_med = lambda key: statistics.median(r[key] for r in results["megarlhf"])  # noqa: E731
    out = {"tokens_per_s": round(med("megarlhf"), 1),
           "step_s": round(ours_med("step_s"), 4),
           "padded_tokens_per_s": round(ours_med("padded_tokens_per_s"), 1),
           "padding_fraction": round(ours_med("padding_fraction"), 4),
           "pack": args.pack, "len_range": list(args.len_range) if args.len_range else None,
           "attention_backend": args.attention_backend,
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "kind": kind, "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
           "dtype": args.dtype, "layers": args.layers, "hidden": args.hidden,
           "threads": torch.get_num_threads()}
    if results["padded"]:
        out["padded_run_tokens_per_s"] = round(med("padded"), 1)
        out["padded_run_padding_fraction"] = round(statistics.median(r["padding_fraction"] for r in results["padded"]), 4)
        out["packing_speedup"] = round(out["tokens_per_s"] / out["padded_run_tokens_per_s"], 3)
    if results["trl"]:
        out["trl_tokens_per_s"] = round(med("trl"), 1)
        out["speedup_vs_trl"] = round(out["tokens_per_s"] / out["trl_tokens_per_s"], 3)
    print(json.dumps(out))
    return 0
