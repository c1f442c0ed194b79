"""Memory of the checkpoint converters as the model grows (writes JSON).

    python benchmarks/conversion_memory.py --layers 4,8,16,32

For each size it writes a synthetic Hugging Face Llama (bf16, sharded safetensors, one
shard at a time), converts it to megatron (tools/convert_hf_to_megatron.py) and back
(tools/convert_megatron_to_hf.py), sampling every 20 ms the memory of the converter's
process tree from /proc: private (anonymous) memory, which is what can run a node out
of memory, and total resident memory, which also counts file pages mapped from the
checkpoint files (page cache the kernel can drop).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_hf_model(folder: str, layers: int, hidden: int, ffn: int, heads: int, kv: int,
                   vocab: int) -> Dict[str, int]:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    d = hidden // heads
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
           "tie_word_embeddings": False, "hidden_act": "silu"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    per_shard = 2

    def make_shard(k: int) -> Dict[str, torch.Tensor]:
        """Shard k: 0 embeddings, then layers two at a time, last the norm and LM head."""
        if k == 0:
            return {"model.embed_tokens.weight": rnd(vocab, hidden)}
        if k == n - 1:
            return {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                    "lm_head.weight": rnd(vocab, hidden)}
        shard = {}
        for i in range((k - 1) * per_shard, min(layers, k * per_shard)):
            p = f"model.layers.{i}."
            shard.update({p + "self_attn.q_proj.weight": rnd(heads * d, hidden),
                          p + "self_attn.k_proj.weight": rnd(kv * d, hidden),
                          p + "self_attn.v_proj.weight": rnd(kv * d, hidden),
                          p + "self_attn.o_proj.weight": rnd(hidden, heads * d),
                          p + "mlp.gate_proj.weight": rnd(ffn, hidden),
                          p + "mlp.up_proj.weight": rnd(ffn, hidden),
                          p + "mlp.down_proj.weight": rnd(hidden, ffn),
                          p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                          p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
        return shard

    n = 2 + -(-layers // per_shard)
    weight_map, total, params = {}, 0, 0
    for k in range(n):  # one shard alive at a time
        shard = make_shard(k)
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        for t_name, t in shard.items():
            weight_map[t_name] = name
            total += t.numel() * 2
            params += t.numel()
        del shard
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    layer_bytes = 2 * (hidden * heads * d * 2 + 2 * hidden * kv * d + 3 * hidden * ffn + 2 * hidden)
    return {"params": params, "bytes": total, "layer_bytes": layer_bytes}


def _status_kb(pid: int) -> Dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def _children(pid: int) -> List[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                kids.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def measure(cmd: List[str]) -> Dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"tree_anon_kb": 0, "tree_rss_kb": 0, "main_anon_kb": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            pids = [proc.pid]
            frontier = [proc.pid]
            while frontier:
                kids = _children(frontier.pop())
                pids += kids
                frontier += kids
            stats = [_status_kb(p) for p in pids]
            peaks["tree_anon_kb"] = max(peaks["tree_anon_kb"], sum(s.get("RssAnon", 0) for s in stats))
            peaks["tree_rss_kb"] = max(peaks["tree_rss_kb"], sum(s.get("VmRSS", 0) for s in stats))
            peaks["main_anon_kb"] = max(peaks["main_anon_kb"], stats[0].get("RssAnon", 0))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    output, _ = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return {"seconds": round(time.time() - t0, 2), "peak_private_mib": round(peaks["tree_anon_kb"] / 1024, 1),
            "peak_rss_mib": round(peaks["tree_rss_kb"] / 1024, 1),
            "peak_main_private_mib": round(peaks["main_anon_kb"] / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="4,8,16,32", help="comma-separated layer counts")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "conversion_memory.json"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="megarlhf-convbench-")
    rows = []
    try:
        for layers in [int(x) for x in args.layers.split(",")]:
            base = os.path.join(work, f"L{layers}")
            shutil.rmtree(base, ignore_errors=True)
            info = write_hf_model(os.path.join(base, "hf"), layers, args.hidden, args.ffn, args.heads,
                                  args.kv_heads, args.vocab)
            imp = measure([sys.executable, os.path.join(REPO, "tools", "convert_hf_to_megatron.py"),
                           "--hf-dir", os.path.join(base, "hf"), "--out", os.path.join(base, "mg")])
            exp = measure([sys.executable, os.path.join(REPO, "tools", "convert_megatron_to_hf.py"),
                           "--ckpt", os.path.join(base, "mg"), "--out", os.path.join(base, "hf_out"),
                           "--max-shard-size", "200MB"])
            for name, m in (("hf_to_megatron", imp), ("megatron_to_hf", exp)):
                rows.append({"converter": name, "layers": layers, "params": info["params"],
                             "model_mib": round(info["bytes"] / 2**20, 1),
                             "layer_mib": round(info["layer_bytes"] / 2**20, 1), **m,
                             "private_over_model": round(m["peak_private_mib"] * 2**20 / info["bytes"], 3)})
                r = rows[-1]
                print(f"{name:15s} layers {layers:3d}  model {r['model_mib']:7.1f} MiB  "
                      f"peak private {r['peak_private_mib']:7.1f} MiB  peak RSS {r['peak_rss_mib']:7.1f} MiB  "
                      f"({r['private_over_model']:.2f} x model)  {r['seconds']:6.1f} s", flush=True)
            if not args.keep:
                shutil.rmtree(base, ignore_errors=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "machine": {"cpus": os.cpu_count(),
                   "python": _platform.python_version(), "torch": torch.__version__},
                   "shape": {"hidden": args.hidden, "ffn": args.ffn, "heads": args.heads,
                             "kv_heads": args.kv_heads, "vocab": args.vocab},
                   "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
