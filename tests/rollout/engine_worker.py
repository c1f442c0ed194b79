"""torchrun worker: generate at a given TP x PP and check the engine against megatron's
own full forward pass (log-probs, top-k/top-p sampling distributions)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megarlhf.algos.logprobs import token_logprobs, vocab_start_of  # noqa: E402
from megarlhf.config import ParallelConfig  # noqa: E402
from megarlhf.data.batch import pad_examples  # noqa: E402
from megarlhf.models.checkpoint import load_model, read_meta  # noqa: E402
from megarlhf.models.llama import build_model, padded_vocab  # noqa: E402
from megarlhf.parallel import destroy, init_distributed, initialize_model_parallel  # noqa: E402
from megarlhf.rollout.engine import MegatronEngine, SamplingParams  # noqa: E402
from megarlhf.rollout.sampling import filter_logits  # noqa: E402
from megarlhf.train.step import forward_only  # noqa: E402


def full_forward(chunks, mp, cfg, seqs):
    """Per sequence: (log-probs of every next token, gathered logits) from the training forward."""
    seq_len = max(len(s) for s in seqs)
    batch = pad_examples([(s, [True] * len(s)) for s in seqs], seq_len, 0)
    vstart = vocab_start_of(mp.tp_rank, padded_vocab(cfg, mp.config.tp), mp.config.tp)

    def step(it, model):
        b = next(it)
        out = model(b.tokens, b.position_ids, attention_mask=None)

        def collect(o, non_loss_data=True):
            lp = token_logprobs(o, b.labels, mp.tp_group, vstart)
            parts = [torch.empty_like(o) for _ in range(mp.config.tp)]
            torch.distributed.all_gather(parts, o.contiguous(), group=mp.tp_group)
            return lp, torch.cat(parts, -1)[..., :cfg.vocab_size].float()
        return out, collect

    outs = forward_only(chunks, mp, step, [batch], seq_len, len(seqs))
    return outs[0] if outs else (None, None)


def main():
    ckpt, tp, pp, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    init_distributed()
    mp = initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=tp,
                                                  pipeline_model_parallel_size=pp))
    meta = read_meta(ckpt)
    cfg = meta.model
    chunks = build_model(cfg, mp)
    load_model(chunks, ckpt)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 7, 12, 3)]
    eng = MegatronEngine(chunks, mp, cfg.vocab_size, max_batch=3)  # 2 chunks
    one = MegatronEngine(chunks, mp, cfg.vocab_size, max_batch=64)  # 1 chunk
    greedy = eng.generate(prompts, SamplingParams(max_new_tokens=10, greedy=True))
    sp = SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.9, top_k=50, seed=3)
    sample = eng.generate(prompts, sp)
    sample_one = one.generate(prompts, sp)
    hot = eng.generate(prompts * 8, SamplingParams(max_new_tokens=12, temperature=5.0, seed=4))
    # EOS ends prompt 1 at its 4th greedy token; a stop id ends prompt 0 at its 3rd.
    eos, stop = greedy.response_ids[1][3], greedy.response_ids[0][2]
    stopped = eng.generate(prompts, SamplingParams(max_new_tokens=10, greedy=True, eos_id=eos,
                                                   stop_ids=[eos, stop]))
    result = {"greedy": greedy, "sample": sample, "sample_one_chunk": sample_one, "stopped": stopped,
              "prompts": prompts, "eos": eos, "stop": stop,
              "max_hot_id": max(max(r) for r in hot.response_ids), "vocab": cfg.vocab_size}
    # Check the engine's log-probs against the training forward of the same tokens.
    seqs = [p + r for p, r in zip(prompts, sample.response_ids)]
    lp, logits = full_forward(chunks, mp, cfg, seqs)
    if lp is not None:
        pol_err, samp_err = 0.0, 0.0
        for i, (p, r) in enumerate(zip(prompts, sample.response_ids)):
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(r))  # position t predicts t+1
            pol_err = max(pol_err, (lp[i, pos] - torch.tensor(sample.policy_logprobs[i])).abs().max().item())
            filt = torch.log_softmax(filter_logits(logits[i, pos], sp.temperature, sp.top_k, sp.top_p), -1)
            ref = filt.gather(-1, torch.tensor(r)[:, None])[:, 0]
            samp_err = max(samp_err, (ref - torch.tensor(sample.sample_logprobs[i])).abs().max().item())
        result.update(policy_logprob_err=pol_err, sample_logprob_err=samp_err)
    if mp.is_last_stage and mp.tp_rank == 0:
        torch.save(result, out_path)
    destroy()


if __name__ == "__main__":
    main()
