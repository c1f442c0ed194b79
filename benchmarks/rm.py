"""Reward-model training throughput (non-pad tokens/s), optionally against TRL in the same command.

    python benchmarks/rm.py --layers 4 --hidden 256 --heads 8 --kv-heads 2 --ffn 688 \
        --vocab 4096 --batch 8 --seq-len 128 --steps 12 [--trl] [--dtype bfloat16]

Prints one JSON line last: tokens_per_s, peak_rss_mb (and TRL's figure and the ratio
with --trl). Details in benchmarks/pairwise.py.

Packing: ``--pack`` packs megarlhf's rows (train.packing), ``--padded-baseline`` also runs
the padded step, alternating, and reports ``packing_speedup``; ``--len-range A:B`` trains
on synthetic pairs of A-B tokens; ``--attention-backend sdpa`` for a padded step with the
attention kernel the packed one uses. JSON adds padded tokens/s and the padding fraction.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pairwise import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("rm"))
