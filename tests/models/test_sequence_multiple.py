"""Row lengths padded to what the layout needs, in one place for every recipe:
megatron's sequence-parallel split and Transformer Engine's FP8 GEMM shapes."""

import math

import pytest
import torch

from megarlhf.config import ConfigError, ParallelConfig, load_config, preset
from megarlhf.models.llama import check_row_length, pad_to, sequence_multiple


def te_accepts_fp8(tokens_per_rank: int, hidden: int = 64) -> bool:
    """transformer_engine/pytorch/utils.py ``assert_dim_for_fp8_exec`` on a rank's GEMM
    input ``[tokens, hidden]``: leading dimensions a multiple of 8, the last of 16; and its
    backward's weight-gradient GEMM takes the tokens as inner dimension (16 for FP8)."""
    return tokens_per_rank % 8 == 0 and hidden % 16 == 0 and tokens_per_rank % 16 == 0


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("sp", [False, True])
def test_padded_rows_satisfy_fp8_and_sequence_parallelism(tp, sp):
    if sp and tp == 1:
        return
    m = sequence_multiple(tp, sp, fp8=True)
    for longest in range(1, 140):
        seq = pad_to(longest, m)
        assert seq >= longest and seq - longest < m
        if sp:
            assert seq % tp == 0  # megatron scatters the sequence over the TP ranks
        for batch in (1, 2, 3):
            assert te_accepts_fp8(batch * seq // (tp if sp else 1)), (longest, batch)
    assert sequence_multiple(tp, sp, fp8=False) == (8 * tp if sp else 8)


def test_pair_rows_and_rollout_rows_use_the_multiple():
    from megarlhf.recipes.pairs_common import pair_microbatches
    from megarlhf.rollout.batch import build_rollout

    rows = [{"chosen_ids": list(range(3, 3 + n)), "chosen_mask": [1] * n, "rejected_ids": [3, 4, 5],
             "rejected_mask": [1, 1, 1]} for n in (9, 20)]
    micro, seq = pair_microbatches(rows, [0, 1], 2, 256, 0, multiple=sequence_multiple(2, True, True))
    assert seq == 32 and micro[0].tokens.shape[-1] == 32
    _, seq8 = pair_microbatches(rows, [0, 1], 2, 256, 0)
    assert seq8 == 24
    prompts = [[1, 2, 3], [1, 2]]
    resp = torch.tensor([[7, 8, 9, 0], [7, 0, 0, 0]])
    ro = build_rollout(prompts, resp, torch.tensor([3, 1]), torch.tensor([0, 0]), torch.zeros(2, 4), 0,
                       multiple=math.lcm(16, sequence_multiple(2, True, False)))
    assert ro.seq == 16 and ro.tokens.shape == (2, 16)


def test_a_row_length_that_cannot_be_padded_is_named():
    fp8 = preset("tiny", transformer_impl="transformer_engine", fp8="hybrid")
    with pytest.raises(ConfigError, match=r"train.seq_length=264 is not a multiple of 16: rows are padded"):
        check_row_length(264, fp8, ParallelConfig())
    assert check_row_length(264, preset("tiny"), ParallelConfig()) == 8  # no FP8/SP: rounded up within it
    sp = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    assert check_row_length(256, preset("tiny"), sp) == 16


def test_sft_refuses_a_row_length_fp8_cannot_use():
    from megarlhf.recipes.sft import SFTConfig

    cfg = load_config(SFTConfig, None, ["model.transformer_impl=transformer_engine", "model.fp8=hybrid",
                                        "train.packing=false", "train.seq_length=200", "data.max_length=128"])
    with pytest.raises(ConfigError, match=r"train.seq_length=200 is not a multiple of 16"):
        cfg.validate()
