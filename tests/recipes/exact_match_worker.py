"""torchrun worker: exact match at DP=2 gives every rank every problem's outcome, in the
prompt file's order (the task's checker replaced by one that depends only on the reference)."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import megarlhf.data.task as task  # noqa: E402
from megarlhf.config import ParallelConfig  # noqa: E402
from megarlhf.parallel import destroy, init_distributed, initialize_model_parallel  # noqa: E402
from megarlhf.recipes.common import checkpoint_exact_match, gather_outcomes  # noqa: E402
from megarlhf.train.roles import replica_share  # noqa: E402


def main():
    torch.set_num_threads(1)
    ckpt, prompts = sys.argv[1], sys.argv[2]
    init_distributed()
    mp = initialize_model_parallel(ParallelConfig(), seed=1)
    assert mp.dp_size == 2
    task.is_correct = lambda text, reference: int(reference) % 3 != 1
    em = checkpoint_exact_match(ckpt, mp, prompts, 7, 4, 8)  # shares of 4 and 3 problems
    want = [int(json.loads(l)["reference"]) % 3 != 1 for l in open(prompts)][:7]
    assert em.outcomes == want and 0 < sum(want) < 7, (em.outcomes, want)
    assert em.accuracy == sum(want) / 7 and em.n == 7
    one = replica_share(1, mp)  # the second replica's share is empty
    assert gather_outcomes([True] * len(one), one, 1, mp) == [True]
    print(f"rank {mp.dp_rank} ok", flush=True)
    destroy()


if __name__ == "__main__":
    main()
