"""torchrun worker for the model-layout tests: loads a converted checkpoint at the given
TP x PP (x VPP) and either runs a forward pass (logits, log-probs) or trains a few steps.

    torchrun --nproc-per-node 4 tests/models/llama_worker.py --ckpt C --tp 2 --pp 2 \
        --inputs tokens.pt --mode forward --out result.pt
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megarlhf.algos.logprobs import token_entropy, token_logprobs, vocab_start_of  # noqa: E402
from megarlhf.config import ParallelConfig  # noqa: E402
from megarlhf.models.checkpoint import load_model, read_meta, save_model  # noqa: E402
from megarlhf.models.llama import build_model, padded_vocab, unwrap  # noqa: E402
from megarlhf.parallel import build_layout, destroy, init_distributed, initialize_model_parallel  # noqa: E402
from megarlhf.train.optim import OptimConfig, build_optimizer, build_optimizer_elsewhere, wrap_ddp  # noqa: E402
from megarlhf.train.step import forward_only, train_step  # noqa: E402


def gather_vocab(logits, mp):
    if mp.config.tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(mp.config.tp)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=mp.tp_group)
    return torch.cat(parts, dim=-1)


def parameters_held(chunks, mp):
    """Parameters of the whole model, summed over its TP x PP ranks: a tied embedding's
    copy on the last pipeline stage (megatron marks it ``shared``) and the norms every TP
    rank holds count once."""
    n = sum(p.numel() for c in chunks for p in c.parameters() if not getattr(p, "shared", False)
            and (getattr(p, "tensor_model_parallel", False) or mp.tp_rank == 0))
    t = torch.tensor([n], dtype=torch.float64)
    torch.distributed.all_reduce(t, group=mp.pg_collection.mp)
    return int(t.item())


def first_and_last_matrix(chunks, mp):
    """The embedding on the first pipeline stage, the output layer's weight on the last."""
    if mp.is_first_stage:
        return unwrap(chunks[0]).embedding.word_embeddings.weight.detach().clone()
    if mp.is_last_stage:
        return unwrap(chunks[-1]).output_layer.weight.detach().clone()
    return None


def tied_in_sync(chunks, mp, before):
    """With PP > 1: whether the first stage's embedding equals the last stage's output
    weight bit for bit on every TP rank, and how far the embedding moved from ``before``."""
    equal, moved = torch.ones(1), torch.zeros(1)
    mine = first_and_last_matrix(chunks, mp)
    if mine is not None:
        pair = [torch.empty_like(mine) for _ in range(2)]
        torch.distributed.all_gather(pair, mine.contiguous(), group=mp.pg_collection.embd)
        equal[0] = float(torch.equal(pair[0], pair[1]))
        moved[0] = (mine - before).abs().max()
    torch.distributed.all_reduce(equal, op=torch.distributed.ReduceOp.MIN, group=mp.pg_collection.mp)
    torch.distributed.all_reduce(moved, op=torch.distributed.ReduceOp.MAX, group=mp.pg_collection.mp)
    return bool(equal.item()), float(moved.item())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--mode", choices=["forward", "train"], default="forward")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--distributed-optimizer", action="store_true")
    ap.add_argument("--save", default=None, help="save the model here after the run")
    ap.add_argument("--reward-from-causal", action="store_true",
                    help="build a reward model and load a causal checkpoint into its trunk")
    ap.add_argument("--span", default=None,
                    help="FIRST:NUM: megatron's globals stay TP1 PP1 over the whole job and the "
                         "model is laid out on ranks FIRST..FIRST+NUM-1 only (a PPO role)")
    ap.add_argument("--check-tied", action="store_true",
                    help="train mode, PP > 1: report whether the last stage's output weight still "
                         "equals the first stage's embedding")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.set_num_threads(1)
    init_distributed()
    par = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                         virtual_pipeline_model_parallel_size=args.vpp, sequence_parallel=args.sp)
    if args.span:
        first, num = map(int, args.span.split(":"))
        initialize_model_parallel(ParallelConfig(), seed=1)
        # Another layout created before this one: group creation order must not matter.
        build_layout(ParallelConfig(), 0, 1, seed=1)
        mp = build_layout(par, first, num, seed=1)
        if mp is None:  # not a rank of this model: loading is collective over the job
            load_model([], args.ckpt)
            if args.mode == "train":
                build_optimizer_elsewhere()
            destroy()
            return
    else:
        mp = initialize_model_parallel(par, seed=1)
    meta = read_meta(args.ckpt)
    cfg = meta.model
    kind = "reward" if args.reward_from_causal else meta.kind
    chunks = build_model(cfg, mp, kind=kind)
    skip = ("output_layer.",) if args.reward_from_causal else ()
    not_loaded = load_model(chunks, args.ckpt, skip_prefixes=skip)

    tokens = torch.load(args.inputs)  # [n, s] int64
    n, s = tokens.shape
    mbs = args.mbs
    positions = torch.arange(s).unsqueeze(0).expand(mbs, -1)
    microbatches = [{"tokens": tokens[i:i + mbs]} for i in range(0, n, mbs)]
    vstart = vocab_start_of(mp.tp_rank, padded_vocab(cfg, args.tp), args.tp)
    saver = mp.is_last_stage and mp.tp_rank == 0 and mp.dp_rank == 0

    def logprob_loss(mb, logits):
        lp = token_logprobs(logits[:, :-1], mb["tokens"][:, 1:], mp.tp_group, vstart)
        return -lp.mean()

    if args.mode == "forward":
        def fwd(data_iter, model):
            mb = next(data_iter)
            out = model(mb["tokens"], positions, attention_mask=None)

            def collect(output, non_loss_data=False):
                if kind == "reward":
                    return {"values": output[..., 0].float()}
                lp = token_logprobs(output[:, :-1], mb["tokens"][:, 1:], mp.tp_group, vstart)
                ent = token_entropy(output, mp.tp_group)
                return {"logits": gather_vocab(output.float(), mp), "logprobs": lp, "entropy": ent}
            return out, collect

        outs = forward_only(chunks, mp, fwd, microbatches, s, mbs)
        n_params = parameters_held(chunks, mp)
        head = None
        if kind == "reward" and mp.is_last_stage:
            head = gather_vocab(chunks[-1].output_layer.weight.detach().float(), mp)
        if saver:
            result = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
            result["not_loaded"] = not_loaded
            result["num_parameters"] = n_params
            if head is not None:
                result["head"] = head
            torch.save(result, args.out)
    else:
        ddp = wrap_ddp(chunks, mp, args.distributed_optimizer)
        opt = build_optimizer(ddp, OptimConfig(lr=1e-3, clip_grad=1.0,
                                               use_distributed_optimizer=args.distributed_optimizer), mp)

        def fwd(data_iter, model):
            mb = next(data_iter)
            out = model(mb["tokens"], positions, attention_mask=None)

            def loss_fn(output):
                loss = logprob_loss(mb, output)
                return loss, {"loss": loss.detach().clone()}
            return out, loss_fn

        before = first_and_last_matrix(chunks, mp) if args.check_tied else None
        losses, grad_norms = [], []
        for _ in range(args.steps):
            res = train_step(ddp, opt, mp, fwd, microbatches, s, mbs)
            grad_norms.append(float(res["grad_norm"]))
            if mp.is_last_stage:
                losses.append(torch.stack([o["loss"] for o in res["outputs"]]).mean().item())
        result = {"losses": torch.tensor(losses, dtype=torch.float64),
                  "grad_norms": torch.tensor(grad_norms, dtype=torch.float64)}
        if args.check_tied:
            result["tied_in_sync"], result["embedding_moved"] = tied_in_sync(chunks, mp, before)
        if saver:
            torch.save(result, args.out)
        if args.save:
            save_model(chunks, args.save, meta)
    destroy()


if __name__ == "__main__":
    main()
