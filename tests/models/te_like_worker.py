"""torchrun worker: a converted (local-layer) checkpoint loads into a model whose layers
carry Transformer Engine's ``_extra_state`` (tests/models/te_like.py) and gives the local
model's loss; that model's checkpoint, extra state included, loads back into both kinds.

    torchrun --nproc-per-node 2 tests/models/te_like_worker.py --ckpt C --tp 2 \
        --inputs tokens.pt --save OUT_CKPT --out result.pt
"""

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megarlhf.algos.logprobs import token_logprobs, vocab_start_of  # noqa: E402
from megarlhf.config import ParallelConfig  # noqa: E402
from megarlhf.models import specs  # noqa: E402
from megarlhf.models.checkpoint import CheckpointMeta, load_model, read_meta, save_model  # noqa: E402
from megarlhf.models.llama import build_model, padded_vocab  # noqa: E402
from megarlhf.parallel import destroy, init_distributed, initialize_model_parallel  # noqa: E402
from tests.models import te_like  # noqa: E402

LOCAL_BLOCK_SPEC = specs.block_spec


def build(cfg, mp, te: bool):
    specs.block_spec = te_like.block_spec(LOCAL_BLOCK_SPEC) if te else LOCAL_BLOCK_SPEC
    try:
        return build_model(cfg, mp)
    finally:
        specs.block_spec = LOCAL_BLOCK_SPEC


def logprobs(chunks, cfg, mp, tokens):
    with torch.no_grad():
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        logits = chunks[0](tokens, pos, attention_mask=None)
        start = vocab_start_of(mp.tp_rank, padded_vocab(cfg, mp.config.tp), mp.config.tp)
        labels = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
        return token_logprobs(logits.float(), labels, mp.tp_group, start)[:, :-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--save", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    init_distributed()
    mp = initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=args.tp), seed=3)
    meta = read_meta(args.ckpt)
    cfg = meta.model
    tokens = torch.load(args.inputs)

    # As a Transformer Engine model with fused attention leaves them (a PPO role built
    # before): building local layers must neither trip over nor change them.
    te_switches = {"NVTE_FLASH_ATTN": "0", "NVTE_FUSED_ATTN": "1", "NVTE_UNFUSED_ATTN": "0"}
    os.environ.update(te_switches)
    local = build(cfg, mp, te=False)
    assert {k: os.environ[k] for k in te_switches} == te_switches
    load_model(local, args.ckpt)
    te = build(cfg, mp, te=True)
    carriers = te_like.extra_state_modules(te[0])
    assert carriers, "the TE-like model carries no extra state"
    load_model(te, args.ckpt)  # the converted checkpoint has no core-attention/norm extra state
    lp_local, lp_te = logprobs(local, cfg, mp, tokens), logprobs(te, cfg, mp, tokens)

    # As after FP8 steps: every TE module holds scaling metadata, saved with the weights.
    for i, m in enumerate(carriers):
        m.fp8_meta_like = {"scale_fwd": torch.full((3,), 0.5 + i), "amax_history_fwd": torch.arange(4.0) + i}
    save_model(te, args.save, dataclasses.replace(
        meta, model=dataclasses.replace(cfg, transformer_impl="transformer_engine")))

    local2 = build(cfg, mp, te=False)
    load_model(local2, args.save)  # local layers: the TE metadata is not read
    te2 = build(cfg, mp, te=True)
    load_model(te2, args.save)
    restored = [m.fp8_meta_like for m in te_like.extra_state_modules(te2[0])]
    for i, meta_like in enumerate(restored):
        assert torch.equal(meta_like["scale_fwd"], torch.full((3,), 0.5 + i)), i
    torch.save({"local": lp_local, "te": lp_te, "local_from_te": logprobs(local2, cfg, mp, tokens),
                "te_from_te": logprobs(te2, cfg, mp, tokens), "carriers": len(carriers),
                "restored": len(restored)},
               args.out.replace(".pt", f"_rank{torch.distributed.get_rank()}.pt"))
    destroy()


if __name__ == "__main__":
    main()
