"""Device and backend choice, and the CPU compatibility layer for megatron-core.

This is the only module that branches on "is there a GPU?". Everything else asks it:

    plat = platform.current()
    plat.device          # torch.device("cuda", local_rank) or torch.device("cpu")
    plat.backend         # "nccl" or "gloo"

megatron-core assumes CUDA in a few places. When (and only when) no GPU is present,
:func:`install_cpu_compat` patches exactly those places so that the same models, layouts
and pipeline schedules run on CPU processes talking over gloo. Each patch is listed in
``CPU_PATCHES`` with the reason it exists, and each has a test in
``tests/test_platform.py``. Installing is idempotent; on a GPU nothing is patched.

Patched behaviours (CPU only):

``device-literals``
    megatron code creates tensors with ``device="cuda"`` (the schedules' token counter,
    gradient clipping, the grad scaler, the default causal mask ...). The tensor factories
    (``torch.tensor``, ``zeros``, ``ones``, ``empty``, ``full``, ``arange``, ``rand*``, their
    ``*_like`` forms) and ``Tensor.to`` are wrapped to rewrite a CUDA device to CPU. Only
    these few calls pay for the wrapper; a ``TorchFunctionMode`` would tax every op (it
    cost ~15% of a decode step on the tiny model).
``current-device``
    ``torch.cuda.current_device()`` (RoPE, buffers, ...) returns ``"cpu"``.
``tensor-cuda``
    ``Tensor.cuda()`` returns the tensor itself.
``tensor-type-name``
    The optimizer asserts ``param.type() == 'torch.cuda.FloatTensor'``; ``Tensor.type()``
    without arguments reports the CUDA type name of a CPU tensor.
``rng``
    The tensor-parallel RNG tracker saves/restores "the CUDA RNG state": on CPU this is
    the default CPU generator. ``torch.cuda.manual_seed`` really seeds it (otherwise data
    parallel replicas start from different weights); ``torch.cuda.manual_seed_all`` stays
    a no-op because ``torch.manual_seed`` calls it (it would recurse).
``sync-and-events``
    ``torch.cuda.synchronize`` is a no-op; ``torch.cuda.Event`` is a wall-clock event
    (``perf_counter``) with ``record`` / ``elapsed_time`` / ``synchronize``.
``streams``
    ``torch.cuda.current_stream`` / ``Stream`` / ``stream`` return inert stand-ins, and
    ``torch.cuda.empty_cache`` is a no-op.
``inference-p2p``
    megatron's inference pipeline send/recv asserts ``tensor.is_cuda``; on CPU the
    assertion is dropped (gloo sends CPU tensors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = [
    "Platform",
    "current",
    "has_gpu",
    "install_cpu_compat",
    "cpu_compat_installed",
    "CPU_PATCHES",
    "get_rng_state",
    "set_rng_state",
    "cpu_has_amx",
    "transformer_engine_status",
    "resolve_dtype",
    "fp8_status",
    "require_transformer_engine",
    "Hardware",
    "Kernels",
    "detect_hardware",
    "nvidia_apex_status",
    "select_kernels",
    "kernel_problems",
    "models_problems",
    "job_problems",
    "find_c_compiler",
    "tune_cpu_allocator",
    "allocator_tuning_wanted",
    "decode_sync_interval",
]


def has_gpu() -> bool:
    """True when a CUDA device is usable by this process."""
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def decode_sync_interval() -> int:
    """Decode steps between the rollout engine's looks at which slots finished: each look
    waits for the device, free on CPU, a pipeline stall on a GPU (a finished slot then
    idles up to this many steps before it takes the next prompt)."""
    return 8 if has_gpu() else 1


def _quiet_expected_warnings() -> None:
    """megatron-core warns at import time that TE/apex are absent and about GPU tuning
    knobs; on a CPU machine that is the expected state, not news."""
    for pattern in (r".*(Apex|Transformer Engine)( and Apex)? (is|are) not installed.*",
                    r"When using async grad allreduce it is recommended",
                    r"full scope is deprecated"):
        warnings.filterwarnings("ignore", message=pattern)


# Deprecations inside megatron-core's checkpointing that users cannot act on.
warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating ShardedTensor")
warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated and will be removed")
if not has_gpu():
    _quiet_expected_warnings()


def cpu_has_amx() -> bool:
    """True when the CPU advertises AMX bf16 (bf16 matmuls then beat fp32 several-fold)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags


@dataclasses.dataclass(frozen=True)
class Platform:
    """Where this process computes and how it talks to its peers."""

    device: torch.device
    backend: str
    is_gpu: bool

    def describe(self) -> str:
        if self.is_gpu:
            name = torch.cuda.get_device_name(self.device)
            return f"{name} ({self.device}), backend {self.backend}"
        amx = "with AMX bf16" if cpu_has_amx() else "no AMX"
        return f"CPU ({amx}, {torch.get_num_threads()} threads), backend {self.backend}"

    def synchronize(self) -> None:
        if self.is_gpu:
            torch.cuda.synchronize(self.device)

    def max_memory_allocated(self) -> int:
        """Peak bytes allocated on the device (process peak RSS on CPU)."""
        if self.is_gpu:
            return torch.cuda.max_memory_allocated(self.device)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.lru_cache(maxsize=None)
def _current(local_rank: int) -> Platform:
    if has_gpu():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return Platform(device=device, backend="nccl", is_gpu=True)
    install_cpu_compat()
    tune_cpu_allocator()
    return Platform(device=torch.device("cpu"), backend="gloo", is_gpu=False)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
ALLOCATOR_ENV = "MEGARLHF_CPU_ALLOCATOR"


def allocator_tuning_wanted(environ=None) -> Tuple[bool, str]:
    """Whether :func:`tune_cpu_allocator` should change glibc malloc here, and why not.
    The user's own choices win: ``MEGARLHF_CPU_ALLOCATOR=default``, malloc tunables
    (``GLIBC_TUNABLES``, ``MALLOC_*`` variables) or a preloaded allocator (jemalloc,
    tcmalloc) leave it alone."""
    env = os.environ if environ is None else environ
    choice = env.get(ALLOCATOR_ENV, "tuned")
    if choice not in ("tuned", "default"):
        raise ValueError(f"{ALLOCATOR_ENV}={choice!r}: expected 'tuned' or 'default'")
    if choice == "default":
        return False, f"{ALLOCATOR_ENV}=default"
    if "malloc" in env.get("GLIBC_TUNABLES", ""):
        return False, "GLIBC_TUNABLES sets malloc parameters"
    mine = sorted(k for k in env if k.startswith("MALLOC_"))
    if mine:
        return False, f"{mine[0]} is set"
    if any(a in env.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return False, "another allocator is preloaded"
    return True, ""


@functools.lru_cache(maxsize=None)
def tune_cpu_allocator() -> str:
    """Keep freed host memory in the process instead of handing it back to the kernel.

    glibc's malloc serves blocks above its mmap threshold with fresh ``mmap`` pages and
    returns them on ``free``, and trims the top of its heap; a training step allocates and
    frees the same activation, logit and gradient blocks every time, so each step faults
    them in again and the kernel zeroes every page (measured on the tiny SFT step: ~120k-230k
    page faults and 0.25-0.4 s of kernel time per 2 s step; slower still with two ranks
    faulting side by side). With the mmap threshold at glibc's maximum (32 MiB), no trimming
    and a 256 MiB top pad, the same blocks are reused (~10k faults, 0.05 s). The price is
    memory: freed blocks stay with the process until it exits, and its peak RSS was 5-10%
    higher in the same measurements (tiny step ~1.10 -> ~1.20 GB, a 20.8M model's step
    ~1.83 -> ~1.93 GB).
    This is what the jemalloc/tcmalloc advice of CPU training guides buys, with glibc alone.
    Returns what was done (a reason when nothing was)."""
    wanted, why = allocator_tuning_wanted()
    if not wanted:
        return f"glibc malloc left as it is ({why})"
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "glibc malloc left as it is (no mallopt: not glibc)"
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 32 * 2 ** 20), (_M_TRIM_THRESHOLD, 2 ** 31 - 1), (_M_TOP_PAD, 256 * 2 ** 20)))
    return "glibc malloc tuned (mmap threshold 32 MiB, no trimming)" if ok else "glibc malloc: mallopt refused"


def current(local_rank: Optional[int] = None) -> Platform:
    """The platform for this process; on CPU this also installs the compatibility layer."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    return _current(local_rank)


def get_rng_state() -> torch.Tensor:
    """The accelerator's RNG state (the CPU generator's on CPU), for checkpoints."""
    if has_gpu():
        return torch.cuda.get_rng_state()
    return torch.get_rng_state()


def set_rng_state(state: torch.Tensor) -> None:
    if has_gpu():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def attention_upcast(x: torch.Tensor) -> bool:
    """Whether attention on ``x`` (queries that gradients will flow through) should run in
    fp32: torch's CPU flash-attention backward in bf16/fp16 is 3.5-6x slower than in fp32 at
    the short sequences of fine-tuning (measured: 8 x 40 tokens, 8 heads, 5.2 vs 0.9 ms
    forward and backward). Its forward in bf16 is the faster one, so generation keeps it."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.requires_grad
            and torch.is_grad_enabled())


def resolve_dtype(name: str) -> str:
    """``auto`` -> ``bfloat16`` where bf16 matrix units exist (GPUs; CPUs with AMX), else
    ``float32``; other names pass through."""
    if name != "auto":
        return name
    if has_gpu():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_amx() else "float32"


def transformer_engine_status() -> "tuple[bool, str]":
    """(usable, reason): Transformer Engine needs its package and a CUDA GPU."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        return False, "Transformer Engine is not installed (pip install 'megarlhf[gpu]')"
    if not has_gpu():
        return False, "Transformer Engine needs a CUDA GPU and none is visible"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # broken installs raise many kinds of errors
        return False, f"Transformer Engine is installed but cannot be imported: {e}"
    return True, "ok"


def fp8_status() -> "tuple[bool, str]":
    """(usable, reason): FP8 needs Transformer Engine and a GPU of compute capability 8.9+."""
    ok, reason = transformer_engine_status()
    if not ok:
        return False, reason
    problem = _fp8_hardware_problem(detect_hardware())
    return (False, problem) if problem else (True, "ok")


def require_transformer_engine(fp8: "Optional[str]", field: str = "model") -> None:
    """Raise a clear error before any model is built when TE/FP8 are asked for but absent."""
    select_kernels("transformer_engine", fp8, detect_hardware(), field)


def models_problems(models, hw: "Optional[Hardware]" = None) -> "list[str]":
    """Why the models a job will build (``{config prefix: ModelConfig}``, e.g.
    ``{"actor.model": ..., "reward.model": ...}``) cannot run on this machine (or ``hw``),
    each reason naming its key: checked before any process group exists."""
    wanted = [m for m in models.values()
              if m.transformer_impl != "local" or m.fp8 is not None or m.bias_activation_fusion]
    if not wanted:
        return []  # local layers run anywhere: no need to import Transformer Engine
    hw = hw or detect_hardware()
    problems: "list[str]" = []
    for prefix, m in models.items():
        problems += kernel_problems(m.transformer_impl, m.fp8, hw, prefix, m.bias_activation_fusion)
    return problems


def nvidia_apex_status() -> "tuple[bool, str]":
    """(usable, reason) for NVIDIA apex's fused kernels, found without importing apex.

    The PyPI package called ``apex`` is unrelated: NVIDIA's is told apart by its
    subpackages, and its fused kernels need the CUDA extensions (``amp_C``) built with it.
    """
    import importlib.util

    spec = importlib.util.find_spec("apex")
    if spec is None:
        return False, "apex is not installed"
    locations = list(spec.submodule_search_locations or [])
    if not any(os.path.isdir(os.path.join(loc, sub)) for loc in locations
               for sub in ("transformer", "normalization")):
        return False, "the installed 'apex' is not NVIDIA apex (no apex.transformer or apex.normalization)"
    if importlib.util.find_spec("amp_C") is None:
        return False, "NVIDIA apex is installed without its CUDA extensions (no amp_C)"
    return True, "ok"


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What a model build can use on this machine. :func:`detect_hardware` reads it; tests
    write it by hand, so every branch of :func:`select_kernels` runs on a CPU."""

    gpu: Optional[str] = None
    """CUDA device name; None when no GPU is visible."""
    capability: Tuple[int, int] = (0, 0)
    """CUDA compute capability (major, minor); (0, 0) without a GPU."""
    transformer_engine: str = "Transformer Engine is not installed"
    """``ok`` when Transformer Engine imports and has a GPU, else why it cannot be used."""
    nvidia_apex: bool = False
    """NVIDIA apex with its CUDA extensions is installed."""
    c_compiler: Optional[str] = None
    """Path of the C compiler Triton builds its launchers with (``$CC``, else ``cc``,
    ``gcc`` or ``clang`` on the PATH); None when there is none."""
    triton: bool = False
    """Triton (torch.compile's GPU code generator) is installed."""


def find_c_compiler(environ=None) -> Optional[str]:
    """The C compiler Triton would use: ``$CC`` if set (and found), else the first of
    ``cc``, ``gcc``, ``clang`` on the PATH."""
    import shutil

    env = os.environ if environ is None else environ
    for name in ([env["CC"]] if env.get("CC") else ["cc", "gcc", "clang"]):
        path = shutil.which(name, path=env.get("PATH"))
        if path:
            return path
    return None


def detect_hardware() -> Hardware:
    """This machine's :class:`Hardware` (imports Transformer Engine when it is installed)."""
    import importlib.util

    te = transformer_engine_status()[1]
    apex = nvidia_apex_status()[0]
    tools = dict(c_compiler=find_c_compiler(), triton=importlib.util.find_spec("triton") is not None)
    if not has_gpu():
        return Hardware(transformer_engine=te, nvidia_apex=apex, **tools)
    return Hardware(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                    transformer_engine=te, nvidia_apex=apex, **tools)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Which implementation a model build runs on."""

    layers: str
    """``transformer_engine`` (TE layer spec: fused norm+linear, fused attention) or
    ``local`` (torch layers)."""
    fp8: Optional[str]
    """FP8 recipe inside the TE layers (``hybrid``: E4M3 forward, E5M2 backward; delayed
    scaling), or None: the GEMMs run in the parameter dtype."""
    fused: str
    """Who supplies megatron-core's fused Adam and multi-tensor kernels (gradient
    clipping, scaling): ``transformer_engine``, ``apex`` or ``torch``. megatron-core
    imports them in that order of preference; this names what it will find."""


def _fp8_hardware_problem(hw: Hardware) -> Optional[str]:
    if hw.gpu is None:
        return "FP8 needs a CUDA GPU of compute capability 8.9 or newer (Ada/Hopper) and none is visible"
    if tuple(hw.capability) < (8, 9):
        major, minor = hw.capability
        return (f"FP8 needs compute capability 8.9 or newer (Ada/Hopper); this GPU "
                f"({hw.gpu}) is {major}.{minor}")
    return None


def kernel_problems(transformer_impl: str, fp8: Optional[str], hw: Hardware, field: str = "model",
                    bias_activation_fusion: bool = False) -> "list[str]":
    """Why a model configured so cannot run on ``hw`` (each reason names its field), or
    nothing: FP8 on a CPU, without Transformer Engine or on a GPU older than Ada/Hopper;
    TE without TE or a GPU; a fused activation compiled at run time without a GPU, Triton
    or a C compiler."""
    problems = []
    if transformer_impl not in ("local", "transformer_engine"):
        problems.append(f"{field}.transformer_impl={transformer_impl!r}: expected 'local' or "
                        "'transformer_engine'")
    te_ok = hw.transformer_engine == "ok"
    if transformer_impl == "transformer_engine" and not te_ok:
        problems.append(f"{field}.transformer_impl='transformer_engine' cannot be used: "
                        f"{hw.transformer_engine}")
    if fp8 not in (None, "hybrid", "e4m3"):
        problems.append(f"{field}.fp8={fp8!r}: expected 'hybrid', 'e4m3' or null")
    elif fp8 is not None:
        if transformer_impl == "local":
            problems.append(f"{field}.fp8={fp8!r} needs {field}.transformer_impl='transformer_engine' "
                            "(got 'local')")
        hw_problem = _fp8_hardware_problem(hw)
        if hw_problem:
            problems.append(f"{field}.fp8={fp8!r} cannot be used: {hw_problem}")
    if bias_activation_fusion:
        missing = [what for what, ok in (("a CUDA GPU", hw.gpu is not None), ("Triton", hw.triton),
                                         ("a C compiler ($CC, cc, gcc or clang on the PATH)",
                                          hw.c_compiler is not None)) if not ok]
        if missing:
            problems.append(f"{field}.bias_activation_fusion=true compiles its kernel at run time "
                            f"(torch.compile with Triton) and this node lacks {' and '.join(missing)}: "
                            f"set {field}.bias_activation_fusion=false")
    return problems


def select_kernels(transformer_impl: str, fp8: Optional[str], hw: Hardware,
                   field: str = "model", bias_activation_fusion: bool = False) -> Kernels:
    """The kernels a model configured with ``transformer_impl`` and ``fp8`` runs on ``hw``.

    Pure: raises ``RuntimeError`` naming the fields and listing every reason when the
    configuration cannot run there (:func:`kernel_problems`), instead of falling back to
    something else silently.
    """
    problems = kernel_problems(transformer_impl, fp8, hw, field, bias_activation_fusion)
    if problems:
        raise RuntimeError("; ".join(problems))
    te_ok = hw.transformer_engine == "ok"
    fused = "transformer_engine" if te_ok else "apex" if hw.nvidia_apex and hw.gpu else "torch"
    return Kernels(layers=transformer_impl, fp8=fp8, fused=fused)


def job_problems(cfg, hw: "Optional[Hardware]" = None) -> "list[str]":
    """What stops a job from running here, found before any process starts: every model
    the job config builds (its ``resolved_models()``, keyed by config prefix) checked
    against this machine's kernels (:func:`models_problems`), and, for models that share
    processes (``process_groups()``: all of them unless the config says otherwise),
    Transformer Engine's process-wide attention choice."""
    from megarlhf.config import shared_process_problems

    models = cfg.resolved_models()
    groups = cfg.process_groups() if hasattr(cfg, "process_groups") else [list(models)]
    problems = models_problems(models, hw)
    for group in groups:
        problems += shared_process_problems({key: models[key] for key in group})
    return problems


# --------------------------------------------------------------------------------------
# The CPU compatibility layer
# --------------------------------------------------------------------------------------

_INSTALLED: Dict[str, bool] = {}


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return False


def _cpu_device(dev):
    return "cpu" if _is_cuda_device(dev) else dev


def _redirect_device_kwarg(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    wrapper.__megarlhf_wrapped__ = fn
    return wrapper


_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
              "randint", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
              "randn_like", "eye", "linspace", "empty_strided")
_ORIG_TENSOR_TO = torch.Tensor.to


def _tensor_to(self, *args, **kwargs):
    if args and _is_cuda_device(args[0]):
        args = ("cpu",) + args[1:]
    dev = kwargs.get("device")
    if dev is not None and _is_cuda_device(dev):
        kwargs["device"] = "cpu"
    return _ORIG_TENSOR_TO(self, *args, **kwargs)


class _WallClockEvent:
    """Stand-in for ``torch.cuda.Event`` measuring host wall-clock time (milliseconds)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess=False):
        self._t: Optional[float] = None

    def record(self, stream=None) -> None:
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_WallClockEvent") -> float:
        if self._t is None or end._t is None:
            raise RuntimeError("Event.elapsed_time: both events must be recorded first")
        return (end._t - self._t) * 1000.0


class _InertStream:
    """Stand-in for a CUDA stream: work on CPU is synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        event = event or _WallClockEvent()
        event.record()
        return event

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_ORIG_TENSOR_TYPE = torch.Tensor.type


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs:
        name = _ORIG_TENSOR_TYPE(self)
        if self.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
            return "torch.cuda." + name[len("torch."):]
        return name
    return _ORIG_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _patch_device_literals() -> None:
    # ``with torch.device(...)`` (meta-device model builds) recognises tensor factories by
    # identity, from a set torch computes once and caches: compute it with the original
    # functions, before they are wrapped, or the context would ignore every factory call.
    from torch.utils import _device

    _device._device_constructors()
    for name in _FACTORIES:
        fn = getattr(torch, name)
        if not hasattr(fn, "__megarlhf_wrapped__"):
            setattr(torch, name, _redirect_device_kwarg(fn))
    torch.Tensor.to = _tensor_to  # type: ignore[assignment]


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


def _patch_tensor_cuda() -> None:
    def _cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        return self

    torch.Tensor.cuda = _cuda  # type: ignore[assignment]


def _patch_tensor_type_name() -> None:
    torch.Tensor.type = _tensor_type  # type: ignore[assignment]


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def _get(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = _get
    mrandom._set_cuda_rng_state = _set
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)  # type: ignore
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state  # type: ignore
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state  # type: ignore
    # torch.manual_seed calls torch.cuda.manual_seed_all: that must stay a no-op.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # type: ignore
    torch.cuda.manual_seed_all = lambda seed: None  # type: ignore


def _patch_sync_and_events() -> None:
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.cuda.Event = _WallClockEvent  # type: ignore[assignment,misc]


def _patch_streams() -> None:
    stream = _InertStream()
    torch.cuda.current_stream = lambda device=None: stream  # type: ignore[assignment]
    torch.cuda.default_stream = lambda device=None: stream  # type: ignore[assignment]
    torch.cuda.Stream = _InertStream  # type: ignore[assignment,misc]
    torch.cuda.stream = lambda s=None: contextlib.nullcontext(s)  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]


def _patch_inference_p2p() -> None:
    from megatron.core.inference import communication_utils as cu

    def _check_tensor(tensor):  # the original asserts tensor.is_cuda
        pass

    for name in ("_is_cuda", "_check_is_cuda"):
        if hasattr(cu, name):
            setattr(cu, name, _check_tensor)


CPU_PATCHES: Dict[str, Callable[[], None]] = {
    "device-literals": _patch_device_literals,
    "current-device": _patch_current_device,
    "tensor-cuda": _patch_tensor_cuda,
    "tensor-type-name": _patch_tensor_type_name,
    "rng": _patch_rng,
    "sync-and-events": _patch_sync_and_events,
    "streams": _patch_streams,
    "inference-p2p": _patch_inference_p2p,
}


def install_cpu_compat() -> None:
    """Install every CPU patch once. Refuses on a machine with a usable GPU."""
    if has_gpu():
        raise RuntimeError("install_cpu_compat() called on a machine with a GPU; nothing to patch")
    for name, patch in CPU_PATCHES.items():
        if not _INSTALLED.get(name):
            patch()
            _INSTALLED[name] = True


def cpu_compat_installed() -> bool:
    return all(_INSTALLED.get(name) for name in CPU_PATCHES)
