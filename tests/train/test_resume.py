"""A run resumed from a checkpoint ends with the same weights, bit for bit, as one that
never stopped (plain and distributed optimizer, fp32 and bf16; torch's Adam, and the
optimizer megatron-core builds where Transformer Engine is installed, its FusedAdam, whose
checkpoint format keeps Adam's step per param group: tests/train/fused_adam_mirror.py)."""

import pytest
import torch

from tests.conftest import launch


@pytest.mark.parametrize("nproc,extra", [(1, []), (2, ["--tp", "2", "--dtype", "bfloat16"]),
                                         (2, ["--dist-opt"]),
                                         (1, ["--fused-adam", "--dtype", "bfloat16"]),
                                         (2, ["--fused-adam", "--dist-opt"])],
                         ids=["plain", "tp2_bf16", "dp2_distributed_optimizer", "te_fused_adam",
                              "te_fused_adam_distributed_optimizer"])
def test_resume_is_bit_exact(tmp_path, nproc, extra):
    out = str(tmp_path)
    launch("tests/train/resume_worker.py", nproc, "--out", out, *extra)
    launch("tests/train/resume_worker.py", nproc, "--out", out, "--resume", *extra)
    for rank in range(nproc):
        full = torch.load(tmp_path / f"final_full_rank{rank}.pt")
        resumed = torch.load(tmp_path / f"final_resumed_rank{rank}.pt")
        assert full["lr"] == resumed["lr"]
        for name, w in full["weights"].items():
            assert torch.equal(w, resumed["weights"][name]), name
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000003"
