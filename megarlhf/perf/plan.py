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
* the KV cache of generation: K and V, bf16, per token in flight.

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

__all__ = ["Gpu", "GPUS", "Layout", "Workload", "Assumptions", "RoleMemory", "role_memory",
           "stage_parameters", "Models", "SideTimes", "predict_sweep", "ppo_step_time", "Candidate", "plan_ppo",
           "training_step_time"]

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

    @property
    def resident(self) -> float:
        return self.weights + self.gradients + self.optimizer


def _activations(cfg: ModelConfig, lay: Layout, w: Workload, a: Assumptions, vocab_rows: int) -> float:
    s, h, heads = w.seq_len, cfg.hidden_size, cfg.num_attention_heads
    per_layer = s * h * (10 + 24 / lay.tp)
    if a.attention == "local" and a.recompute is None:
        per_layer += 5 * heads * s * s / lay.tp
    layers = math.ceil(cfg.num_layers / lay.pp)
    micro_per_replica = max(1, w.minibatch // (lay.dp * w.micro_batch))
    in_flight = min(lay.pp, micro_per_replica)
    if a.recompute == "full":
        kept = 2 * s * h * layers * in_flight + per_layer
    else:
        kept = per_layer * layers * in_flight
    logits = 3 * 4 * s * vocab_rows / lay.tp
    return w.micro_batch * (kept + logits)


def role_memory(cfg: ModelConfig, lay: Layout, w: Workload, a: Assumptions, trainable: bool,
                scalar_head: bool, generates: bool = False) -> RoleMemory:
    head_rows = 1 if scalar_head else cfg.vocab_size
    p = stage_parameters(cfg, lay.pp, head_rows) / lay.tp
    if not trainable:
        s, h = w.seq_len, cfg.hidden_size
        layer = s * h * (10 + 24 / lay.tp)
        if a.attention == "local":
            layer += 5 * cfg.num_attention_heads * s * s / lay.tp
        out = 4 * s * head_rows / lay.tp
        return RoleMemory(weights=2 * p, forward=w.micro_batch * (layer + out))
    opt = 12 * p / (lay.dp if a.distributed_optimizer else 1)
    kv = 0.0
    if generates:
        kv_per_token = 2 * math.ceil(cfg.num_layers / lay.pp) * cfg.num_query_groups * cfg.kv_channels / lay.tp * 2
        kv = w.gen_batch * w.seq_len * kv_per_token
    return RoleMemory(weights=2 * p, gradients=4 * p, optimizer=opt,
                      activations=_activations(cfg, lay, w, a, head_rows), kv_cache=kv)


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


def training_step_time(cfg: ModelConfig, lay: Layout, gpu: Gpu, a: Assumptions, sequences: int,
                       seq_len: int, micro_batch: int, gpus_per_node: int, scalar_head: bool = False,
                       activation_bytes: int = 2) -> Dict[str, float]:
    """One optimizer step over ``sequences`` sequences: compute (with the pipeline bubble),
    TP all-reduces, the DP gradient reduction. Seconds per part."""
    head = 1 if scalar_head else None
    flops = sequences * seq_len * 3 * forward_flops_per_token(cfg, seq_len, head)
    if a.recompute == "full":
        flops *= 4 / 3  # the forward runs twice
    micro = max(1, sequences // (lay.dp * micro_batch))
    compute = flops / (lay.gpus * gpu.bf16_tflops * 1e12 * a.mfu) * _bubble(lay.pp, micro)
    tp_bytes = micro_batch * seq_len * cfg.hidden_size * activation_bytes
    layers = math.ceil(cfg.num_layers / lay.pp)
    tp = 4 * layers * micro * _allreduce_s(tp_bytes, lay.tp, gpu.intra_gbs, a) if lay.tp > 1 else 0.0
    grads = 4 * stage_parameters(cfg, lay.pp, 1 if scalar_head else None) / lay.tp
    link = gpu.intra_gbs if lay.gpus <= gpus_per_node else gpu.inter_gbs
    dp = _allreduce_s(grads, lay.dp, link, a)
    return {"compute": compute, "tp_comm": tp, "dp_comm": dp}


def _forward_s(cfg, gpus: int, lay: Layout, gpu: Gpu, a: Assumptions, tokens: float, seq_len: int,
               micro: int, scalar_head: bool) -> float:
    """A forward pass over ``tokens`` tokens on ``gpus`` GPUs: compute with the pipeline
    bubble, plus the TP all-reduces (two per layer) of each replica's share."""
    flops = tokens * forward_flops_per_token(cfg, seq_len, 1 if scalar_head else None)
    compute = flops / (gpus * gpu.bf16_tflops * 1e12 * a.mfu) * _bubble(lay.pp, micro)
    tp = 2 * cfg.num_layers * _allreduce_s(tokens / lay.dp * cfg.hidden_size * 2, lay.tp, gpu.intra_gbs, a)
    return compute + tp


def _generation_s(cfg: ModelConfig, lay: Layout, gpu: Gpu, w: Workload, a: Assumptions) -> float:
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
                  a: Assumptions, gpus_per_node: int) -> SideTimes:
    """Seconds per phase of one PPO step. ``reward=None``: the reward model colocated on the
    policy's GPUs with the policy's layout."""
    t = SideTimes()
    tokens = w.rollouts * w.seq_len
    micro = max(1, w.rollouts // (policy.dp * w.micro_batch))
    t.phases["generate"] = _generation_s(m.actor, policy, gpu, w, a)
    rl = reward or policy
    t.phases["score"] = _forward_s(m.reward, rl.gpus, rl, gpu, a, tokens, w.seq_len,
                                   max(1, w.rollouts // (rl.dp * w.micro_batch)), True)
    t.phases["ref_and_values"] = (
        2 * _forward_s(m.actor, policy.gpus, policy, gpu, a, tokens, w.seq_len, micro, False)
        + _forward_s(m.critic, policy.gpus, policy, gpu, a, tokens, w.seq_len, micro, True))
    steps = w.ppo_epochs * max(1, w.rollouts // w.minibatch)
    for role, cfg, scalar in (("actor", m.actor, False), ("critic", m.critic, True)):
        parts = training_step_time(cfg, policy, gpu, a, w.minibatch, w.seq_len, w.micro_batch,
                                   gpus_per_node, scalar)
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

    @property
    def step_s(self) -> float:
        return self.times.total


def _policy_side_memory(m: Models, lay: Layout, w: Workload, a: Assumptions
                        ) -> Tuple[float, Dict[str, float]]:
    actor = role_memory(m.actor, lay, w, a, trainable=True, scalar_head=False, generates=True)
    critic = role_memory(m.critic, lay, w, a, trainable=True, scalar_head=True)
    ref = role_memory(m.actor, lay, w, a, trainable=False, scalar_head=False)
    resident = actor.resident + critic.resident + ref.weights
    peak = resident + max(actor.kv_cache, actor.activations, critic.activations, ref.forward)
    return peak, {"actor_resident_gb": actor.resident / GB, "critic_resident_gb": critic.resident / GB,
                  "reference_gb": ref.weights / GB, "kv_cache_gb": actor.kv_cache / GB,
                  "actor_activations_gb": actor.activations / GB,
                  "critic_activations_gb": critic.activations / GB}


def _scorer_peak(cfg: ModelConfig, lay: Layout, w: Workload, a: Assumptions) -> float:
    mem = role_memory(cfg, lay, w, a, trainable=False, scalar_head=True)
    return mem.weights + mem.forward


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


def plan_ppo(m: Models, gpu: Gpu, nodes: int, gpus_per_node: int, w: Workload, a: Assumptions
             ) -> List[Candidate]:
    """Every layout of ``nodes`` nodes: colocated (all roles on all GPUs, one layout) and
    partitioned (the reward model alone on the last ``k`` nodes), with memory and predicted
    step time; fitting candidates first, fastest first."""
    cap = (gpu.memory_gb - a.reserve_gb) * GB
    out: List[Candidate] = []
    total = nodes * gpus_per_node
    for lay in _layouts(m.actor, total, gpus_per_node):
        if not _valid(m.reward, lay, gpus_per_node) or not _valid(m.critic, lay, gpus_per_node):
            continue
        if w.rollouts % lay.dp or w.minibatch % (lay.dp * w.micro_batch):
            continue
        peak, detail = _policy_side_memory(m, lay, w, a)
        rm = role_memory(m.reward, lay, w, a, trainable=False, scalar_head=True).weights
        peak += rm  # the reward model's forward reuses the memory the update uses later
        detail["reward_gb"] = rm / GB
        times = ppo_step_time(m, lay, None, gpu, w, a, gpus_per_node)
        out.append(Candidate("colocated", lay, None, peak / GB, 0.0, peak <= cap, times, detail))
    for k in range(1, nodes):
        pol_gpus, rm_gpus = (nodes - k) * gpus_per_node, k * gpus_per_node
        rm_options = [r for r in _layouts(m.reward, rm_gpus, gpus_per_node) if w.rollouts % r.dp == 0]
        rm_fit = [r for r in rm_options if _scorer_peak(m.reward, r, w, a) <= cap]
        if not rm_options:
            continue
        # The reward model: the layout that fits with the most replicas (fastest scoring).
        rlay = max(rm_fit or rm_options, key=lambda r: (r.dp, -r.pp))
        rpeak = _scorer_peak(m.reward, rlay, w, a)
        for lay in _layouts(m.actor, pol_gpus, gpus_per_node):
            if not _valid(m.critic, lay, gpus_per_node):
                continue
            if w.rollouts % lay.dp or w.minibatch % (lay.dp * w.micro_batch):
                continue
            peak, detail = _policy_side_memory(m, lay, w, a)
            detail["reward_gb"] = rpeak / GB
            times = ppo_step_time(m, lay, rlay, gpu, w, a, gpus_per_node)
            out.append(Candidate(f"partitioned ({k} reward node{'s' if k > 1 else ''})", lay, rlay,
                                 peak / GB, rpeak / GB, peak <= cap and rpeak <= cap, times, detail))
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
