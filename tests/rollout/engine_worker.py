"""torchrun worker: generate greedy and sampled continuations at a given TP x PP."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megarlhf.config import ParallelConfig  # noqa: E402
from megarlhf.models.checkpoint import load_model, read_meta  # noqa: E402
from megarlhf.models.llama import build_model  # noqa: E402
from megarlhf.parallel import destroy, init_distributed, initialize_model_parallel  # noqa: E402
from megarlhf.rollout.engine import MegatronEngine, SamplingParams  # noqa: E402


def main():
    ckpt, tp, pp, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    init_distributed()
    mp = initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=tp,
                                                  pipeline_model_parallel_size=pp))
    meta = read_meta(ckpt)
    chunks = build_model(meta.model, mp)
    load_model(chunks, ckpt)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, meta.model.vocab_size, (n,), generator=g).tolist()
               for n in (5, 9, 7, 12, 3)]
    eng = MegatronEngine(chunks, mp, meta.model.vocab_size, max_batch=3)  # 2 chunks
    greedy = eng.generate(prompts, SamplingParams(max_new_tokens=10, greedy=True))
    sample = eng.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.9,
                                                  top_k=50, seed=3))
    # a stop id that the greedy continuation of prompt 1 produces at its 4th token
    stop_tok = greedy.response_ids[1][3]
    stopped = eng.generate(prompts, SamplingParams(max_new_tokens=10, greedy=True, stop_ids=[stop_tok]))
    if mp.is_last_stage and mp.tp_rank == 0:
        torch.save({"greedy": greedy, "sample": sample, "stopped": stopped, "prompts": prompts,
                    "stop": stop_tok}, out_path)
    destroy()


if __name__ == "__main__":
    main()
