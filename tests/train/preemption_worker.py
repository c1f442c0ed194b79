"""torchrun worker for tests/train/test_preemption.py: loops of 8 steps in which one rank
signals itself at a given step; every rank records where each loop stopped, and how it
left after the last one."""

import argparse
import json
import os
import signal

from megarlhf.parallel import DistEnv, init_distributed
from megarlhf.train.preemption import Preemption, PreemptionConfig

# (rank that gets the signal, signal, at step)
SCENARIOS = [(1, "SIGUSR1", 3), (0, "SIGUSR1", 5), (1, "SIGTERM", 2)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    env = init_distributed(DistEnv.from_environ())
    records = []
    for i, (rank, name, at) in enumerate(SCENARIOS):
        preempt = Preemption(PreemptionConfig())
        step, stopped = 0, None
        while step < 8:
            step += 1
            if env.rank == rank and step == at:
                os.kill(os.getpid(), getattr(signal, name))
            if preempt.should_stop():
                stopped = step
                break
        records.append({"stopped": stopped, "reason": preempt.reason, "received": preempt.received})
        if i < len(SCENARIOS) - 1:
            preempt.uninstall()
            continue
        try:
            preempt.exit(step, "a checkpoint", None)
        except SystemExit as e:
            records[-1]["exit"] = e.code
    with open(os.path.join(args.out, f"rank{env.rank}.json"), "w") as f:
        json.dump(records, f)


if __name__ == "__main__":
    main()
