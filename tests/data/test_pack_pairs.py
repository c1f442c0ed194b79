"""pack_pairs: sequences end to end in one ``thd`` row, a pair's two in one microbatch,
each read back whole; nothing lost."""

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
    micro = pack_pairs(pairs, 24, pad_id=0)
    assert [b.num_pairs for b in micro] == [2, 2, 2]  # 8+11 | 8+15 | 8+6 tokens: in order, whole pairs
    first = 0
    for b in micro:
        assert b.tokens.shape == (1, 24) and b.attention_mask is None
        ref = pair_batch(pairs[first:first + b.num_pairs], 24, 0)
        width = b.gather.shape[1]
        for name in ("tokens", "labels", "loss_mask", "position_ids"):
            real = ref.loss_mask[:, :width] > 0
            assert torch.equal(b.seqwise(getattr(b, name))[real], getattr(ref, name)[:, :width][real]), name
        assert torch.equal(b.seqwise(b.tokens), ref.tokens[:, :width])
        assert torch.equal(b.last_index, ref.last_index)
        p = b.packed_seq_params
        assert p.qkv_format == "thd" and int(p.cu_seqlens_q[-1]) == 24 and p.max_seqlen_q == width
        lens = (p.cu_seqlens_q[1:] - p.cu_seqlens_q[:-1]).tolist()
        assert lens[:2 * b.num_pairs] == [len(s[0]) for pair in pairs[first:first + b.num_pairs] for s in pair]
        assert max(lens) <= width  # the pad tail is cut into sequences no longer than the longest
        first += b.num_pairs


def test_rows_are_cut_to_a_multiple_and_errors_name_the_sizes():
    pairs = _pairs([(3, 3)])
    b = pack_pairs(pairs, 64, 0, trim=True, multiple=8)[0]
    assert b.tokens.shape == (1, 8) and b.packed_seq_params.cu_seqlens_q.tolist() == [0, 3, 6, 8]
    # pipeline stages: every row of the call as long as the longest (19 tokens -> 24)
    two = pack_pairs(_pairs([(9, 10), (3, 3)]), 20, 0, multiple=8)
    assert [m.tokens.shape for m in two] == [(1, 24), (1, 24)]
    assert [m.tokens.shape[1] for m in pack_pairs(_pairs([(9, 10), (3, 3)]), 20, 0, trim=True)] == [24, 8]
    with pytest.raises(ValueError, match=r"pair 0 \(9 \+ 2 tokens\) does not fit in a microbatch of 8 tokens"):
        pack_pairs(_pairs([(9, 2)]), 8, 0)
