"""Process-group layout: distributed init from torchrun or SLURM, and megatron-core's
TP/PP/DP groups for one model layout.

    env = DistEnv.from_environ()            # torchrun or srun, no torchrun needed on clusters
    check_layout(cfg.model, cfg.parallel, env.world_size)   # before any group exists
    init_distributed(env)
    layout = initialize_model_parallel(cfg.parallel, seed=cfg.seed)
    model = build_model(cfg.model, layout)   # groups passed down explicitly

Library code below the recipes receives a :class:`ModelParallel` (and its
``pg_collection``) rather than reading megatron's globals.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist

from megarlhf import platform
from megarlhf.config.parallel import ParallelConfig
from megarlhf.launch import LAUNCHER_ENV

__all__ = [
    "DistEnv",
    "expand_slurm_nodelist",
    "init_distributed",
    "init_single_process",
    "initialize_model_parallel",
    "build_layout",
    "ModelParallel",
    "scope_fp8_amax",
    "destroy",
]


def expand_slurm_nodelist(nodelist: str) -> List[str]:
    """Expand SLURM's compressed host list: ``gpu[01-03,07],login1`` -> 4 + 1 names."""
    hosts: List[str] = []
    # Split on commas that are not inside brackets.
    parts, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    for part in parts:
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    hosts.append(f"{prefix}{i:0{width}d}{suffix}")
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Who this process is in the job, read from torchrun's or SLURM's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "local" (megarlhf.launch), "slurm" or "single"

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None) -> "DistEnv":
        env = os.environ if environ is None else environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(
                rank=int(env["RANK"]),
                world_size=int(env["WORLD_SIZE"]),
                local_rank=int(env.get("LOCAL_RANK", "0")),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", "29500")),
                source=env.get(LAUNCHER_ENV, "torchrun"),
            )
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise RuntimeError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: "
                                   "launch with srun inside an allocation")
            master = env.get("MASTER_ADDR") or expand_slurm_nodelist(nodelist)[0]
            # A port derived from the job id keeps two jobs on one node apart, and a requeued
            # job keeps its port. [10000, 30000) stays below Linux's ephemeral ports
            # (32768-60999), which outgoing connections may hold at any moment.
            default_port = 10000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
            return cls(
                rank=int(env["SLURM_PROCID"]),
                world_size=int(env["SLURM_NTASKS"]),
                local_rank=int(env.get("SLURM_LOCALID", "0")),
                master_addr=master,
                master_port=int(env.get("MASTER_PORT", default_port)),
                source="slurm",
            )
        return cls(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                   master_port=int(env.get("MASTER_PORT", "29500")), source="single")


TIMEOUT_ENV = "MEGARLHF_COLLECTIVE_TIMEOUT_S"


def collective_timeout() -> datetime.timedelta:
    """How long any collective waits for a silent peer before failing the job (every
    process group megarlhf creates): ``$MEGARLHF_COLLECTIVE_TIMEOUT_S`` seconds, 1800 by
    default. A peer that dies outright is noticed at once (its connections close); the
    timeout covers one that hangs."""
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def init_distributed(env: Optional[DistEnv] = None, timeout_s: Optional[float] = None) -> DistEnv:
    """Create the default process group (NCCL on GPUs, gloo on CPU). Idempotent.
    ``timeout_s`` defaults to :func:`collective_timeout`."""
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else collective_timeout()
    env = env or DistEnv.from_environ()
    plat = platform.current(env.local_rank)
    if dist.is_initialized():
        return env
    if env.source == "single":
        # One process and no launcher: a private file store, so that several single-process
        # jobs on one machine never compete for a port.
        import tempfile

        fd, path = tempfile.mkstemp(prefix="megarlhf-pg-")
        os.close(fd)
        os.unlink(path)
        dist.init_process_group(backend=plat.backend, init_method=f"file://{path}", rank=0,
                                world_size=1, timeout=timeout)
        return env
    dist.init_process_group(
        backend=plat.backend,
        init_method=f"tcp://{_bracket_ipv6(env.master_addr)}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    return env


def init_single_process() -> None:
    """A one-process gloo group for offline tools (conversion, export): megatron's
    checkpointing is collective even with one participant. Idempotent."""
    import tempfile

    platform.current(0)
    if dist.is_initialized():
        return
    fd, path = tempfile.mkstemp(prefix="megarlhf-pg-")
    os.close(fd)
    os.unlink(path)  # the file store creates it
    dist.init_process_group(backend="gloo", init_method=f"file://{path}", rank=0, world_size=1)


def _bracket_ipv6(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


@dataclasses.dataclass
class ModelParallel:
    """The groups of one model layout, passed down to model builders, DDP and schedules."""

    config: ParallelConfig
    pg_collection: object  # megatron.core.process_groups_config.ProcessGroupCollection
    tp_rank: int
    pp_rank: int
    dp_rank: int
    dp_size: int
    seed: int = 0
    ranks: Optional[List[int]] = None
    """The job ranks this layout spans (None: all of them, through megatron's globals)."""
    amax_group: object = None
    """A layout built apart from megatron's globals: its FP8 amax-reduction group (the
    TP x DP ranks of one pipeline stage), see :func:`scope_fp8_amax`."""
    group: object = None
    """A layout built apart from megatron's globals on part of the job: the group of all
    its ranks (None: the layout spans the whole job, whose default group serves)."""

    @property
    def tp_group(self):
        return self.pg_collection.tp

    @property
    def pp_group(self):
        return self.pg_collection.pp

    @property
    def dp_group(self):
        return self.pg_collection.dp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.config.pp - 1


def initialize_model_parallel(par: ParallelConfig, seed: int = 1234) -> ModelParallel:
    """Build megatron-core's TP/PP/DP groups for ``par`` and seed the model-parallel RNGs.

    Data-parallel replicas share the default seed; TP ranks get distinct tensor-parallel
    RNG streams (megatron's convention), so any layout initialises the same weights.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel() needs init_distributed() first")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=collective_timeout().total_seconds() / 60,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    return ModelParallel(
        config=par,
        pg_collection=pgs,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        seed=seed,
    )


def build_layout(par: ParallelConfig, first_rank: int = 0, num_ranks: Optional[int] = None,
                 seed: int = 1234) -> Optional[ModelParallel]:
    """The TP/PP/DP groups of one model laid out on ranks ``[first_rank, first_rank +
    num_ranks)`` of the job, independently of megatron's global layout: how several models
    with different layouts (PPO's actor, critic, reference and reward model) live in one job.

    Collective: every rank of the job calls it with the same arguments, in the same order
    (creating a process group is). Ranks in the span get their :class:`ModelParallel`
    (groups enumerated as megatron's ``tp-cp-ep-dp-pp`` order does), the others None.
    megatron's globals must already be initialised (the RNG tracker lives there).
    """
    from megatron.core.parallel_state import (RankGenerator, default_embedding_ranks,
                                              default_position_embedding_ranks)
    from megatron.core.process_groups_config import ProcessGroupCollection

    world = dist.get_world_size()
    num_ranks = world - first_rank if num_ranks is None else num_ranks
    if first_rank < 0 or num_ranks < 1 or first_rank + num_ranks > world:
        raise ValueError(f"ranks [{first_rank}, {first_rank + num_ranks}) are not within the "
                         f"job's {world} ranks")
    if num_ranks % par.model_parallel_size:
        raise ValueError(f"{num_ranks} ranks are not divisible by TP x PP = {par.model_parallel_size}")
    dp = num_ranks // par.model_parallel_size
    gen = RankGenerator(tp=par.tp, ep=1, dp=dp, pp=par.pp, cp=1, order="tp-cp-ep-dp-pp",
                        rank_offset=first_rank)
    me = dist.get_rank()

    def groups(enumeration: List[List[int]]):
        mine, mine_ranks = None, None
        for ranks in enumeration:
            g = dist.new_group(ranks, timeout=collective_timeout())
            if me in ranks:
                mine, mine_ranks = g, ranks
        return mine, mine_ranks

    tp, tp_ranks = groups(gen.get_ranks("tp"))
    pp, pp_ranks = groups(gen.get_ranks("pp"))
    dp_g, dp_ranks = groups(gen.get_ranks("dp"))
    amax, _ = groups(gen.get_ranks("tp-dp"))  # megatron's amax group: TP x DP x CP of a stage
    mp_g, _ = groups(gen.get_ranks("tp-pp"))
    cp, _ = groups(gen.get_ranks("cp"))
    pp_enum = gen.get_ranks("pp")
    embd, _ = groups([default_embedding_ranks(r) for r in pp_enum])
    pos_embd, _ = groups([default_position_embedding_ranks(r) for r in pp_enum])
    # Created here, with the others, rather than later by its users: every rank creates
    # groups in the same order before any rank-local group exists (megatron's DDP makes one
    # per trainable model, and torch names unhashed groups by a per-process count).
    span, _ = groups([list(range(first_rank, first_rank + num_ranks))]) if num_ranks < world else (None, None)
    if not first_rank <= me < first_rank + num_ranks:
        return None
    pgs = ProcessGroupCollection()
    pgs.tp, pgs.pp, pgs.mp, pgs.cp, pgs.tp_cp = tp, pp, mp_g, cp, tp
    pgs.dp, pgs.dp_cp, pgs.intra_dp_cp, pgs.intra_dist_opt = dp_g, dp_g, dp_g, dp_g
    pgs.embd, pgs.pos_embd = embd, pos_embd
    pgs.expt_dp = pgs.tp_ep_pp = pgs.ep = pgs.expt_tp = pgs.tp_ep = pgs.inter_dist_opt = None
    pgs.intra_expt_dp = None
    return ModelParallel(config=par, pg_collection=pgs, tp_rank=tp_ranks.index(me),
                         pp_rank=pp_ranks.index(me), dp_rank=dp_ranks.index(me), dp_size=dp,
                         seed=seed, ranks=list(range(first_rank, first_rank + num_ranks)), amax_group=amax,
                         group=span)


# megatron's globals behind parallel_state.get_amax_reduction_group(): with and without
# context parallelism, and the TP-only variant (config.tp_only_amax_red).
_AMAX_GLOBALS = (("_TENSOR_AND_DATA_PARALLEL_GROUP_WITH_CP", "amax"), ("_TENSOR_AND_DATA_PARALLEL_GROUP", "amax"),
                 ("_TENSOR_AND_CONTEXT_PARALLEL_GROUP", "tp"))


def scope_fp8_amax(chunk: torch.nn.Module, mp: ModelParallel) -> None:
    """Make the FP8 amax reduction of ``chunk`` span its own layout's ranks.

    megatron-core's FP8 context (``get_fp8_context`` in megatron/core/fp8_utils.py) takes
    its amax-reduction group from ``parallel_state`` globals, which describe the one layout
    megatron was initialised with: for several models in one job (PPO's roles), that is the
    whole job, so ranks that hold no part of the model never join the reduction the others
    wait in (a hang), and a pipeline-parallel role would mix its stages' amaxes. While
    ``chunk`` runs forward (where megatron enters the FP8 context; Transformer Engine keeps
    the group for the backward pass), the globals point at the layout's own groups, and
    are put back afterwards. Layouts made by megatron's globals need nothing."""
    if mp.ranks is None:
        return
    from megatron.core import parallel_state

    groups = {"amax": mp.amax_group, "tp": mp.tp_group}
    saved: List[dict] = []

    def enter(module, args):
        saved.append({name: getattr(parallel_state, name) for name, _ in _AMAX_GLOBALS})
        for name, which in _AMAX_GLOBALS:
            setattr(parallel_state, name, groups[which])

    def leave(module, args, output):
        for name, value in saved.pop().items():
            setattr(parallel_state, name, value)

    chunk.register_forward_pre_hook(enter)
    chunk.register_forward_hook(leave, always_call=True)


def destroy() -> None:
    """Tear down megatron's groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
