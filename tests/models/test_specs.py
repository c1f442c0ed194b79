"""Layer-spec selection: local by default; Transformer Engine / FP8 fail clearly when absent."""

import pytest

from megarlhf import platform
from megarlhf.config import preset
from megarlhf.models.specs import LocalRMSNorm, block_spec, layer_spec

needs_cpu = pytest.mark.skipif(platform.has_gpu(), reason="checks the no-TE, no-GPU errors")


def test_local_spec_uses_the_sequence_parallel_aware_norm():
    spec = layer_spec(preset("tiny"))
    assert spec.submodules.input_layernorm is LocalRMSNorm
    assert spec.submodules.pre_mlp_layernorm is LocalRMSNorm
    block = block_spec(preset("tiny"), 3)
    assert len(block.layer_specs) == 3 and block.layer_norm is LocalRMSNorm


@needs_cpu
def test_transformer_engine_asked_for_but_absent_fails_before_building():
    with pytest.raises(RuntimeError, match="model.transformer_impl='transformer_engine' cannot be used"):
        layer_spec(preset("tiny", transformer_impl="transformer_engine"))


@needs_cpu
def test_fp8_asked_for_but_absent_fails_before_building():
    with pytest.raises(RuntimeError, match="cannot be used"):
        layer_spec(preset("tiny", transformer_impl="transformer_engine", fp8="hybrid"))


def test_sequence_parallel_norm_marks_its_weight():
    class Cfg:
        sequence_parallel = True
        params_dtype = None

    norm = LocalRMSNorm(Cfg, 16, eps=1e-6)
    assert norm.weight.sequence_parallel is True and norm.eps == 1e-6
