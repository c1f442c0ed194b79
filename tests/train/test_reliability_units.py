"""Pieces of the reliability story that need no training run: fault specs, the skipped-step
counter, the halt agreed through the preemption flag, checkpoint manifests and the
restricted reading of checkpoint metadata."""

import os
import pickle

import pytest
import torch

from megarlhf.models.checkpoint import CheckpointError
from megarlhf.models.integrity import (MANIFEST_FILE, check_metadata, verify_checkpoint,
                                       write_manifest)
from megarlhf.train import faults
from megarlhf.train.guard import BadSteps, TrainingHalted
from megarlhf.train.preemption import Preemption, PreemptionConfig


# -- fault specs ---------------------------------------------------------------------------------
def test_fault_spec_parses_ranges_ranks_and_points():
    got = faults.parse("kill@train_step=3:rank=1, nan_grad@train_step=2-6,kill@save=2")
    assert got == [faults.Fault("kill", "train_step", 3, 3, 1),
                   faults.Fault("nan_grad", "train_step", 2, 6, None),
                   faults.Fault("kill", "save", 2, 2, None)]
    assert faults.parse("") == []


@pytest.mark.parametrize("bad", ["kill", "kill@train_step", "explode@train_step=1",
                                 "nan_grad@save=1", "kill@train_step=x", "kill@train_step=1:rank="])
def test_bad_fault_specs_name_the_entry(bad):
    with pytest.raises(ValueError, match=faults.ENV):
        faults.parse(bad)


def test_faults_count_passages_and_return_numeric_actions(monkeypatch):
    monkeypatch.setenv(faults.ENV, "nan_grad@train_step=2-3,inf_grad@train_step=3:rank=0,"
                                   "nan_loss@train_step=4:rank=5")
    monkeypatch.setenv("RANK", "0")
    faults.reset()
    try:
        got = [faults.at("train_step") for _ in range(5)]
    finally:
        faults.reset()
    assert got == [[], ["nan_grad"], ["nan_grad", "inf_grad"], [], []]


# -- skipped steps and the halt -----------------------------------------------------------------
class _Halts:
    def __init__(self):
        self.messages = []

    def halt(self, message):
        self.messages.append(message)


def test_bad_steps_count_and_halt_only_after_k_in_a_row():
    g, p = BadSteps(3, name="critic"), _Halts()
    for step, skipped in enumerate([True, True, False, True, True], start=1):
        g.record(skipped, step, p)
    assert (g.total, g.in_row, p.messages) == (4, 2, [])
    g.record(True, 6, p)
    assert len(p.messages) == 1
    assert "3 critic updates in a row" in p.messages[0] and "steps 4-6" in p.messages[0]
    assert "train.max_bad_steps=3" in p.messages[0]


def test_bad_steps_zero_never_halts():
    g, p = BadSteps(0), _Halts()
    for step in range(1, 50):
        g.record(True, step, p)
    assert g.total == 49 and p.messages == []


def test_halt_saves_then_raises_even_on_the_last_step():
    pre = Preemption(PreemptionConfig(signal="none", on_sigterm=False))
    saved = []
    pre.end_of_step(3, 10, 0, lambda: saved.append("x") or "ckpt", None)  # nothing asked
    assert saved == []
    pre.halt("5 updates in a row had a non-finite loss")
    with pytest.raises(TrainingHalted, match="halted after step 10: 5 updates.*Saved that state to ckpt"):
        pre.end_of_step(10, 10, 0, lambda: saved.append("x") or "ckpt", None)
    assert saved == ["x"]


# -- manifests -----------------------------------------------------------------------------------
def _folder(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "a.distcp").write_bytes(os.urandom(5000))
    (d / "sub" / "b.bin").write_bytes(b"x" * 100)
    (d / "megarlhf.json").write_text("{}")
    write_manifest(str(d))
    return d


def test_manifest_lists_every_file_but_itself_and_the_editable_metadata(tmp_path):
    d = _folder(tmp_path)
    import json

    files = json.loads((d / MANIFEST_FILE).read_text())["files"]
    assert sorted(files) == ["a.distcp", os.path.join("sub", "b.bin")]
    assert files["a.distcp"]["bytes"] == 5000
    verify_checkpoint(str(d), hashes=True)  # intact
    (d / "megarlhf.json").write_text('{"edited": true}')
    verify_checkpoint(str(d), hashes=True)


def test_truncated_file_is_named(tmp_path):
    d = _folder(tmp_path)
    with open(d / "a.distcp", "r+b") as f:
        f.truncate(1234)
    with pytest.raises(CheckpointError, match=r"a\.distcp has 1234 bytes, 5000 were written \(truncated\)"):
        verify_checkpoint(str(d))


def test_flipped_byte_is_found_by_hashing_only(tmp_path):
    d = _folder(tmp_path)
    data = bytearray((d / "a.distcp").read_bytes())
    data[2500] ^= 0xFF
    (d / "a.distcp").write_bytes(bytes(data))
    verify_checkpoint(str(d))  # same size: sizes alone cannot tell
    with pytest.raises(CheckpointError, match=r"a\.distcp: SHA-256 differs.*corrupted"):
        verify_checkpoint(str(d), hashes=True)


def test_missing_file_and_unreadable_manifest(tmp_path):
    d = _folder(tmp_path)
    (d / "sub" / "b.bin").unlink()
    with pytest.raises(CheckpointError, match="b.bin is missing"):
        verify_checkpoint(str(d))
    (d / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable checkpoint manifest"):
        verify_checkpoint(str(d))


def test_checkpoint_without_manifest_passes(tmp_path):
    (tmp_path / "x").write_bytes(b"1")
    verify_checkpoint(str(tmp_path), hashes=True)


# -- checkpoint metadata is never unpickled blindly -----------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_real_checkpoint_metadata_is_accepted(mg_causal):
    check_metadata(str(mg_causal))


def test_crafted_metadata_is_refused_without_running_it(tmp_path, mg_causal):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(mg_causal, d)
    marker = tmp_path / "pwned"
    with open(d / ".metadata", "wb") as f:
        pickle.dump({"state_dict_metadata": _Evil(marker)}, f)
    with pytest.raises(CheckpointError, match=r"refusing to load.*(posix|os)\.system"):
        check_metadata(str(d))
    from megarlhf.models.checkpoint import load_model, read_meta
    from megarlhf.models.llama import build_model
    from megarlhf.parallel import init_single_process, initialize_model_parallel
    from megarlhf.config import ParallelConfig

    init_single_process()
    mp = initialize_model_parallel(ParallelConfig())
    chunks = build_model(read_meta(str(d)).model, mp, kind="causal")
    with pytest.raises(CheckpointError, match=r"\.metadata has 1\d\d bytes"):  # the manifest first
        load_model(chunks, str(d))
    (d / MANIFEST_FILE).unlink()  # a crafted checkpoint would come with a matching manifest
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(chunks, str(d))
    assert not marker.exists()


def test_crafted_common_state_is_refused_by_weights_only_loading(tmp_path, mg_causal):
    """megatron reads ``common.pt`` with torch.load's default, weights_only=True."""
    import shutil

    from megatron.core import dist_checkpointing

    d = tmp_path / "ckpt"
    shutil.copytree(mg_causal, d)
    marker = tmp_path / "pwned"
    torch.save({"train": _Evil(marker)}, d / "common.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        dist_checkpointing.load_common_state_dict(str(d))
    assert not marker.exists()


def test_garbled_metadata_is_a_clear_error(tmp_path, mg_causal):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(mg_causal, d)
    (d / ".metadata").write_bytes((d / ".metadata").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable checkpoint index"):
        check_metadata(str(d))


def test_crafted_hf_pickle_weights_are_refused(tmp_path, hf_causal):
    """Hugging Face ``*.bin`` weights go through torch.load(weights_only=True): a pickle that
    would run code is an error, and the code never runs."""
    import shutil

    from tests.conftest import run_tool

    hf = tmp_path / "hf"
    shutil.copytree(hf_causal, hf)
    for f in hf.glob("*.safetensors"):
        f.unlink()
    (hf / "model.safetensors.index.json").unlink(missing_ok=True)
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Evil(marker)}, hf / "pytorch_model.bin")
    res = run_tool("tools/convert_hf_to_megatron.py", "--hf-dir", hf, "--out", tmp_path / "out")
    out = res.stdout + res.stderr
    assert res.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "pytorch_model.bin: cannot load with weights_only=True" in out
    assert "posix.system" in out or "os.system" in out
    assert not marker.exists()
