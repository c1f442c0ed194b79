"""torchrun worker: preference pairs packed and padded give the same reward-model and DPO
losses, statistics and gradients (argv: TP, PP)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megarlhf.config import ParallelConfig, preset  # noqa: E402
from megarlhf.models.llama import build_model  # noqa: E402
from megarlhf.parallel import destroy, init_distributed, initialize_model_parallel  # noqa: E402
from megarlhf.recipes.dpo import DPOLossConfig, dpo_forward_step  # noqa: E402
from megarlhf.recipes.pairs_common import micro_rows, pair_microbatches  # noqa: E402
from megarlhf.recipes.reward_model import reward_forward_step  # noqa: E402
from megarlhf.train.optim import wrap_ddp  # noqa: E402
from megarlhf.train.step import _schedule  # noqa: E402

SEQ, MBS = 48, 2


def pairs_dataset():
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, (p, c, r) in enumerate([(5, 9, 4), (12, 3, 20), (7, 7, 7), (4, 30, 2), (9, 11, 6), (6, 2, 14),
                                   (3, 5, 5), (10, 16, 8)]):
        prompt = torch.randint(3, 300, (p,), generator=g).tolist()
        side = lambda n: prompt + torch.randint(3, 300, (n,), generator=g).tolist()  # noqa: E731
        rows.append({"chosen_ids": side(c), "chosen_mask": [False] * p + [True] * c,
                     "rejected_ids": side(r), "rejected_mask": [False] * p + [True] * r,
                     "ref_chosen": -3.0 - 0.1 * i, "ref_rejected": -4.0 + 0.2 * i})
    return rows


def run(ddp, mp, fwd, micro, seq):
    """Summed stats over the microbatches (last stage) and the gradient of this rank."""
    for c in ddp:
        c.zero_grad_buffer()
    outs = _schedule(mp, ddp)(forward_step_func=fwd, data_iterator=iter(micro), model=ddp,
                              num_microbatches=len(micro), seq_length=seq, micro_batch_size=micro_rows(micro, MBS),
                              forward_only=False)
    stats = sum(o["stats"].double() for o in outs) if outs else None
    grad = torch.cat([p.main_grad.flatten().clone() for p in ddp[0].parameters()])
    return stats, grad


def compare(name, ddp, mp, fwd, ds, with_ref=False):
    idx = list(range(len(ds)))
    padded, seq_p = pair_microbatches(ds, idx, MBS, SEQ, 0, with_ref=with_ref)
    packed, seq_k = pair_microbatches(ds, idx, MBS, SEQ, 0, with_ref=with_ref, packing=True,
                                      trim=mp.config.pp == 1)
    assert len(packed) < len(padded), (len(packed), len(padded))
    sp, gp = run(ddp, mp, fwd, padded, seq_p)
    sk, gk = run(ddp, mp, fwd, packed, seq_k)
    if sp is not None:
        assert torch.allclose(sp, sk, rtol=1e-5, atol=1e-5), (name, sp, sk)
    scale = max(1.0, gp.abs().max().item())
    assert (gp - gk).abs().max() < 1e-5 * scale, (name, (gp - gk).abs().max())
    assert gp.abs().max() > 0, name


def main():
    torch.set_num_threads(1)
    tp, pp = int(sys.argv[1]), int(sys.argv[2])
    init_distributed()
    mp = initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                                   seed=3)
    cfg = preset("tiny", vocab_size=300, num_layers=2, max_position_embeddings=64, attention_backend="sdpa")
    ds = pairs_dataset()
    dev = torch.device("cpu")
    for kind in ("reward", "causal"):
        chunks = build_model(cfg, mp, kind=kind)
        for c in chunks:
            c.config.calculate_per_token_loss = True
        ddp = wrap_ddp(chunks, mp)
        if kind == "reward":
            for pooling in ("last", "mean", "min"):
                compare(f"rm/{pooling}", ddp, mp, reward_forward_step(mp, dev, pooling), ds)
        else:
            for d in (DPOLossConfig(), DPOLossConfig(nll_weight=1.0, length_normalized=True)):
                compare(f"dpo/{d}", ddp, mp, dpo_forward_step(mp, cfg, d, dev), ds, with_ref=True)
    print(f"rank {torch.distributed.get_rank()} ok")
    destroy()


if __name__ == "__main__":
    main()
