"""torchrun worker: vocab-parallel log-probs/entropy and their gradients equal the
unsharded ones (2 ranks, gloo)."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megarlhf.algos.logprobs import token_entropy, token_logprobs  # noqa: E402


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 5, 40, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 40, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g, dtype=torch.float64)
    ref_logits = full.clone().requires_grad_()
    ref = torch.log_softmax(ref_logits, -1).gather(-1, targets[..., None])[..., 0]
    ref_ent = -(torch.softmax(ref_logits, -1) * torch.log_softmax(ref_logits, -1)).sum(-1)
    ((ref * weights).sum() + (ref_ent * weights).sum()).backward()

    shard = 40 // world
    local = full[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()
    lp = token_logprobs(local, targets, dist.group.WORLD, vocab_start=rank * shard)
    ent = token_entropy(local, dist.group.WORLD)
    ((lp.double() * weights).sum() + (ent.double() * weights).sum()).backward()
    assert (lp.double() - ref).abs().max() < 1e-5, (lp, ref)
    assert (ent.double() - ref_ent).abs().max() < 1e-5
    expected_grad = ref_logits.grad[..., rank * shard:(rank + 1) * shard]
    assert (local.grad.double() - expected_grad).abs().max() < 1e-5, "gradient differs"
    print(f"rank {rank} ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
