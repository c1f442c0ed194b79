"""torchrun worker: the same examples packed and padded give the same loss and gradients."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megarlhf.config import ParallelConfig, preset  # noqa: E402
from megarlhf.data.batch import pack_examples, pad_examples  # noqa: E402
from megarlhf.models.llama import build_model  # noqa: E402
from megarlhf.parallel import destroy, init_distributed, initialize_model_parallel  # noqa: E402
from megarlhf.recipes.common import lm_forward_step  # noqa: E402
from megarlhf.train.optim import wrap_ddp  # noqa: E402
from megarlhf.train.step import forward_only  # noqa: E402


def grads_after(ddp, mp, fwd, micro, seq, mbs):
    from megarlhf.train.step import _schedule
    for c in ddp:
        c.zero_grad_buffer()
    _schedule(mp, ddp)(forward_step_func=fwd, data_iterator=iter(micro), model=ddp,
                       num_microbatches=len(micro), seq_length=seq, micro_batch_size=mbs,
                       forward_only=False)
    return torch.cat([p.main_grad.flatten().clone() for p in ddp[0].parameters()])


def main():
    torch.set_num_threads(1)
    init_distributed()
    mp = initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=int(sys.argv[1])), seed=3)
    thd = len(sys.argv) > 2 and sys.argv[2] == "thd"
    cfg = preset("tiny", vocab_size=300, num_layers=2, max_position_embeddings=64,
                 attention_backend="sdpa" if thd else "auto")
    chunks = build_model(cfg, mp)
    for c in chunks:
        c.config.calculate_per_token_loss = True
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (9, 17, 5, 12, 30, 7, 21, 3):
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        mask = [False] * (n // 2) + [True] * (n - n // 2)
        examples.append((ids, mask))
    fwd = lm_forward_step(mp, cfg, torch.device("cpu"))
    seq, mbs = 32, 2
    padded = pad_examples(examples, seq, 0)
    packed = pack_examples(examples, seq, 0, row_multiple=mbs)
    assert packed.tokens.shape[0] < padded.tokens.shape[0]

    def split(b):
        from megarlhf.data.batch import to_thd
        from megarlhf.recipes.sft import _split
        micro = _split(b, mbs)
        if thd and b.lengths is not None:
            micro = [to_thd(m) for m in micro]
            assert micro[0].tokens.shape[0] == 1 and micro[0].attention_mask is None
        return micro

    def loss(b):
        outs = forward_only(chunks, mp, lambda it, m: _collect(fwd, it, m), split(b), seq, mbs)
        t = sum(o for o in outs)
        return (t[0] / t[1]).item()

    lp, lk = loss(padded), loss(packed)
    assert abs(lp - lk) < 1e-5, (lp, lk)
    ddp = wrap_ddp(chunks, mp)
    gp = grads_after(ddp, mp, fwd, split(padded), seq, mbs)
    gk = grads_after(ddp, mp, fwd, split(packed), seq, mbs)
    assert (gp - gk).abs().max() < 1e-5 * max(1.0, gp.abs().max().item()), (gp - gk).abs().max()
    print(f"rank {torch.distributed.get_rank()} ok{' thd' if thd else ''} loss {lp:.6f} {lk:.6f}")
    destroy()


def _collect(fwd, it, model):
    out, loss_fn = fwd(it, model)
    return out, lambda o, non_loss_data=True: loss_fn(o)[2]["lm_loss"]


if __name__ == "__main__":
    main()
