"""tools/gpu_check.py: what runs where (every branch, on hardware written out by hand), its
verdicts, the CPU smoke run end to end, and its bundle in an interpreter that has only
torch and its dependencies."""

import importlib
import importlib.metadata as md
import importlib.util
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarlhf import platform
from megarlhf.platform import Hardware, Kernels, select_kernels
from tests.conftest import REPO, run_tool
from tests.tools.machine_site import link_site

_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

NO_TE = "Transformer Engine is not installed (pip install 'megarlhf[gpu]')"
CPU = Hardware(transformer_engine=NO_TE)
H100 = Hardware(gpu="NVIDIA H100 80GB HBM3", capability=(9, 0), transformer_engine="ok")
H100_NO_TE = Hardware(gpu="NVIDIA H100 80GB HBM3", capability=(9, 0), transformer_engine=NO_TE)
H100_APEX = Hardware(gpu="NVIDIA H100 80GB HBM3", capability=(9, 0), transformer_engine=NO_TE, nvidia_apex=True)
L40S = Hardware(gpu="NVIDIA L40S", capability=(8, 9), transformer_engine="ok")
A100 = Hardware(gpu="NVIDIA A100-SXM4-80GB", capability=(8, 0), transformer_engine="ok")
V100 = Hardware(gpu="Tesla V100-SXM2-16GB", capability=(7, 0), transformer_engine=NO_TE)


# -- selection: megarlhf.platform.select_kernels ------------------------------------------

@pytest.mark.parametrize("hw, impl, fp8, expected", [
    (CPU, "local", None, Kernels("local", None, "torch")),
    (H100, "local", None, Kernels("local", None, "transformer_engine")),  # megatron prefers TE's Adam
    (H100_APEX, "local", None, Kernels("local", None, "apex")),
    (H100_NO_TE, "local", None, Kernels("local", None, "torch")),
    (Hardware(nvidia_apex=True), "local", None, Kernels("local", None, "torch")),  # apex kernels need a GPU
    (H100, "transformer_engine", None, Kernels("transformer_engine", None, "transformer_engine")),
    (H100, "transformer_engine", "hybrid", Kernels("transformer_engine", "hybrid", "transformer_engine")),
    (L40S, "transformer_engine", "e4m3", Kernels("transformer_engine", "e4m3", "transformer_engine")),
    (A100, "transformer_engine", None, Kernels("transformer_engine", None, "transformer_engine")),
])
def test_select_kernels(hw, impl, fp8, expected):
    assert select_kernels(impl, fp8, hw) == expected


def test_fp8_on_cpu_names_both_missing_pieces():
    with pytest.raises(RuntimeError) as e:
        select_kernels("transformer_engine", "hybrid", CPU)
    msg = str(e.value)
    assert f"model.transformer_impl='transformer_engine' cannot be used: {NO_TE}" in msg
    assert ("model.fp8='hybrid' cannot be used: FP8 needs a CUDA GPU of compute capability 8.9 or newer "
            "(Ada/Hopper) and none is visible") in msg


def test_fp8_without_transformer_engine_on_hopper_blames_only_transformer_engine():
    with pytest.raises(RuntimeError) as e:
        select_kernels("transformer_engine", "hybrid", H100_NO_TE, field="policy.model")
    assert str(e.value) == f"policy.model.transformer_impl='transformer_engine' cannot be used: {NO_TE}"


def test_fp8_on_a100_names_the_gpu_and_its_capability():
    with pytest.raises(RuntimeError) as e:
        select_kernels("transformer_engine", "hybrid", A100)
    assert str(e.value) == ("model.fp8='hybrid' cannot be used: FP8 needs compute capability 8.9 or newer "
                            "(Ada/Hopper); this GPU (NVIDIA A100-SXM4-80GB) is 8.0")


def test_fp8_with_local_layers_and_unknown_values_are_refused():
    with pytest.raises(RuntimeError, match=r"model.fp8='hybrid' needs model.transformer_impl='transformer_engine'"):
        select_kernels("local", "hybrid", H100)
    with pytest.raises(RuntimeError, match=r"model.fp8='e5m2': expected"):
        select_kernels("transformer_engine", "e5m2", H100)
    with pytest.raises(RuntimeError, match=r"model.transformer_impl='apex': expected"):
        select_kernels("apex", None, H100)


def test_require_transformer_engine_goes_through_the_same_selection(monkeypatch):
    monkeypatch.setattr(platform, "detect_hardware", lambda: A100)
    platform.require_transformer_engine(None)
    with pytest.raises(RuntimeError, match=r"this GPU \(NVIDIA A100-SXM4-80GB\) is 8.0"):
        platform.require_transformer_engine("hybrid")


def test_detect_hardware_on_this_machine():
    hw = platform.detect_hardware()
    if platform.has_gpu():
        pytest.skip("checks the CPU answer")
    assert hw.gpu is None and hw.capability == (0, 0) and hw.transformer_engine != "ok"


def _package(root: Path, name: str, *subpackages: str) -> None:
    for sub in ("",) + subpackages:
        d = root / name / sub
        d.mkdir(parents=True, exist_ok=True)
        (d / "__init__.py").write_text("")


def test_nvidia_apex_is_told_apart_from_the_pypi_package(tmp_path, monkeypatch):
    for name in ("apex", "amp_C"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    empty, pypi, nvidia, built = (tmp_path / d for d in ("empty", "pypi", "nvidia", "built"))
    empty.mkdir()
    _package(pypi, "apex")
    _package(nvidia, "apex", "normalization", "optimizers")
    _package(built, "apex", "transformer")
    (built / "amp_C.py").write_text("")
    for root, expected in ((empty, "apex is not installed"), (pypi, "is not NVIDIA apex"),
                           (nvidia, "without its CUDA extensions"), (built, "ok")):
        monkeypatch.setattr(sys, "path", [str(root)])  # only the fake installation is visible
        importlib.invalidate_caches()
        ok, reason = platform.nvidia_apex_status()
        assert expected in reason and ok == (expected == "ok")


# -- what runs where: gpu_check.plan ------------------------------------------------------

def statuses(items):
    return {name: e["status"] for name, e in items.items()}


def test_plan_without_a_gpu_runs_nothing_and_says_why():
    items = gpu_check.plan(CPU, smoke=False)
    assert list(items) == list(gpu_check.ITEMS)
    assert all(e == {"status": "not run", "reason": items["gemm_probe"]["reason"]} for e in items.values())
    assert "no CUDA GPU" in items["gemm_probe"]["reason"]


def test_plan_cpu_smoke_runs_the_local_path_and_not_fp8():
    items = gpu_check.plan(CPU, smoke=True)
    assert statuses(items) == {"gemm_probe": "planned", "train_local": "planned", "generate": "planned",
                               "train_te_bf16": "not run", "train_te_fp8": "not run",
                               "fp8_loss_agreement": "not run", "fp8_gemms": "not run"}
    assert items["train_local"] == {"status": "planned", "layers": "local", "fp8": None, "dtype": "bfloat16",
                                    "fused": "torch"}
    assert items["gemm_probe"]["device"] == "cpu"
    assert "Transformer Engine is not installed" in items["train_te_bf16"]["reason"]
    assert "none is visible" in items["train_te_fp8"]["reason"]
    assert items["fp8_gemms"]["reason"] == items["train_te_fp8"]["reason"]


def test_plan_on_hopper_with_transformer_engine_runs_everything():
    items = gpu_check.plan(H100, smoke=False)
    assert set(statuses(items).values()) == {"planned"}
    assert items["train_te_fp8"] == {"status": "planned", "layers": "transformer_engine", "fp8": "hybrid",
                                     "dtype": "bfloat16", "fused": "transformer_engine"}
    assert items["train_te_bf16"]["fp8"] is None and items["gemm_probe"]["device"] == "cuda"


def test_plan_on_hopper_without_transformer_engine_reports_fp8_not_run():
    items = gpu_check.plan(H100_APEX, smoke=False)
    assert statuses(items)["train_local"] == "planned" and items["train_local"]["fused"] == "apex"
    for name in ("train_te_bf16", "train_te_fp8", "fp8_loss_agreement", "fp8_gemms"):
        assert items[name]["status"] == "not run" and NO_TE in items[name]["reason"], name


def test_plan_on_a100_runs_transformer_engine_in_bf16_only():
    items = gpu_check.plan(A100, smoke=False)
    assert items["train_te_bf16"]["status"] == "planned"
    for name in ("train_te_fp8", "fp8_loss_agreement", "fp8_gemms"):
        assert items[name]["status"] == "not run" and "compute capability 8.9" in items[name]["reason"], name


def test_plan_on_a_gpu_without_bf16_trains_in_fp32():
    items = gpu_check.plan(V100, smoke=False)
    assert items["train_local"]["dtype"] == "float32" and items["gemm_probe"]["dtype"] == "float32"


# -- pure verdicts ------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", {"bf16": 989.0, "fp8": 1979.0}),
    ("NVIDIA H200", {"bf16": 989.0, "fp8": 1979.0}),
    ("NVIDIA H100 PCIe", {"bf16": 756.0, "fp8": 1513.0}),
    ("NVIDIA H100 NVL", {"bf16": 835.0, "fp8": 1671.0}),
    ("NVIDIA A100-SXM4-80GB", {"bf16": 312.0, "fp8": None}),
    ("NVIDIA L40S", {"bf16": 362.0, "fp8": 733.0}),
    ("Tesla T4", None),
    (None, None),
])
def test_datasheet_peak(name, expected):
    assert gpu_check.datasheet_peak(name) == expected


# Kernel names as cuBLASLt and Transformer Engine report them on Hopper.
FP8_GEMM = ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1_"
            "execute_segment_k_off_kernel__5x_cublas")
NVJET_FP8 = "nvjet_qqtst_128x256_128x6_2x1_2cta_v_bz_TNT"
BF16_GEMM = ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_"
             "execute_segment_k_off_kernel__5x_cublas")
NVJET_BF16 = "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT"
TE_CAST = ("void transformer_engine::(anonymous namespace)::cast_transpose_kernel<8, false, __nv_bfloat16, "
           "__nv_fp8_e4m3>(...)")
OTHER = ["void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(...)",
         "void flash_fwd_kernel<Flash_fwd_kernel_traits<128, cutlass::bfloat16_t>>(...)"]


LIN, OUT, EVAL = gpu_check.LINEAR_RANGE, gpu_check.OUTPUT_RANGE, gpu_check.EVALUATE
TE_NODES = gpu_check.BACKWARD_NODES["transformer_engine"]
OUTPUT_NODE = "LinearWithGradAccumulationAndAsyncCommunicationBackward"


def rec(name, ms, *chain, forward=(), device=()):
    return gpu_check.KernelRecord(name, ms / 1e3, tuple(chain), tuple(forward), tuple(device))


def test_kernel_names_tell_gemms_and_fp8_apart():
    rows = [rec(FP8_GEMM, 4), rec(NVJET_FP8, 3), rec(BF16_GEMM, 2), rec(NVJET_BF16, 1), rec(TE_CAST, 0.5)]
    rows += [rec(n, 1) for n in OTHER]
    t = gpu_check.gemm_time(rows)
    assert (t.gemm_kernels, t.fp8_gemm_kernels, t.fp8_other_kernels) == (4, 2, 1)
    assert t.top_fp8_gemms == (FP8_GEMM, NVJET_FP8) and t.top_fp8_other == (TE_CAST,)
    assert math.isclose(t.other_gemm_s, 0.010) and math.isclose(t.other_kernel_s, 0.0025)
    assert t.linear_gemm_kernels == 0 and t.fp8_share is None  # nothing was attributed
    # on CPU the "kernels" are the leaf operators; aten::matmul only dispatches to aten::mm
    cpu = gpu_check.gemm_time([rec(n, 1) for n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul",
                                                    "aten::add")])
    assert (cpu.gemm_kernels, cpu.fp8_gemm_kernels) == (3, 0)


def test_loss_agreement():
    ref = [10.0, 8.0, 6.0]
    ok = gpu_check.loss_agreement(ref, [10.05, 8.0, 6.06])
    assert ok["status"] == "pass" and ok["at_step"] == 3 and math.isclose(ok["max_relative_difference"], 0.01)
    bad = gpu_check.loss_agreement(ref, [10.0, 8.2, 6.0])
    assert bad["status"] == "fail" and bad["at_step"] == 2 and math.isclose(bad["max_relative_difference"], 0.025)
    assert gpu_check.loss_agreement(ref, [10.0, float("nan"), 6.0])["status"] == "fail"
    assert gpu_check.loss_agreement(ref, ref[:2])["status"] == "fail"


def te_step(fp8_ms, bf16_ms, output_ms=0.0, attention_ms=3.0):
    """The kernels of one TE training step, as :func:`gpu_check.kernel_records` gives
    them: linear-layer GEMMs in the forward range (FP8, and ``bf16_ms`` in bf16) and in
    backward under TE's node linked to its forward op; FP8 casts; the output layer's bf16
    GEMMs, forward and backward; attention's kernels."""
    rows = [rec(OTHER[1], attention_ms, "FusedAttnFunc")]
    if fp8_ms:
        rows += [rec(FP8_GEMM, fp8_ms / 2, "_Linear", LIN, "megatron.transformer_layer"),
                 rec(NVJET_FP8, fp8_ms / 2, "_LinearBackward", EVAL + "_LinearBackward", forward=("_Linear", LIN)),
                 rec(TE_CAST, 0.5, "_Linear", LIN)]
    if bf16_ms:
        rows.append(rec(BF16_GEMM, bf16_ms, "_LayerNormLinear", LIN))
    if output_ms:
        rows += [rec(NVJET_BF16, output_ms / 3, "aten::mm", "aten::matmul", "LinearWithGrad", OUT),
                 rec(BF16_GEMM, output_ms * 2 / 3, "aten::mm", OUTPUT_NODE, EVAL + OUTPUT_NODE,
                     forward=("LinearWithGrad", OUT))]
    return rows


def _run(records, amax=64):
    return {"profile": gpu_check.gemm_time(records, TE_NODES).as_dict(),
            "fp8_meta": {"te_modules": 64, "ran_in_fp8": 64 if amax else 0, "nonzero_amax_history": amax}}


BF16_CONTROL = _run(te_step(0, 100, output_ms=20), amax=0)


def test_fp8_share_of_the_linear_layers_decides():
    good = gpu_check.fp8_gemm_verdict(_run(te_step(95, 5)), BF16_CONTROL)
    assert good["status"] == "pass" and good["fp8_share"] == 0.95 and good["limit"] == gpu_check.FP8_SHARE_LIMIT == 0.9
    assert good["bf16_control_fp8_share"] == 0.0 and good["bf16_control_fp8_gemm_kernels"] == 0
    assert good["fp8_run"]["linear_gemm_by_route"] == {"range": 0.0525, "forward_link": 0.0475}
    short = gpu_check.fp8_gemm_verdict(_run(te_step(89, 11)), BF16_CONTROL)
    assert short["status"] == "fail" and short["fp8_share"] == 0.89 and "89.0%" in short["reason"]
    assert short["fp8_run"]["top_linear_non_fp8_gemms"] == [BF16_GEMM]


def test_the_output_layer_and_attention_do_not_count():
    # 200 ms of bf16 GEMMs in the output layer (forward by its range, backward by its node)
    # and bf16 attention GEMMs elsewhere leave the linear layers' share at 95%
    rows = te_step(95, 5, output_ms=200) + [rec(BF16_GEMM, 50, "aten::bmm", "DotProductAttention")]
    t = gpu_check.gemm_time(rows, TE_NODES)
    assert math.isclose(t.fp8_share, 0.95) and math.isclose(t.linear_gemm_s, 0.1)
    assert math.isclose(t.output_gemm_s, 0.2) and t.output_fp8_gemm_s == 0 and t.output_gemm_kernels == 2
    assert math.isclose(t.other_gemm_s, 0.05)
    assert gpu_check.fp8_gemm_verdict(_run(rows), BF16_CONTROL)["status"] == "pass"


def test_kernel_role_routes():
    role = gpu_check.kernel_role
    assert role(rec("k", 1, "aten::mm", LIN), {}) == ("linear", "range")
    assert role(rec("k", 1, "aten::mm", LIN, forward=("aten::mm", OUT)), {}) == ("linear", "range")
    assert role(rec("k", 1, EVAL + "_LinearBackward", forward=("_Linear", OUT)), TE_NODES) == ("output", "forward_link")
    # without the link to the forward op, TE's node names say "linear layer"...
    assert role(rec("k", 1, "_LayerNormLinearBackward", EVAL + "_LayerNormLinearBackward"), TE_NODES) \
        == ("linear", "node_name")
    assert role(rec("k", 1, EVAL + OUTPUT_NODE), TE_NODES) == ("output", "node_name")
    assert role(rec("k", 1, EVAL + "_LinearBackward"), {}) == (None, "elsewhere")  # ...only where asked to
    assert role(rec("k", 1, device=(OUT, LIN)), {}) == ("output", "device_span")
    assert role(rec("k", 1), TE_NODES) == (None, "unattributed")
    t = gpu_check.gemm_time([rec(FP8_GEMM, 2), rec(TE_CAST, 1), rec(FP8_GEMM, 4, "aten::mm")])
    assert math.isclose(t.unattributed_s, 0.003) and math.isclose(t.other_gemm_s, 0.006)


def test_a_control_run_with_fp8_kernels_fails():
    control = _run(te_step(50, 50))  # the "bf16" run shows FP8 GEMMs: the names prove nothing
    bad = gpu_check.fp8_gemm_verdict(_run(te_step(100, 0)), control)
    assert bad["status"] == "fail" and "control" in bad["reason"] and bad["bf16_control_fp8_share"] == 0.5


def test_without_attribution_there_is_no_pass():
    # FP8 GEMM kernels ran, but the profiler linked none of them to an op or range
    unlinked = [dataclasses.replace(r, chain=(), forward_chain=()) for r in te_step(100, 0)]
    unclear = gpu_check.fp8_gemm_verdict(_run(unlinked), BF16_CONTROL)
    assert unclear["status"] == "unproven" and unclear["fp8_share"] is None
    assert "attributed to the linear layers" in unclear["reason"] and "linked to no op" in unclear["reason"]
    silent = gpu_check.fp8_gemm_verdict(_run([rec(BF16_GEMM, 5), rec(OTHER[0], 1)], amax=0), BF16_CONTROL)
    assert silent["status"] == "fail" and "fell back to bf16" in silent["reason"]
    assert gpu_check.fp8_gemm_verdict({"profile_error": "RuntimeError: x"}, BF16_CONTROL)["status"] == "unproven"


def test_fp8_gemms_result_line_states_the_shares():
    e = gpu_check.fp8_gemm_verdict(_run(te_step(97.3, 2.7, output_ms=6.1)), BF16_CONTROL)
    assert gpu_check.result_line("fp8_gemms", e) == (
        "FP8 GEMMs: 97.3% of the linear layers' GEMM time (limit 90%); output layer 6.1 ms bf16; "
        "bf16 control 0.0%; TE modules with amax 64/64")
    short = gpu_check.fp8_gemm_verdict(_run(te_step(50, 50)), BF16_CONTROL)
    assert gpu_check.result_line("fp8_gemms", short).startswith("FP8 GEMMs: 50.0% of the linear layers' GEMM")
    assert "under the 90% limit" in gpu_check.result_line("fp8_gemms", short)


# -- attribution from a profiler run ------------------------------------------------------

class _TinyLinear(torch.autograd.Function):
    """A linear layer as its own autograd Function, as Transformer Engine's are."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        return dy @ weight, dy.flatten(0, -2).t() @ x.flatten(0, -2)


class TinyLinear(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, n) / n ** 0.5)

    def forward(self, x):
        return _TinyLinear.apply(x, self.weight)


class Mix(torch.nn.Module):
    """An unmarked matrix product (bmm: its own op and backward node)."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, n) / n ** 0.5)

    def forward(self, x):
        return torch.bmm(x, self.weight.expand(x.shape[0], -1, -1))


class Toy(torch.nn.Module):
    """Three "linear layers" (two nn.Linear, one custom Function), an unmarked product, and
    an "output layer" (nn.Linear without bias: mm, MmBackward0, where the linear layers
    run addmm, AddmmBackward0)."""

    def __init__(self, hidden=32, vocab=256):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, hidden),
                                           TinyLinear(hidden)])
        self.mix = Mix(hidden)
        self.output = torch.nn.Linear(hidden, vocab, bias=False)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        for layer in self.layers:
            # An op on a tensor that needs no gradient, outside every range: it records the
            # sequence number the next autograd node will take, here TinyLinear's (its only
            # node). A backward node must be linked to the op that made it, not to this one.
            self.scale * 1
            x = torch.relu(layer(x))
        return self.output(self.mix(x))

    def roles(self):
        return {LIN: list(self.layers), OUT: [self.output]}


def _gemm_ops(step):
    """GEMM operators one call of ``step`` ran, counted from a plain profile (no ranges)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(bool(gpu_check._GEMM_NAME.search(e.name)) for e in prof.events())


def test_kernel_records_on_cpu_split_the_gemms_by_module():
    torch.manual_seed(0)
    model, x = Toy(), torch.randn(4, 8, 32)  # the input needs no gradient

    def step():
        model(x).square().mean().backward()

    records = gpu_check.profile_kernels(step, on_gpu=False, modules=model.roles())
    t = gpu_check.gemm_time(records)
    # Linear layers: forward 3; backward 2 each (input and weight gradients) but 1 for the
    # first (its input needs none). Output layer: 1 + 2. Mix: 1 + 2, in no role.
    assert (t.linear_gemm_kernels, t.output_gemm_kernels, t.gemm_kernels) == (8, 3, 14)
    assert t.gemm_kernels == _gemm_ops(step)
    # the output layer alone, measured apart (its input needs a gradient, as in the model)
    h = torch.randn(4, 8, 32, requires_grad=True)
    assert t.output_gemm_kernels == _gemm_ops(lambda: model.output(h).square().mean().backward())
    assert t.linear_gemm_s > 0 and t.output_gemm_s > 0 and t.other_gemm_s > 0 and t.unattributed_s == 0
    assert t.fp8_share == 0.0 and set(t.linear_gemm_by_route) == {"range", "forward_link"}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # marks removed

    # Backward GEMMs come from the link to the forward op. Without it, node names can stand
    # in (torch's names here; TE's on a GPU)...
    unlinked = [dataclasses.replace(r, forward_chain=()) for r in records]
    names = {"AddmmBackward0": "linear", "_TinyLinearBackward": "linear", "MmBackward0": "output"}
    by_name = gpu_check.gemm_time(unlinked, names)
    assert (by_name.linear_gemm_kernels, by_name.output_gemm_kernels) == (8, 3)
    assert set(by_name.linear_gemm_by_route) == {"range", "node_name"}
    # ...and with neither, only the forward GEMMs are placed
    forward_only = gpu_check.gemm_time(unlinked)
    assert (forward_only.linear_gemm_kernels, forward_only.output_gemm_kernels) == (3, 1)


class Boom(torch.nn.Linear):
    def forward(self, x):
        super().forward(x)
        raise ZeroDivisionError


def test_a_forward_that_raises_closes_its_range():
    torch.manual_seed(0)
    bad, good, x = Boom(4, 4), torch.nn.Linear(4, 4), torch.randn(2, 4)

    def step():
        with pytest.raises(ZeroDivisionError):
            bad(x)
        good(x)

    records = gpu_check.profile_kernels(step, on_gpu=False, modules={LIN: [bad], OUT: [good]})
    gemms = [r for r in records if r.name == "aten::addmm"]
    # had the failed forward left its range open, the next one would run inside it
    assert [r.chain.count(LIN) + r.chain.count(OUT) for r in gemms] == [1, 1]
    assert [gpu_check.kernel_role(r, {})[0] for r in gemms] == ["linear", "output"]
    assert not (bad._forward_hooks or bad._forward_pre_hooks or good._forward_hooks)


def test_kernel_records_from_a_gpu_profile():
    """A GPU profile as torch builds it (torch/autograd/profiler.py,
    ``_parse_kineto_results``): each CUDA kernel a device event, and also attached to
    the CPU op it was linked to; a range's GPU-side span a device event of its name."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    events, ids = [], iter(range(1, 100))

    def op(name, thread, start, end, parent=None, kernels=(), **kw):
        e = FunctionEvent(id=next(ids), name=name, thread=thread, start_us=start, end_us=end, **kw)
        if parent is not None:
            parent.append_cpu_child(e)
            e.set_cpu_parent(parent)
        for kernel, at, us in kernels:
            e.append_kernel(kernel, 0, us)
            device(kernel, at, at + us)
        events.append(e)
        return e

    def device(name, start, end):
        events.append(FunctionEvent(id=next(ids), name=name, thread=7, start_us=start, end_us=end,
                                    device_type=DeviceType.CUDA))

    # forward (thread 1): a linear layer, attention, the output layer
    lin = op(LIN, 1, 0, 100, scope=7, kernels=[(LIN, 185, 50)])  # torch may link the span to its range
    op("_LayerNormLinear", 1, 10, 90, lin, sequence_nr=5, kernels=[(FP8_GEMM, 200, 30)])
    device(TE_CAST, 190, 199)  # launched outside any op: placed by the range's GPU-side span
    op("FusedAttnFunc", 1, 102, 108, kernels=[(OTHER[1], 232, 6)])
    out = op(OUT, 1, 110, 180, scope=7)
    fwd = op("LinearWithGradAccumulationAndAsyncCommunication", 1, 115, 175, out, sequence_nr=6)
    op("aten::mm", 1, 120, 170, fwd, kernels=[(NVJET_BF16, 240, 40)])
    # backward (the engine's thread 2): each node names the forward op's number and thread
    ev = op(EVAL + OUTPUT_NODE, 2, 300, 340, sequence_nr=6, fwd_thread=1)
    n = op(OUTPUT_NODE, 2, 301, 339, ev, scope=1, sequence_nr=6, fwd_thread=1)
    op("aten::mm", 2, 305, 330, n, kernels=[(BF16_GEMM, 400, 20)])
    ev = op(EVAL + "_LayerNormLinearBackward", 2, 350, 390, sequence_nr=5, fwd_thread=1)
    op("_LayerNormLinearBackward", 2, 351, 389, ev, scope=1, sequence_nr=5, fwd_thread=1,
       kernels=[(NVJET_FP8, 430, 25), (NVJET_FP8, 460, 25)])
    device(BF16_GEMM, 500, 510)  # linked to no op and in no range

    records = gpu_check.kernel_records(events, on_gpu=True)
    assert len(records) == 8 and not any(r.name in (LIN, OUT) for r in records)
    t = gpu_check.gemm_time(records)  # no node names: every backward GEMM placed by its link
    assert t.fp8_share == 1.0 and math.isclose(t.linear_gemm_s, 80e-6) and math.isclose(t.output_gemm_s, 60e-6)
    assert t.linear_gemm_by_route == pytest.approx({"range": 30e-6, "forward_link": 50e-6})
    assert math.isclose(t.other_gemm_s, 10e-6) and math.isclose(t.unattributed_s, 10e-6)
    assert math.isclose(t.other_kernel_s, 15e-6)  # the cast (in the linear layer) and attention
    cast = next(r for r in records if r.name == TE_CAST)
    assert cast.device_ranges == (LIN,) and gpu_check.kernel_role(cast, {}) == ("linear", "device_span")


def test_provider_and_qualname():
    assert gpu_check.provider("megatron.core.extensions.transformer_engine.TELayerNormColumnParallelLinear") \
        == "transformer_engine"
    assert gpu_check.provider("transformer_engine.pytorch.optimizers.fused_adam.FusedAdam") == "transformer_engine"
    assert gpu_check.provider("apex.optimizers.fused_adam.FusedAdam") == "apex"
    assert gpu_check.provider("torch.optim.adamw.AdamW") == "torch"
    assert gpu_check.provider("megatron.core.utils.local_multi_tensor_applier") == "torch"
    import torch

    assert gpu_check._qualname(json.dumps) == "json.dumps"
    assert gpu_check._qualname(torch.nn.RMSNorm(4)) == "torch.nn.modules.normalization.RMSNorm"


def test_synthetic_tokens_are_reproducible_and_follow_the_permutation():
    a = gpu_check.synthetic_tokens(4, 64, 512, seed=3)
    assert a.shape == (4, 64) and int(a.max()) < 512
    assert gpu_check.synthetic_tokens(4, 64, 512, seed=3).equal(a)
    pairs = {}
    for row in a.tolist():
        for x, y in zip(row, row[1:]):
            pairs.setdefault(x, []).append(y)
    # most successors of a token are one and the same token (its image under the permutation)
    follow = sum(max(ys.count(y) for y in ys) for ys in pairs.values()) / sum(len(ys) for ys in pairs.values())
    assert follow > 0.6


def test_shape_flags_override_the_defaults():
    args = gpu_check.parse_args(["--cpu-smoke", "--layers", "3", "--steps", "5"])
    v = gpu_check.shape_values(args)
    assert (v["layers"], v["steps"], v["hidden"]) == (3, 5, gpu_check.SMOKE_SHAPE["hidden"])
    assert gpu_check.shape_values(gpu_check.parse_args([]))["hidden"] == 2048
    with pytest.raises(SystemExit, match="must exceed"):
        gpu_check.shape_values(gpu_check.parse_args(["--steps", "3", "--warmup", "3"]))
    shape = gpu_check.build_shape(gpu_check.GPU_SHAPE)
    assert 0.9e9 < shape.model.num_parameters() < 1.1e9 and shape.tokens_per_step == 8192
    d = gpu_check.describe_shape(gpu_check.GPU_SHAPE, shape.model.num_parameters())
    assert d["description"] == "Llama 16L h2048 ffn5632 heads 16/16kv vocab 32000, 0.95B params, seq 2048"


# -- end to end ---------------------------------------------------------------------------

def _torch_only_site(root: Path) -> Path:
    """torch, what torch requires, and numpy (which torch images carry): what a bare GPU
    machine has, without megatron-core, omegaconf or PyYAML."""
    site = link_site(root, ["torch", "numpy"])
    assert not (site / "megatron").exists() and not (site / "omegaconf").exists()
    return site


@pytest.mark.skipif(platform.has_gpu(), reason="the CPU smoke run is what CI exercises")
def test_cpu_smoke_runs_end_to_end_from_the_bundle_in_an_interpreter_with_only_torch(tmp_path):
    """--make-bundle, then --cpu-smoke in ``python -I -S`` whose path holds the standard
    library and torch's own dependencies only: megatron-core, omegaconf and PyYAML must
    come from the bundle, and the whole CPU code path must run."""
    bundle = tmp_path / "bundle"
    res = run_tool("tools/gpu_check.py", "--make-bundle", bundle, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {p["distribution"] for p in manifest["packages"]} >= {"megatron-core", "omegaconf", "PyYAML", "packaging"}
    assert (bundle / "megatron-core" / "megatron" / "core" / "__init__.py").is_file()
    files = [f for f in bundle.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < gpu_check.BUNDLE_LIMIT_MB * 2 ** 20
    assert not [f for f in files if f.suffix in (".so", ".pyc") or "__pycache__" in f.parts]

    site, tool, out = _torch_only_site(tmp_path / "site"), str(REPO / "tools" / "gpu_check.py"), tmp_path / "r.json"
    code = (f"import importlib.util, runpy, sys; sys.path.append({str(site)!r}); "
            "assert importlib.util.find_spec('omegaconf') is None and importlib.util.find_spec('yaml') is None; "
            f"sys.argv = [{tool!r}, '--bundle', {str(bundle)!r}, '--cpu-smoke', '--out', {str(out)!r}]; "
            f"runpy.run_path({tool!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=240,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert "| train, local layers | ok |" in proc.stdout
    r = json.loads(out.read_text())
    assert r["mode"] == "cpu-smoke" and r["exit_code"] == 0 and r["setup_error"] is None
    env = r["environment"]
    assert env["megatron_core_path"].startswith(str(bundle))
    assert all(env["packages"][d].startswith("bundle") for d in ("megatron-core", "omegaconf", "PyYAML")), env

    items = r["items"]
    train = items["train_local"]
    assert train["status"] == "ok" and train["dtype"] == "bfloat16" and train["layers"] == "local"
    assert train["step_s"] > 0 and train["tokens_per_s"] > 0 and train["tflops"] > 0
    assert len(train["losses"]) == train["steps"] == 3 and all(math.isfinite(x) for x in train["losses"])
    assert train["timed_steps"] == 2 and train["mfu_vs_datasheet_bf16"] is None and train["mfu_vs_measured_gemm"] > 0
    # every GEMM of the linear layers (2 layers x QKV, projection, FC1, FC2 x forward, input
    # and weight gradients x 2 microbatches) and of the output layer found its module
    profile = train["profile"]
    assert (profile["linear_gemm_kernels"], profile["output_gemm_kernels"]) == (48, 6), profile
    assert profile["fp8_share"] == 0.0 and profile["fp8_gemm_kernels"] == 0 and profile["unattributed_s"] == 0
    assert train["kernels_in_use"]["optimizer"].startswith("torch.optim")
    assert r["kernels"]["train_local"]["qkv_linear"] == "torch"
    gen = items["generate"]
    assert gen["status"] == "ok" and gen["generated_tokens"] == 2 * 8 and "cuda_graphs" not in gen
    assert gen["decode_step_ms"] > 0 and gen["copy_bandwidth_gbs"] > 0
    assert gen["decode_step_vs_floor"] == pytest.approx(gen["decode_step_ms"] / gen["decode_floor_ms"], rel=0.02)
    assert items["gemm_probe"]["status"] == "ok" and items["gemm_probe"]["tflops"] > 0
    for name in ("train_te_bf16", "train_te_fp8", "fp8_loss_agreement", "fp8_gemms"):
        assert items[name]["status"] == "not run", name
        assert "Transformer Engine" in items[name]["reason"], name
    assert "none is visible" in items["train_te_fp8"]["reason"]


def test_an_installed_megatron_of_another_line_is_shadowed(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    installed = md.version("megatron-core")
    major, minor = map(int, installed.split(".")[:2])
    for version, shadowed in ((f"{major}.{minor}.99", False), (f"{major}.{minor + 1}.0", True)):
        (tmp_path / "manifest.json").write_text(json.dumps({"packages": [
            {"distribution": "megatron-core", "version": version, "modules": ["megatron"], "path": "megatron-core"},
            {"distribution": "PyYAML", "version": "0.1", "modules": ["yaml"], "path": "PyYAML"}]}))
        sources = gpu_check.use_bundle(tmp_path)
        assert sources["PyYAML"].startswith("installed")  # present here: the machine's own is used
        assert (str(tmp_path / "megatron-core") in sys.path) == shadowed
        assert sources["megatron-core"] == (f"bundle {version} (installed {installed} shadowed)" if shadowed
                                            else f"installed {installed}")


def test_hidden_module_imports_as_absent(tmp_path, monkeypatch):
    _package(tmp_path, "broken_kernels_pkg")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("broken_kernels_pkg")
    gpu_check._hide_module("broken_kernels_pkg")
    try:
        with pytest.raises(ImportError):
            importlib.import_module("broken_kernels_pkg")
    finally:
        sys.modules.pop("broken_kernels_pkg", None)


def test_fp8_meta_evidence_counts_modules_that_recorded_amax():
    import types

    import torch

    class FakeTE(torch.nn.Module):
        def __init__(self, fp8, amax):
            super().__init__()
            history = torch.zeros(4, 3)
            history[1, 0] = amax
            self.fp8 = fp8
            self.fp8_meta = {"scaling_fwd": types.SimpleNamespace(amax_history=history)} if fp8 else {}

    model = torch.nn.Sequential(FakeTE(True, 0.5), FakeTE(True, 0.0), FakeTE(False, 0.0), torch.nn.Linear(2, 2))
    assert gpu_check.fp8_meta_evidence([model]) == {"te_modules": 3, "ran_in_fp8": 2, "nonzero_amax_history": 1}


def test_kernels_summary_names_the_providers():
    items = {name: {"status": "not run"} for name in gpu_check.ITEMS}
    items["train_te_fp8"]["kernels_in_use"] = {
        "qkv_linear": "megatron.core.extensions.transformer_engine.TELayerNormColumnParallelLinear",
        "input_norm": "megatron.core.transformer.identity_op.IdentityOp",
        "optimizer": "apex.optimizers.fused_adam.FusedAdam"}
    assert gpu_check.kernels_summary(items) == {"train_te_fp8": {
        "qkv_linear": "transformer_engine", "input_norm": "fused into the next linear", "optimizer": "apex"}}
