"""Memory per GPU and predicted step time of a PPO layout (pure arithmetic, no torch).

The memory model is the one written out by hand in docs/slurm.md, here for any shape:

* weights in bf16 (2 bytes per parameter), megatron's fp32 gradient buffer (4 bytes) for
  trainable roles, fp32 master weights and Adam's two moments (12 bytes) sharded over DP
  with the distributed optimizer;
* training activations per layer and sequence of ``s`` tokens (Korthikanti et al. 2022):
  ``s h (10 + 24/TP)`` bytes, plus ``5 a s^2 / TP`` for the attention scores that local
  (unfused) attention keeps; selective recomputation drops the scores, full recomputation
  keeps each layer's input (``2 s h``) and one layer's working set; the first pipeline
  stage holds ``min(PP, microbatches)`` microbatches of its layers in flight;
* the fp32 logits of a microbatch (three copies: logits, softmax, gradient), over TP;
* the KV cache of generation: K and V, bf16, per token in flight;
* per role, FP8 (Transformer Engine, delayed scaling, bf16 parameters) where
  :class:`Precision` says so: the cached FP8 copies of the layers' GEMM weights and the
  amax/scale state are resident, some saved GEMM inputs shrink to 1 byte, and the layers'
  GEMMs run at the FP8 peak (see :func:`fp8_weight_bytes`, :func:`activation_coefficients`).

The step time adds the phases of a PPO step as the recipe runs them one after the other:
generation (prefill at the stated MFU; each decode step bound by reading the weights and
the KV cache from HBM at the stated efficiency, plus a fixed per-step overhead and TP
latency), scoring, the three policy-side forward passes, and the actor and critic updates
(at the stated MFU, with the pipeline bubble, TP all-reduces and the DP gradient
reduction at stated bandwidths, none overlapped with compute). Every assumption is a
field of :class:`Assumptions` and is printed with the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megarlhf.config.model import ModelConfig
from megarlhf.perf.flops import forward_flops_per_token, matmul_params

__all__ = ["Gpu", "GPUS", "Layout", "Workload", "Assumptions", "Precision", "ROLES", "RoleMemory",
           "role_memory", "stage_parameters", "gemm_parameters", "fp8_weight_bytes", "fp8_meta_bytes",
           "activation_coefficients", "Models", "SideTimes", "predict_sweep", "ppo_step_time", "Candidate",
           "plan_ppo", "training_step_time"]

GB = 1e9


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    """Device memory in 10^9 bytes."""
    bf16_tflops: float
    """Dense bf16 peak from the datasheet."""
    hbm_gbs: float
    """Memory bandwidth, GB/s."""
    intra_gbs: float
    """All-reduce bus bandwidth per GPU inside a node (NVLink), GB/s."""
    inter_gbs: float
    """Network bandwidth per GPU between nodes (InfiniBand), GB/s."""
    fp8_tflops: Optional[float] = None
    """Dense FP8 peak from the datasheet; None: the GPU has no FP8 tensor cores."""


# memory_gb: what the driver reports (nvidia-smi's MiB x 2^20, in 10^9 bytes): an "80GB"
# H100 has 81,559 MiB = 85.5 GB. Datasheet peaks are dense (no sparsity).
GPUS: Dict[str, Gpu] = {
    "h100-80g": Gpu("H100 SXM 80GB", 85.5, 989, 3350, 450, 50, 1979),
    "h200-141g": Gpu("H200 141GB", 150.1, 989, 4800, 450, 50, 1979),
    "a100-80g": Gpu("A100 SXM 80GB", 85.1, 312, 2039, 300, 25),
    "a100-40g": Gpu("A100 SXM 40GB", 42.4, 312, 1555, 300, 25),
}


@dataclass(frozen=True)
class Layout:
    """TP x PP x DP; one process (GPU) per model shard and replica."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    devices = gpus

    @property
    def name(self) -> str:
        return f"tp{self.tp}pp{self.pp}dp{self.dp}"

    def __str__(self) -> str:
        return f"TP{self.tp} PP{self.pp} DP{self.dp}"


@dataclass(frozen=True)
class Workload:
    """One PPO step (defaults: examples/ppo_13b_70b_rm.yaml)."""

    rollouts: int = 512
    """Sequences generated per step (prompts x samples per prompt)."""
    prompt_len: int = 1024
    response_len: int = 1024
    gen_batch: int = 64
    """Sequences one actor replica decodes at once (``rollout.max_batch``)."""
    micro_batch: int = 2
    minibatch: int = 64
    """Sequences per optimizer step."""
    ppo_epochs: int = 1

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len


@dataclass(frozen=True)
class Assumptions:
    mfu: float = 0.40
    """Share of the bf16 peak that training and forward passes reach."""
    fp8_mfu: float = 0.28
    """Share of the FP8 peak that the GEMMs of FP8 layers reach: 0.28 x 1,979 = 554 TFLOP/s
    on an H100, 1.4x the bf16 GEMMs at ``mfu`` (396), not 2x: the casts to FP8, the weight
    transposes and the amax bookkeeping of delayed scaling cost time, and a 13B model's
    GEMMs split over TP=8 are small. An assumption until measured (tools/gpu_check.py
    measures bf16 and FP8 MFU on one GPU)."""
    hbm_efficiency: float = 0.60
    """Share of the memory bandwidth a decode step reaches."""
    comm_efficiency: float = 0.70
    """Share of the link bandwidth a large all-reduce reaches."""
    decode_overhead_ms: float = 10.0
    """Fixed cost per decode step (kernel launches, sampling, Python): megatron eager
    decoding; engines with CUDA graphs (TensorRT-LLM, vLLM) come close to 1 ms."""
    collective_latency_us: float = 15.0
    """Latency of one small collective (the TP all-reduces of a decode step)."""
    attention: str = "local"
    """``local`` attention keeps the score matrices for backward; ``fused`` (flash,
    Transformer Engine) does not."""
    recompute: Optional[str] = None
    """Activation recomputation of the trainable roles: none, ``selective`` or ``full``."""
    distributed_optimizer: bool = True
    reserve_gb: float = 8.0
    """Per GPU for the CUDA context, NCCL buffers and allocator fragmentation."""


ROLES = ("actor", "reference", "critic", "reward")
"""The PPO roles whose precision can be set (the reference has the actor's shape)."""


@dataclass(frozen=True)
class Precision:
    """Compute precision of each role's Transformer Engine layers: ``bf16`` or ``fp8``
    (``model.fp8: hybrid`` or ``e4m3``: delayed scaling, parameters still bf16 with fp32
    master weights in the optimizer; FP8 is a compute mode, no FP8 primary weights).
    Generation always runs the actor in bf16 (FP8 is switched off while decoding), so the
    KV cache and the decode steps do not depend on it; the actor's old log-probs are a
    forward pass of the training model and run in the actor's precision."""

    actor: str = "bf16"
    reference: str = "bf16"
    critic: str = "bf16"
    reward: str = "bf16"

    def __post_init__(self) -> None:
        for role in ROLES:
            if getattr(self, role) not in ("bf16", "fp8"):
                raise ValueError(f"Precision.{role}={getattr(self, role)!r}: expected 'bf16' or 'fp8'")

    @classmethod
    def with_fp8(cls, roles) -> "Precision":
        """FP8 for the named roles, bf16 for the others."""
        roles = set(roles)
        unknown = roles - set(ROLES)
        if unknown:
            raise ValueError(f"unknown role(s) {sorted(unknown)}: expected some of {', '.join(ROLES)}")
        return cls(**{r: "fp8" if r in roles else "bf16" for r in ROLES})

    def fp8(self, role: str) -> bool:
        return getattr(self, role) == "fp8"

    @property
    def any_fp8(self) -> bool:
        return any(self.fp8(r) for r in ROLES)

    def __str__(self) -> str:
        return ", ".join(f"{r} {getattr(self, r)}" for r in ROLES) + "; generation bf16"


def stage_parameters(cfg: ModelConfig, pp: int, head_rows: Optional[int] = None) -> int:
    """Parameters of the largest pipeline stage (before TP): its layers and, on the first
    stage, the embedding, on the last the output head (``head_rows``: the vocabulary, 1
    for a scalar head)."""
    h = cfg.hidden_size
    layer = (matmul_params(cfg, head_outputs=0) // cfg.num_layers) + 2 * h
    per_stage = math.ceil(cfg.num_layers / pp) * layer
    emb = cfg.vocab_size * h
    head = h * (cfg.vocab_size if head_rows is None else head_rows) + h
    if pp == 1:
        return per_stage + emb + head
    return per_stage + max(emb, head)


def gemm_parameters(cfg: ModelConfig, pp: int) -> int:
    """Parameters of the transformer layers' GEMMs (QKV, attention output, the SwiGLU MLP's
    two linears) on the largest pipeline stage, before TP: the weights that Transformer
    Engine's linear layers quantize to FP8. The embedding, the norms and the output head
    (megatron's own ColumnParallelLinear, or a scalar head) stay bf16."""
    return math.ceil(cfg.num_layers / pp) * (matmul_params(cfg, head_outputs=0) // cfg.num_layers)


# FP8 tensors with amax/scale state per transformer layer under delayed scaling: each TE
# linear (QKV and fc1 with their fused norm: LayerNormLinear; attention output and fc2:
# Linear) has 3 forward (input, weight, output) and 2 backward (grad output, grad input)
# per GEMM, and TE's DotProductAttention allocates the same for 3 GEMMs whenever FP8 is on,
# even when the attention itself runs in bf16 (module/base.py: set_meta_tensor; attention/
# dot_product_attention/dot_product_attention.py: DotProductAttention.forward enters
# prepare_forward_ctx(num_gemms=3)).
_FP8_TENSORS_PER_LAYER = 4 * (3 + 2) + 3 * (3 + 2)


def fp8_weight_bytes(cfg: ModelConfig, lay: Layout, trainable: bool) -> float:
    """Bytes per GPU of the FP8 weight copies that Transformer Engine keeps for a role run
    in FP8 with bf16 parameters: ``2 x gemm_parameters / TP`` for a trainable role, ``1 x``
    for a frozen one (forward passes only).

    Source (transformer_engine/pytorch): ``Linear.forward`` (module/linear.py; also
    ``LayerNormLinear.forward``) caches the quantized weight in ``self._fp8_workspaces
    ["weight"]`` whenever ``is_first_microbatch`` is not None, and re-quantizes into it in
    place on the first microbatch (``quantize_weight`` in module/base.py). megatron-core
    passes ``is_first_microbatch`` (True once, then False; the schedules' forward_step
    calls ``set_is_first_microbatch()`` on microbatch 0 of every forward-backward or
    forward-only call: extensions/transformer_engine.py ``TELinear.forward``,
    pipeline_parallel/schedules.py) unless ``disable_parameter_transpose_cache`` is set,
    which megarlhf does not. So the copy is a resident cache, one per module, kept across
    microbatches and steps, and nothing frees it while the actor decodes in bf16. The
    tensor saved for backward is that same workspace, not another copy. With gradients
    enabled the weight quantizer asks for row-wise and column-wise usage; a delayed-scaling
    ``Float8Quantizer`` on Hopper allocates the FP8 data (1 byte per element) and a separate
    FP8 transpose (1 byte) (csrc/quantizer.cpp ``Float8Quantizer::create_tensor``:
    ``with_transpose = columnwise_usage && !nvte_is_non_tn_fp8_gemm_supported()``).
    Under ``torch.no_grad`` (the reference; forward-only passes) only the row-wise data is
    made. A trainable role's no-grad forwards (old log-probs, values) reuse its two-part
    workspace (``_is_weight_workspace_valid`` only rejects a missing transpose), so it
    keeps 2 bytes. Blackwell needs no separate transpose: 1 byte would do there; the 2
    bytes counted here are the larger, Hopper figure."""
    per_param = 2 if trainable else 1
    return per_param * gemm_parameters(cfg, lay.pp) / lay.tp


def fp8_meta_bytes(cfg: ModelConfig, lay: Layout) -> float:
    """Bytes per GPU of delayed scaling's state for a role run in FP8: per FP8 tensor a
    float32 scale and an amax history of ``cfg.fp8_amax_history_len`` float32 values
    (``DelayedScalingRecipeState``: ``scale [n]``, ``amax_history [len, n]``, in
    transformer_engine/pytorch/quantization.py), 35 tensors per layer (see
    ``_FP8_TENSORS_PER_LAYER``), not sharded over TP. For a 40-layer stage with a history of
    1,024: 40 x 35 x 1,025 x 4 B = 5.7 MB, negligible; the amax reduction's buffers hold
    views of the same tensors."""
    layers = math.ceil(cfg.num_layers / lay.pp)
    return layers * _FP8_TENSORS_PER_LAYER * (cfg.fp8_amax_history_len + 1) * 4


def activation_coefficients(fp8: bool, attention: str) -> Tuple[int, int]:
    """``(c, d)`` of the saved activations of one layer, ``s h (c + d / TP)`` bytes (plus the
    local attention's scores, which FP8 does not change).

    bf16: ``(10, 24)`` (Korthikanti et al. 2022, Table 2, without sequence parallelism).
    Not split over TP: the two norms' inputs (2 + 2), the inputs of the QKV and fc1 GEMMs,
    i.e. the norms' outputs (2 + 2), two dropout masks (1 + 1). Split: Q and K (4), V (2),
    the attention output projection's input (2), the activation function's input (8) and
    fc2's input (8).

    FP8 (Transformer Engine layers, delayed scaling, attention in bf16 as megatron's
    ``fp8_dot_product_attention`` is off by default):

    * a GEMM input is saved for the weight gradient as FP8, 1 byte, column-wise only (the
      row-wise copy is dropped once the forward GEMM is done): module/linear.py
      ``_linear_forward`` (``inputmat.update_usage(rowwise_usage=False,
      columnwise_usage=True)``), module/layernorm_linear.py ``_LayerNormLinear.forward``
      (``ln_out.update_usage(rowwise_usage=False)``; the norm writes FP8 directly,
      ``with_quantized_norm``). So the QKV and fc1 inputs 2 -> 1 each (c: 10 -> 8), and fc2's
      input 8 -> 4;
    * the norms' inputs stay bf16 (``_LayerNormLinear`` saves ``inputmat`` for the norm's
      backward, with ``rsigma``: 4 bytes per token, not counted); the SwiGLU's input is
      fc1's bf16 output, saved by megatron's fused activation, unchanged; Q, K, V stay bf16;
    * the attention output projection's input becomes a 1-byte FP8 copy, but TE's fused
      attention saves its own bf16 output ``O`` for its backward (attention/
      dot_product_attention/backends.py ``FusedAttnFunc.forward``: ``f16_tensors = (q, k,
      v, out_f16)``). In bf16 those are one tensor counted once; in FP8 they are two:
      2 -> 1 + 2 = 3 with fused attention, 2 -> 1 with local attention (its bmm keeps the
      probabilities and V, not O). megatron's ``save_original_input``, which would reuse
      ``O``, is set only for multi-latent attention and TE refuses it with delayed scaling.
      Selective recomputation may drop ``O``; the larger figure is kept.

    So FP8: ``(8, 21)`` with fused attention, ``(8, 19)`` with local attention. The
    dropout masks stay in, as in the bf16 count (Llama's dropout is 0: conservative)."""
    if not fp8:
        return 10, 24
    return 8, (21 if attention == "fused" else 19)


@dataclass(frozen=True)
class RoleMemory:
    """Bytes per GPU of one role."""

    weights: float
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    """Training activations and logits of the update (trainable roles)."""
    kv_cache: float = 0.0
    """Generation (the actor)."""
    forward: float = 0.0
    """Working set of a forward pass without gradients (frozen roles): one layer's
    activations of a microbatch and its output."""
    fp8_weights: float = 0.0
    """FP8 copies of the layers' GEMM weights cached by Transformer Engine (FP8 roles):
    resident, see :func:`fp8_weight_bytes`."""
    fp8_meta: float = 0.0
    """Scales and amax histories of delayed scaling (FP8 roles): resident."""

    @property
    def resident(self) -> float:
        return self.weights + self.fp8_weights + self.fp8_meta + self.gradients + self.optimizer


def _activations(cfg: ModelConfig, lay: Layout, w: Workload, a: Assumptions, vocab_rows: int,
                 fp8: bool = False) -> float:
    s, h, heads = w.seq_len, cfg.hidden_size, cfg.num_attention_heads
    c, d = activation_coefficients(fp8, a.attention)
    per_layer = s * h * (c + d / lay.tp)
    if a.attention == "local" and a.recompute is None:
        per_layer += 5 * heads * s * s / lay.tp
    layers = math.ceil(cfg.num_layers / lay.pp)
    micro_per_replica = max(1, w.minibatch // (lay.dp * w.micro_batch))
    in_flight = min(lay.pp, micro_per_replica)
    if a.recompute == "full":
        # each layer's input is the bf16 residual stream, in FP8 as in bf16
        kept = 2 * s * h * layers * in_flight + per_layer
    else:
        kept = per_layer * layers * in_flight
    logits = 3 * 4 * s * vocab_rows / lay.tp
    return w.micro_batch * (kept + logits)


def role_memory(cfg: ModelConfig, lay: Layout, w: Workload, a: Assumptions, trainable: bool,
                scalar_head: bool, generates: bool = False, fp8: bool = False) -> RoleMemory:
    """Bytes per GPU of one role on the largest pipeline stage. ``fp8``: the role's layers
    run Transformer Engine FP8 (:class:`Precision`); the KV cache is bf16 either way, as
    generation runs in bf16."""
    head_rows = 1 if scalar_head else cfg.vocab_size
    p = stage_parameters(cfg, lay.pp, head_rows) / lay.tp
    fp8_w = fp8_weight_bytes(cfg, lay, trainable) if fp8 else 0.0
    fp8_m = fp8_meta_bytes(cfg, lay) if fp8 else 0.0
    if not trainable:
        s, h = w.seq_len, cfg.hidden_size
        # The bf16 count of everything a layer saves for backward bounds a no-grad layer's
        # live tensors; it is kept for FP8 too, where the FP8 copies of GEMM inputs are
        # transient beside their bf16 originals (the larger figure).
        layer = s * h * (10 + 24 / lay.tp)
        if a.attention == "local":
            layer += 5 * cfg.num_attention_heads * s * s / lay.tp
        out = 4 * s * head_rows / lay.tp
        return RoleMemory(weights=2 * p, forward=w.micro_batch * (layer + out), fp8_weights=fp8_w,
                          fp8_meta=fp8_m)
    opt = 12 * p / (lay.dp if a.distributed_optimizer else 1)
    kv = 0.0
    if generates:
        kv_per_token = 2 * math.ceil(cfg.num_layers / lay.pp) * cfg.num_query_groups * cfg.kv_channels / lay.tp * 2
        kv = w.gen_batch * w.seq_len * kv_per_token
    return RoleMemory(weights=2 * p, gradients=4 * p, optimizer=opt,
                      activations=_activations(cfg, lay, w, a, head_rows, fp8), kv_cache=kv,
                      fp8_weights=fp8_w, fp8_meta=fp8_m)


def _bubble(pp: int, microbatches: int) -> float:
    """Time factor of a 1F1B pipeline: (m + p - 1) / m."""
    return (microbatches + pp - 1) / microbatches if pp > 1 else 1.0


def _allreduce_s(nbytes: float, n: int, gbs: float, a: Assumptions) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (gbs * GB * a.comm_efficiency)


@dataclass
class SideTimes:
    phases: Dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.phases.values())


def _compute_s(cfg: ModelConfig, tokens: float, seq_len: int, passes: float, head: Optional[int],
               gpus: int, gpu: Gpu, a: Assumptions, fp8: bool) -> float:
    """Seconds of ``passes`` forward-equivalents over ``tokens`` tokens on ``gpus`` GPUs,
    without the pipeline bubble. bf16: model FLOPs at ``mfu`` of the bf16 peak. FP8: the
    layers' GEMMs (``2 x gemm_parameters`` per token and pass: forward, and in backward
    the data- and weight-gradient GEMMs, FP8 too in Transformer Engine) at ``fp8_mfu`` of
    the FP8 peak; the attention scores (bf16: ``fp8_dot_product_attention`` off) and the
    output head (megatron's own linear, not TE) at ``mfu`` of the bf16 peak."""
    flops = tokens * passes * forward_flops_per_token(cfg, seq_len, head)
    if not fp8:
        return flops / (gpus * gpu.bf16_tflops * 1e12 * a.mfu)
    if gpu.fp8_tflops is None:
        raise ValueError(f"{gpu.name} has no FP8 tensor cores: run every role in bf16")
    gemm = tokens * passes * 2 * gemm_parameters(cfg, 1)
    return (gemm / (gpu.fp8_tflops * 1e12 * a.fp8_mfu)
            + (flops - gemm) / (gpu.bf16_tflops * 1e12 * a.mfu)) / gpus


def training_step_time(cfg: ModelConfig, lay: Layout, gpu: Gpu, a: Assumptions, sequences: int,
                       seq_len: int, micro_batch: int, gpus_per_node: int, scalar_head: bool = False,
                       activation_bytes: int = 2, fp8: bool = False) -> Dict[str, float]:
    """One optimizer step over ``sequences`` sequences: compute (with the pipeline bubble),
    TP all-reduces, the DP gradient reduction. Seconds per part. ``fp8``: the layers' GEMMs
    at the FP8 rate (:func:`_compute_s`); the TP all-reduces stay bf16 (TE's row-parallel
    output is in the activation dtype) and the gradients fp32."""
    head = 1 if scalar_head else None
    passes = 4.0 if a.recompute == "full" else 3.0  # full recomputation runs the forward twice
    micro = max(1, sequences // (lay.dp * micro_batch))
    compute = (_compute_s(cfg, sequences * seq_len, seq_len, passes, head, lay.gpus, gpu, a, fp8)
               * _bubble(lay.pp, micro))
    tp_bytes = micro_batch * seq_len * cfg.hidden_size * activation_bytes
    layers = math.ceil(cfg.num_layers / lay.pp)
    tp = 4 * layers * micro * _allreduce_s(tp_bytes, lay.tp, gpu.intra_gbs, a) if lay.tp > 1 else 0.0
    grads = 4 * stage_parameters(cfg, lay.pp, 1 if scalar_head else None) / lay.tp
    link = gpu.intra_gbs if lay.gpus <= gpus_per_node else gpu.inter_gbs
    dp = _allreduce_s(grads, lay.dp, link, a)
    return {"compute": compute, "tp_comm": tp, "dp_comm": dp}


def _forward_s(cfg, gpus: int, lay: Layout, gpu: Gpu, a: Assumptions, tokens: float, seq_len: int,
               micro: int, scalar_head: bool, fp8: bool = False) -> float:
    """A forward pass over ``tokens`` tokens on ``gpus`` GPUs: compute with the pipeline
    bubble, plus the TP all-reduces (two per layer) of each replica's share."""
    compute = (_compute_s(cfg, tokens, seq_len, 1.0, 1 if scalar_head else None, gpus, gpu, a, fp8)
               * _bubble(lay.pp, micro))
    tp = 2 * cfg.num_layers * _allreduce_s(tokens / lay.dp * cfg.hidden_size * 2, lay.tp, gpu.intra_gbs, a)
    return compute + tp


def _generation_s(cfg: ModelConfig, lay: Layout, gpu: Gpu, w: Workload, a: Assumptions) -> float:
    """Prefill and decode of one step's rollouts, in bf16 whatever the actor's training
    precision (FP8 is off while decoding)."""
    per_replica = math.ceil(w.rollouts / lay.dp)
    chunks = math.ceil(per_replica / w.gen_batch)
    b = min(w.gen_batch, per_replica)
    mm = matmul_params(cfg)
    peak = gpu.bf16_tflops * 1e12 * a.mfu
    prefill = 2 * mm * b * w.prompt_len / (lay.tp * peak)
    kv_token = 2 * cfg.num_layers * cfg.num_query_groups * cfg.kv_channels * 2  # bytes, whole model
    kv_read = b * (w.prompt_len + w.response_len / 2) * kv_token
    bw = gpu.hbm_gbs * GB * a.hbm_efficiency
    step = max((2 * mm + kv_read) / (lay.tp * bw), 2 * mm * b / (lay.tp * peak))
    step += a.decode_overhead_ms * 1e-3
    if lay.tp > 1:
        step += 2 * cfg.num_layers * a.collective_latency_us * 1e-6
    return chunks * (prefill + w.response_len * step)


@dataclass(frozen=True)
class Models:
    actor: ModelConfig
    critic: ModelConfig
    reward: ModelConfig


def ppo_step_time(m: Models, policy: Layout, reward: Optional[Layout], gpu: Gpu, w: Workload,
                  a: Assumptions, gpus_per_node: int, precision: Precision = Precision()) -> SideTimes:
    """Seconds per phase of one PPO step. ``reward=None``: the reward model colocated on the
    policy's GPUs with the policy's layout."""
    t = SideTimes()
    tokens = w.rollouts * w.seq_len
    micro = max(1, w.rollouts // (policy.dp * w.micro_batch))
    t.phases["generate"] = _generation_s(m.actor, policy, gpu, w, a)
    rl = reward or policy
    t.phases["score"] = _forward_s(m.reward, rl.gpus, rl, gpu, a, tokens, w.seq_len,
                                   max(1, w.rollouts // (rl.dp * w.micro_batch)), True,
                                   precision.fp8("reward"))
    # the reference's log-probs, the actor's old log-probs and the critic's values
    t.phases["ref_and_values"] = (
        _forward_s(m.actor, policy.gpus, policy, gpu, a, tokens, w.seq_len, micro, False,
                   precision.fp8("reference"))
        + _forward_s(m.actor, policy.gpus, policy, gpu, a, tokens, w.seq_len, micro, False,
                     precision.fp8("actor"))
        + _forward_s(m.critic, policy.gpus, policy, gpu, a, tokens, w.seq_len, micro, True,
                     precision.fp8("critic")))
    steps = w.ppo_epochs * max(1, w.rollouts // w.minibatch)
    for role, cfg, scalar in (("actor", m.actor, False), ("critic", m.critic, True)):
        parts = training_step_time(cfg, policy, gpu, a, w.minibatch, w.seq_len, w.micro_batch,
                                   gpus_per_node, scalar, fp8=precision.fp8(role))
        t.phases[f"{role}_update"] = steps * parts["compute"]
        t.phases[f"{role}_comm"] = steps * (parts["tp_comm"] + parts["dp_comm"])
    return t


@dataclass
class Candidate:
    placement: str
    policy: Layout
    reward: Optional[Layout]
    policy_peak_gb: float
    reward_peak_gb: float
    fits: bool
    times: SideTimes
    detail: Dict[str, float]
    memory: Dict[str, RoleMemory] = field(default_factory=dict)
    """Bytes per GPU of each role (actor, critic, reference, reward) in this candidate's
    layouts: the terms behind ``detail``."""
    peak_phase: str = ""
    """The policy-side phase that sets ``policy_peak_gb``: ``generation`` (the KV cache),
    ``actor update``, ``critic update`` or ``reference forward``."""

    @property
    def step_s(self) -> float:
        return self.times.total


def _policy_side_memory(m: Models, lay: Layout, w: Workload, a: Assumptions, precision: Precision
                        ) -> Tuple[float, Dict[str, float], Dict[str, RoleMemory], str]:
    """Peak bytes per GPU of the policy side, the figures in GB, each role's terms, and the
    phase that sets the peak."""
    actor = role_memory(m.actor, lay, w, a, trainable=True, scalar_head=False, generates=True,
                        fp8=precision.fp8("actor"))
    critic = role_memory(m.critic, lay, w, a, trainable=True, scalar_head=True, fp8=precision.fp8("critic"))
    ref = role_memory(m.actor, lay, w, a, trainable=False, scalar_head=False, fp8=precision.fp8("reference"))
    resident = actor.resident + critic.resident + ref.resident
    phases = {"generation": actor.kv_cache, "actor update": actor.activations,
              "critic update": critic.activations, "reference forward": ref.forward}
    phase = max(phases, key=phases.get)
    peak = resident + phases[phase]
    return peak, {"actor_resident_gb": actor.resident / GB, "critic_resident_gb": critic.resident / GB,
                  "reference_gb": ref.resident / GB, "kv_cache_gb": actor.kv_cache / GB,
                  "actor_activations_gb": actor.activations / GB,
                  "critic_activations_gb": critic.activations / GB}, \
        {"actor": actor, "critic": critic, "reference": ref}, phase


def _scorer(cfg: ModelConfig, lay: Layout, w: Workload, a: Assumptions, fp8: bool) -> RoleMemory:
    return role_memory(cfg, lay, w, a, trainable=False, scalar_head=True, fp8=fp8)


def _scorer_peak(cfg: ModelConfig, lay: Layout, w: Workload, a: Assumptions, fp8: bool = False) -> float:
    mem = _scorer(cfg, lay, w, a, fp8)
    return mem.resident + mem.forward


def _valid(cfg: ModelConfig, lay: Layout, gpus_per_node: int) -> bool:
    return (cfg.num_attention_heads % lay.tp == 0 and cfg.num_query_groups % lay.tp == 0
            and lay.tp <= gpus_per_node and lay.pp <= cfg.num_layers)


def _layouts(cfg: ModelConfig, gpus: int, gpus_per_node: int) -> List[Layout]:
    out = []
    for tp in (1, 2, 4, 8, 16):
        for pp in (1, 2, 4, 8, 16):
            if gpus % (tp * pp) == 0:
                lay = Layout(tp, pp, gpus // (tp * pp))
                if _valid(cfg, lay, gpus_per_node):
                    out.append(lay)
    return out


def plan_ppo(m: Models, gpu: Gpu, nodes: int, gpus_per_node: int, w: Workload, a: Assumptions,
             precision: Precision = Precision()) -> List[Candidate]:
    """Every layout of ``nodes`` nodes: colocated (all roles on all GPUs, one layout) and
    partitioned (the reward model alone on the last ``k`` nodes), with memory and predicted
    step time; fitting candidates first, fastest first. ``precision``: which roles run FP8."""
    if precision.any_fp8 and gpu.fp8_tflops is None:
        raise ValueError(f"{gpu.name} has no FP8 tensor cores; FP8 roles ({precision}) need Hopper or newer")
    rm_fp8 = precision.fp8("reward")
    cap = (gpu.memory_gb - a.reserve_gb) * GB
    out: List[Candidate] = []
    total = nodes * gpus_per_node
    for lay in _layouts(m.actor, total, gpus_per_node):
        if not _valid(m.reward, lay, gpus_per_node) or not _valid(m.critic, lay, gpus_per_node):
            continue
        if w.rollouts % lay.dp or w.minibatch % (lay.dp * w.micro_batch):
            continue
        peak, detail, memory, phase = _policy_side_memory(m, lay, w, a, precision)
        memory["reward"] = _scorer(m.reward, lay, w, a, rm_fp8)
        rm = memory["reward"].resident
        peak += rm  # the reward model's forward reuses the memory the update uses later
        detail["reward_gb"] = rm / GB
        times = ppo_step_time(m, lay, None, gpu, w, a, gpus_per_node, precision)
        out.append(Candidate("colocated", lay, None, peak / GB, 0.0, peak <= cap, times, detail,
                             memory, phase))
    for k in range(1, nodes):
        pol_gpus, rm_gpus = (nodes - k) * gpus_per_node, k * gpus_per_node
        rm_options = [r for r in _layouts(m.reward, rm_gpus, gpus_per_node) if w.rollouts % r.dp == 0]
        rm_fit = [r for r in rm_options if _scorer_peak(m.reward, r, w, a, rm_fp8) <= cap]
        if not rm_options:
            continue
        # The reward model: the layout that fits with the most replicas (fastest scoring).
        rlay = max(rm_fit or rm_options, key=lambda r: (r.dp, -r.pp))
        rpeak = _scorer_peak(m.reward, rlay, w, a, rm_fp8)
        for lay in _layouts(m.actor, pol_gpus, gpus_per_node):
            if not _valid(m.critic, lay, gpus_per_node):
                continue
            if w.rollouts % lay.dp or w.minibatch % (lay.dp * w.micro_batch):
                continue
            peak, detail, memory, phase = _policy_side_memory(m, lay, w, a, precision)
            memory["reward"] = _scorer(m.reward, rlay, w, a, rm_fp8)
            detail["reward_gb"] = rpeak / GB
            times = ppo_step_time(m, lay, rlay, gpu, w, a, gpus_per_node, precision)
            out.append(Candidate(f"partitioned ({k} reward node{'s' if k > 1 else ''})", lay, rlay,
                                 peak / GB, rpeak / GB, peak <= cap and rpeak <= cap, times, detail,
                                 memory, phase))
    out.sort(key=lambda c: (not c.fits, c.step_s))
    return out


def predict_sweep(rows: List[Dict[str, object]], cfg: ModelConfig, peak_tflops: float, link_gbs: float,
                  base: Optional[Dict[str, object]] = None) -> List[Dict[str, object]]:
    """The planner's training-step time for each measured row of a scaling sweep
    (tools/benchmark_scaling.py), on a device described by the sweep's own GEMM probe
    (``peak_tflops``) and a measured all-reduce bandwidth (``link_gbs``), with the MFU
    fitted on ``base`` (default: the single-device row). What is validated is everything
    the planner adds to a one-device figure: the split of compute over devices, the
    pipeline bubble, the TP and DP communication."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("step_s")]
    base = base or min(ok, key=lambda r: r["devices"])
    gpu = Gpu("measured device", 0.0, peak_tflops, 0.0, link_gbs, link_gbs)

    def parts(r, mfu):
        lay = Layout(int(r["tp"]), int(r["pp"]), int(r["dp"]))
        a = Assumptions(mfu=mfu, comm_efficiency=1.0, recompute=None if r["recompute"] == "none" else r["recompute"])
        return training_step_time(cfg, lay, gpu, a, int(r["global_batch"]), int(r["seq_len"]),
                                  int(r["micro_batch"]), gpus_per_node=lay.gpus,
                                  activation_bytes=4 if r.get("dtype") == "float32" else 2)

    b = parts(base, 1.0)
    # compute scales as 1/mfu; fit it so that the base row's prediction equals its measurement
    mfu = b["compute"] / max(float(base["step_s"]) - b["tp_comm"] - b["dp_comm"], 1e-9)
    out = []
    for r in ok:
        p = parts(r, mfu)
        pred = sum(p.values())
        out.append({"layout": r["layout"], "devices": r["devices"], "measured_s": r["step_s"],
                    "predicted_s": pred, "ratio": pred / float(r["step_s"]), "fitted_mfu": mfu, **p})
    return out
