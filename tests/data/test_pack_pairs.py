"""pack_pairs: every sequence whole in one row, a pair's two in one microbatch, nothing lost."""

import pytest
import torch

from megarlhf.data.batch import pack_pairs, pair_batch


def _pairs(lengths):
    out = []
    for k, (c, r) in enumerate(lengths):
        out.append(((list(range(1, c + 1)), [False] + [True] * (c - 1)),
                    ([100 + k] * r, [False] * (r // 2) + [True] * (r - r // 2))))
    return out


def test_layout_and_per_sequence_view_match_the_padded_batch():
    pairs = _pairs([(5, 3), (9, 2), (4, 4), (7, 8), (2, 6), (3, 3)])
    micro = pack_pairs(pairs, 12, 2, pad_id=0)
    assert sum(b.num_pairs for b in micro) == len(pairs)
    first = 0
    for b in micro:
        assert b.tokens.shape == (2, 12)
        ref = pair_batch(pairs[first:first + b.num_pairs], 12, 0)
        width = b.gather.shape[1]
        for name in ("tokens", "labels", "loss_mask"):
            assert torch.equal(b.seqwise(getattr(b, name)), getattr(ref, name)[:, :width]), name
        assert torch.equal(b.seqwise(b.position_ids)[b.seqwise(b.loss_mask) > 0],
                           ref.position_ids[:, :width][ref.loss_mask[:, :width] > 0])
        assert torch.equal(b.last_index, ref.last_index)
        # attention: causal within each sequence, never across sequences
        allowed = ~b.attention_mask[:, 0]
        owner = torch.full((2 * 12,), -1)
        for k, row in enumerate(b.gather):
            owner[row[row < 2 * 12]] = k
        for r in range(2):
            o = owner[r * 12:(r + 1) * 12]
            real = o >= 0
            want = (o[:, None] == o[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
            assert torch.equal(allowed[r][real][:, real], want[real][:, real])
        first += b.num_pairs
    assert len(micro) >= 2


def test_trim_drops_empty_rows_and_errors_name_the_sizes():
    pairs = _pairs([(3, 3)])
    assert pack_pairs(pairs, 16, 4, 0)[0].tokens.shape == (4, 16)
    assert pack_pairs(pairs, 16, 4, 0, trim=True)[0].tokens.shape == (1, 16)
    with pytest.raises(ValueError, match="exceeds seq_length=8"):
        pack_pairs(_pairs([(9, 2)]), 8, 2, 0)
    with pytest.raises(ValueError, match="does not fit in 1 rows of 8 tokens"):
        pack_pairs(_pairs([(6, 5)]), 8, 1, 0)
