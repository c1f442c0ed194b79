"""Ranks for tests/test_launch.py: ``--mode ok|raise|kill|exit75|signal|hang``."""

import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    record = {"rank": rank, "world": dist.get_world_size(), "sum": t.item(),
              "local_rank": int(os.environ["LOCAL_RANK"]), "threads": torch.get_num_threads(),
              "argv": sys.argv[1:], "name": __name__}
    got = []
    if a.mode == "signal":
        signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
        sys.stdout.write(f"rank {rank} ready\n")  # one write: lines of two ranks never interleave
        sys.stdout.flush()
        deadline = time.time() + 30
        while not got and time.time() < deadline:
            time.sleep(0.05)
        record["signal"] = got[0] if got else None
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    if rank == 1 and a.mode == "raise":
        raise RuntimeError("rank 1 gives up")
    if rank == 1 and a.mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if a.mode == "exit75":
        return 75
    if a.mode in ("raise", "kill"):
        dist.barrier()  # rank 0 would wait here for ever: the launcher must stop it
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
