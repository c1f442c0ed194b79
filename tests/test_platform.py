"""One test per patched behaviour of the CPU compatibility layer (megarlhf/platform.py)."""

import time

import pytest
import torch

from megarlhf import platform

pytestmark = pytest.mark.skipif(platform.has_gpu(), reason="the CPU layer is installed only without a GPU")


@pytest.fixture(scope="module", autouse=True)
def cpu_layer():
    platform.install_cpu_compat()
    assert platform.cpu_compat_installed()


def test_platform_is_cpu_gloo():
    plat = platform.current(0)
    assert plat.device == torch.device("cpu") and plat.backend == "gloo" and not plat.is_gpu


def test_every_patch_has_a_test():
    names = set(platform.CPU_PATCHES)
    tested = {"device-literals", "current-device", "tensor-cuda", "tensor-type-name", "rng",
              "sync-and-events", "streams", "inference-p2p"}
    assert names == tested


def test_device_literals_are_redirected_to_cpu():
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device="cuda:0").device.type == "cpu"
    assert torch.ones(1).to("cuda").device.type == "cpu"
    assert torch.empty(3, device=torch.device("cuda")).device.type == "cpu"
    assert torch.triu(torch.ones(2, 2, device="cuda"), diagonal=1).device.type == "cpu"
    assert torch.zeros_like(torch.ones(2), device="cuda").device.type == "cpu"
    assert torch.ones(2).to("cuda", torch.float64).dtype == torch.float64
    assert torch.ones(2).to(device="cuda:1").device.type == "cpu"
    # megatron's schedules create their token counter like this:
    assert torch.zeros([], dtype=torch.int, device="cuda").dtype == torch.int


def test_device_context_still_applies_to_the_wrapped_factories():
    """``with torch.device("meta")`` recognises factories by identity (torch caches the set
    once): wrapping them must not hide them from it, or meta-device builds (the converters'
    layout models) allocate real memory."""
    with torch.device("meta"):
        assert torch.empty(2).device.type == "meta" and torch.ones(3).device.type == "meta"
        assert torch.nn.Linear(4, 4).weight.device.type == "meta"
    assert torch.zeros(2, device="cuda").device.type == "cpu"


def test_current_device_is_cpu():
    assert torch.cuda.current_device() == "cpu"
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"


def test_tensor_cuda_is_identity():
    x = torch.arange(3)
    assert x.cuda() is x


def test_tensor_type_name_reports_cuda_but_still_converts():
    x = torch.zeros(2)
    assert x.type() == "torch.cuda.FloatTensor"  # megatron's optimizer asserts this
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    y = x.type(torch.float64)  # the converting form is untouched
    assert y.dtype == torch.float64 and y.device.type == "cpu"


def test_cuda_manual_seed_really_seeds_the_cpu_generator():
    torch.cuda.manual_seed(123)
    a = torch.rand(4)
    torch.cuda.manual_seed(123)
    b = torch.rand(4)
    assert torch.equal(a, b)
    torch.manual_seed(5)  # calls torch.cuda.manual_seed_all: must not recurse
    torch.cuda.manual_seed_all(9)  # a no-op
    c = torch.rand(2)
    torch.manual_seed(5)
    assert torch.equal(c, torch.rand(2))


def test_rng_state_get_set_round_trips():
    state = torch.cuda.get_rng_state()
    a = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))


def test_tensor_parallel_rng_tracker_forks_distinct_reproducible_streams():
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 1000)
    torch.manual_seed(0)
    outside_before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        inside = torch.rand(4)
    # the default stream is restored after the fork
    assert torch.equal(torch.get_rng_state(), outside_before)
    # the tracked stream is the seed's stream, and it advances
    torch.manual_seed(1000)
    assert torch.equal(inside, torch.rand(4))
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(4)
    assert not torch.equal(inside, second)


def test_events_measure_wall_clock_and_sync_is_a_noop():
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    time.sleep(0.05)
    end.record()
    torch.cuda.synchronize()
    end.synchronize()
    assert 40 <= start.elapsed_time(end) < 1000
    with pytest.raises(RuntimeError):
        torch.cuda.Event().elapsed_time(end)


def test_streams_are_inert():
    s = torch.cuda.Stream()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.stream(s):
        x = torch.ones(2) * 2
    assert x.sum().item() == 4
    torch.cuda.empty_cache()


def test_inference_p2p_accepts_cpu_tensors():
    from megatron.core.inference import communication_utils as cu

    cu._is_cuda_contiguous(torch.zeros(2))  # asserts tensor.is_cuda unpatched


def test_install_is_idempotent():
    zeros = torch.zeros
    platform.install_cpu_compat()
    platform.install_cpu_compat()
    assert torch.zeros is zeros and not hasattr(zeros.__megarlhf_wrapped__, "__megarlhf_wrapped__")
    assert torch._C._len_torch_function_stack() == 0  # no per-op mode


def test_refuses_to_patch_a_gpu_machine(monkeypatch):
    monkeypatch.setattr(platform, "has_gpu", lambda: True)
    with pytest.raises(RuntimeError, match="GPU"):
        platform.install_cpu_compat()


def test_transformer_engine_absent_is_reported():
    ok, reason = platform.transformer_engine_status()
    assert not ok and ("not installed" in reason or "GPU" in reason)
    with pytest.raises(RuntimeError, match="model.transformer_impl='transformer_engine'"):
        platform.require_transformer_engine(None)
    with pytest.raises(RuntimeError, match="cannot be used"):
        platform.require_transformer_engine("hybrid")


def test_auto_dtype_follows_the_hardware(monkeypatch):
    assert platform.resolve_dtype("float32") == "float32"
    assert platform.resolve_dtype("bfloat16") == "bfloat16"
    monkeypatch.setattr(platform, "cpu_has_amx", lambda: True)
    assert platform.resolve_dtype("auto") == "bfloat16"
    monkeypatch.setattr(platform, "cpu_has_amx", lambda: False)
    assert platform.resolve_dtype("auto") == "float32"


@pytest.mark.parametrize("env, wanted, why", [
    ({}, True, ""),
    ({"MEGARLHF_CPU_ALLOCATOR": "tuned"}, True, ""),
    ({"MEGARLHF_CPU_ALLOCATOR": "default"}, False, "MEGARLHF_CPU_ALLOCATOR=default"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, False, "GLIBC_TUNABLES"),
    ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, True, ""),
    ({"MALLOC_ARENA_MAX": "2"}, False, "MALLOC_ARENA_MAX"),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, False, "MALLOC_TRIM_THRESHOLD_"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, False, "preloaded"),
])
def test_allocator_tuning_yields_to_the_users_choice(env, wanted, why):
    got, reason = platform.allocator_tuning_wanted(env)
    assert got is wanted and why in reason


def test_allocator_setting_is_checked():
    with pytest.raises(ValueError, match="MEGARLHF_CPU_ALLOCATOR='fast'"):
        platform.allocator_tuning_wanted({"MEGARLHF_CPU_ALLOCATOR": "fast"})


_FAULTS = """
import resource, sys, torch
from megarlhf import platform
platform.current()
def rounds(n):  # a step's pattern: many large blocks held together, then all freed
    for _ in range(n):
        held = [torch.ones(2 * 2 ** 20) for _ in range(20)]
        del held
rounds(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(5)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, platform.tune_cpu_allocator())
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_tuned_allocator_reuses_freed_blocks_instead_of_faulting_them_in_again():
    import os
    import subprocess
    import sys

    faults = {}
    for choice in ("default", "tuned"):
        env = dict(os.environ, MEGARLHF_CPU_ALLOCATOR=choice)
        env.pop("GLIBC_TUNABLES", None)
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout.split(maxsplit=1)
        faults[choice] = int(out[0])
        assert ("tuned" in out[1]) is (choice == "tuned"), out[1]
    # 5 rounds x 160 MiB (41k pages): glibc as it is faults the blocks in again in every
    # round or (its dynamic thresholds permitting) in one of them; tuned, in none
    assert faults["default"] > 30_000, faults
    assert faults["tuned"] < faults["default"] / 10, faults


def test_attention_upcasts_half_precision_only_where_gradients_flow_on_cpu():
    """CPU flash attention's bf16 backward is the slow one: training passes attend in fp32,
    generation (no gradients) keeps bf16, fp32 inputs are left alone."""
    q = torch.randn(2, 4, 8, 16, dtype=torch.bfloat16)
    assert not platform.attention_upcast(q)
    assert platform.attention_upcast(q.clone().requires_grad_())
    with torch.no_grad():
        assert not platform.attention_upcast(q.clone().requires_grad_())
    assert not platform.attention_upcast(torch.randn(2, 4, 8, 16, requires_grad=True))


def test_upcast_attention_matches_fp32_and_keeps_the_dtype():
    """SDPAttention's training-pass attention in bf16 inputs: the fp32 result rounded to
    bf16, with gradients reaching the bf16 inputs."""
    from megarlhf.models.sdpa import _attend

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 8, 20, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = _attend(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.to(torch.bfloat16))
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()
