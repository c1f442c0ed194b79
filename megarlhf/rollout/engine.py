"""Continuously batched sampling on the policy's own megatron weights (TP- and PP-aware).

    engine = MegatronEngine(chunks, mp, vocab_size, max_batch=64)
    out = engine.generate(prompt_ids, SamplingParams(max_new_tokens=64, greedy=True,
                                                     stop_ids=template.stop_ids()))

``max_batch`` is the number of *slots*: sequences held at once, each with its own rows of
the KV cache. A prompt enters a free slot with one prefill pass (all prompts admitted at
that moment go through the model together, right-padded), then every busy slot decodes one
token per step at its own position (:class:`~megarlhf.rollout.decoder.LlamaDecoder` on the
chunk's own parameters). When a sequence ends, its slot takes the next waiting prompt, so
a 512-prompt PPO step never holds more than ``max_batch`` sequences and finished
sequences stop costing compute. Results come back in input order.

Sampling, stop detection and length limits are tensor ops on the model's device
(:mod:`megarlhf.rollout.sampling`); the host looks at which slots have finished every
``sync_every`` steps. Randomness is keyed by ``(seed, index of the prompt, index of the
response token)`` through a counter-based generator, so the same seed gives the same
samples whatever the TP/PP/DP layout, slot count, the prompts beside it or the slot it
lands in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Protocol, Sequence

import torch
import torch.distributed as dist

from megarlhf import platform
from megarlhf.parallel import ModelParallel
from megarlhf.rollout.decoder import LlamaDecoder, StepPlan
from megarlhf.rollout.sampling import philox_uniforms, pick

__all__ = ["SamplingParams", "RolloutBatch", "RolloutEngine", "MegatronEngine"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample."""

    max_new_tokens: int = 64
    """Most tokens generated per sequence."""
    greedy: bool = False
    """Take the most likely token (temperature and truncation ignored)."""
    temperature: float = 1.0
    """Softmax temperature (> 0)."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p (1: all)."""
    stop_ids: Sequence[int] = ()
    """Token ids that end a sequence (included in the response)."""
    seed: int = 0
    """Seed of the per-prompt generators."""
    eos_id: Optional[int] = None
    """The tokenizer's EOS id: a sequence ending with it finishes with reason ``eos``
    (other stop ids give ``stop``). Include it in ``stop_ids`` to stop on it."""
    logits_processor: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None
    """``f(logits [b, V], prompt_index [b], step [b]) -> logits`` on the device before
    temperature and truncation (global prompt indices, index of the response token), as
    transformers' ``LogitsProcessor``; ``policy_logprobs`` stay the unprocessed policy's."""


@dataclass
class RolloutBatch:
    """Per sequence, in input order."""

    prompt_ids: List[List[int]]
    response_ids: List[List[int]]
    finish_reason: List[str]  # "eos", "stop" (another stop id) or "length"
    sample_logprobs: List[List[float]] = field(default_factory=list)
    """log-prob of each response token under the sampling distribution (temperature,
    top-k/p applied); 0 for greedy."""
    policy_logprobs: List[List[float]] = field(default_factory=list)
    """log-prob of each response token under the unmodified policy (temperature 1, no
    truncation): what PPO's ratio needs."""


class RolloutEngine(Protocol):
    """What PPO needs from a generation backend. A backend that keeps its own copy of the
    weights refreshes it in ``update_weights`` (called after every optimizer step)."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 progress=None, first_index: int = 0) -> RolloutBatch: ...

    def update_weights(self) -> None: ...


_EOS, _STOP, _LENGTH = 0, 1, 2
_REASONS = ("eos", "stop", "length")


class _Slots:
    """The device-side state of every slot: the token to feed next and its position, how
    many response tokens the slot has, whether it is done and why, what it produced, and
    the uniforms of its prompt's stream."""

    FIELDS = ("cur", "pos", "step", "length", "reason", "done", "index", "tokens", "sample_lp", "policy_lp",
              "uniforms")

    def __init__(self, slots: int, max_new: int, device):
        def z(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)
        self.cur, self.pos, self.step, self.length, self.reason = z(slots), z(slots), z(slots), z(slots), z(slots)
        self.index = z(slots)  # the global index of each slot's prompt
        self.done = torch.ones(slots, dtype=torch.bool, device=device)
        # one spare column: a done row writes its (ignored) samples past its length
        self.tokens = z(slots, max_new + 1)
        self.sample_lp = z(slots, max_new + 1, dtype=torch.float32)
        self.policy_lp = z(slots, max_new + 1, dtype=torch.float32)
        self.uniforms = z(slots, max_new, dtype=torch.float64)
        self.max_new = max_new

    def admit(self, rows: torch.Tensor, index: torch.Tensor, last: torch.Tensor) -> None:
        """Prompts ``index`` in ``rows``, their last prompt token at position ``last``."""
        self.index[rows] = index
        self.pos[rows] = last
        self.step[rows] = 0
        self.length[rows] = 0
        self.reason[rows] = _LENGTH
        self.done[rows] = False

    def record(self, rows, new: torch.Tensor, sample_lp: Optional[torch.Tensor],
               policy_lp: Optional[torch.Tensor], stop: torch.Tensor, eos: Optional[int]) -> None:
        """Token ``new`` sampled for each of ``rows`` (a slice of the decode rows, or an
        index tensor): stored at the row's next response position, which advances by one
        where the row is still going; a stop id or the length limit ends it. Done rows keep
        their state (they are computed, and ignored, until the host collects them): their
        step no longer moves, so what they write lands past their length."""
        active = ~self.done[rows]
        j = self.step[rows]  # a view for slice rows: every use below precedes the step's increment
        at = (rows if torch.is_tensor(rows) else torch.arange(rows.start, rows.stop, device=j.device), j)
        self.tokens.index_put_(at, new)
        if sample_lp is not None:
            self.sample_lp.index_put_(at, sample_lp)
            self.policy_lp.index_put_(at, policy_lp)
        hit = active & torch.isin(new, stop)
        ended = hit | (active & (j + 1 >= self.max_new))
        why = torch.full_like(new, _STOP)
        if eos is not None:
            why = torch.where(new == eos, torch.full_like(new, _EOS), why)
        self.reason[rows] = torch.where(hit, why, self.reason[rows])
        self.length[rows] = torch.where(ended, j + 1, self.length[rows])
        self.done[rows] = self.done[rows] | ended
        self.cur[rows] = torch.where(active, new, self.cur[rows])
        step = active.long()
        self.pos[rows] += step
        self.step[rows] += step

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for name in self.FIELDS:
            t = getattr(self, name)
            t[dst] = t[src]


class MegatronEngine:
    """Generation with the training model itself (no weight copy), continuously batched
    over ``max_batch`` slots. ``sync_every``: decode steps between the host's looks at
    which slots finished (``None``: the platform's choice, every step on CPU where a look
    costs nothing, every 8 on a GPU where it waits for the device). ``cuda_graphs``:
    capture the decode step per slot-count bucket and replay it (GPU, no pipeline
    stages; :mod:`megarlhf.rollout.graphs`)."""

    def __init__(self, chunks: List[torch.nn.Module], mp: ModelParallel, vocab_size: int,
                 max_batch: int = 64, sync_every: Optional[int] = None, cuda_graphs: bool = False,
                 graph_backend=None):
        if len(chunks) != 1:
            raise ValueError("generation needs one model chunk per rank (virtual pipeline "
                             "stages are for training); build the model without VPP")
        if max_batch < 1:
            raise ValueError(f"max_batch (the number of slots) must be >= 1, got {max_batch}")
        self.model = chunks[0]
        self.mp = mp
        self.max_batch = max_batch
        self.vocab_size = vocab_size
        self.device = platform.current().device
        self.sync_every = sync_every or platform.decode_sync_interval()
        config = self.model.config
        self.decoder = LlamaDecoder(self.model, mp.tp_group, mp.config.tp, config.layernorm_epsilon)
        # CUDA graphs of the decode step on a GPU without pipeline stages (a stage's
        # send/recv is not captured); ``graph_backend`` (tests: graphs.Replay) forces them.
        self.graph_backend = graph_backend
        if graph_backend is None and cuda_graphs and platform.has_gpu() and mp.config.pp == 1:
            from megarlhf.rollout.graphs import CudaGraphs

            self.graph_backend = CudaGraphs()
        self.timing = False
        """Time the prefill and decode passes (waits for the device after each: benchmarks)."""
        self.last_stats: dict = {}
        """Of the last call: decode steps, prefill passes, slot-steps computed and busy, and
        with ``timing`` the seconds of prefill and of decode."""

    def update_weights(self) -> None:
        """Nothing to do: this engine reads the training weights in place (its CUDA graphs
        too: the optimizer writes into the same parameter tensors)."""

    @torch.inference_mode()  # no autograd bookkeeping at all: ~10% of a 16-row decode step here
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 progress=None, first_index: int = 0, on_finished=None) -> RolloutBatch:
        """Responses to ``prompts`` (token ids), in order. ``progress(n)`` is called as
        ``n`` more prompts finish; ``first_index`` is the global index of ``prompts[0]``
        (sampling randomness is keyed by it, so a shard of a larger batch samples what the
        whole batch would). ``on_finished(indices, responses)`` hears of the prompts that
        finished at each look of the host (indices into ``prompts``), while the others
        still generate."""
        if params.temperature <= 0 and not params.greedy:
            raise ValueError("temperature must be > 0 (or use greedy)")
        prompts = [list(p) for p in prompts]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        last = self.mp.is_last_stage
        if not prompts or params.max_new_tokens < 1:
            empty = [[] for _ in prompts]
            return RolloutBatch(prompts, empty, ["length"] * len(prompts), empty if last else [],
                                empty if last else [])
        results = _Run(self, prompts, params, first_index, progress, on_finished).run()
        return RolloutBatch(prompts, [r[0] for r in results], [r[1] for r in results],
                            [r[2] for r in results] if last else [], [r[3] for r in results] if last else [])

    # -- pipeline stages -------------------------------------------------------------------
    def through_stage(self, x: torch.Tensor, shape, run) -> Optional[torch.Tensor]:
        """This rank's stage of one pass: receive the previous stage's hidden states of
        ``shape`` + hidden (the first stage takes the token ids ``x``), ``run`` them, send
        the result on; the last stage returns it (logits)."""
        mp = self.mp
        if not mp.is_first_stage:
            x = torch.empty(*shape, self.decoder.hidden, dtype=self.decoder.dtype, device=self.device)
            dist.recv(x, src=dist.get_global_rank(mp.pp_group, mp.pp_rank - 1), group=mp.pp_group)
        out = run(x)
        if not mp.is_last_stage:
            dist.send(out.contiguous(), dst=dist.get_global_rank(mp.pp_group, mp.pp_rank + 1),
                      group=mp.pp_group)
            return None
        return out

    def share_from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        if self.mp.config.pp > 1:
            src = dist.get_global_rank(self.mp.pp_group, self.mp.config.pp - 1)
            dist.broadcast(t, src=src, group=self.mp.pp_group)
        return t


class _Run:
    """One call of :meth:`MegatronEngine.generate`: the waiting prompts, the slots, and the
    host's view of them (which prompt each holds, a bound on its position). Every rank of a
    replica takes the same decisions from the same tokens (the last stage's samples are
    broadcast to the other stages), so their passes line up."""

    def __init__(self, engine: MegatronEngine, prompts: List[List[int]], params: SamplingParams,
                 first_index: int, progress, on_finished=None):
        self.e, self.prompts, self.params, self.first, self.progress = engine, prompts, params, first_index, progress
        self.on_finished = on_finished
        self.dev = engine.device
        self.n_slots = min(engine.max_batch, len(prompts))
        self.max_new = params.max_new_tokens
        self.decoder = engine.decoder
        self.length = max(len(p) for p in prompts) + self.max_new
        self.decoder.start(self.n_slots, self.length, self.dev)
        self.state = _Slots(self.n_slots, self.max_new, self.dev)
        self.stop = torch.tensor(sorted(set(params.stop_ids)), dtype=torch.long, device=self.dev)
        self.holds: List[int] = [-1] * self.n_slots     # prompt index per decoding slot (-1: none)
        self.reach: List[int] = [0] * self.n_slots      # bound of the position each slot feeds next
        self.pending: List[tuple] = []                   # (slot, prompt index) to prefill next pass
        self.waiting = 0                                 # the next prompt to take
        self.results: List[Optional[tuple]] = [None] * len(prompts)
        self.stats = {"decode_steps": 0, "prefills": 0, "prefill_tokens": 0, "slot_steps": 0,
                      "busy_slot_steps": 0, "prefill_s": 0.0, "decode_s": 0.0, "graphs": 0}
        self.graphed = None
        if engine.graph_backend is not None:
            from megarlhf.rollout.graphs import GraphedStep

            self.graphed = GraphedStep(self.static_step, lambda: [getattr(self.state, f) for f in _Slots.FIELDS],
                                       self.n_slots, engine.graph_backend)

    def run(self) -> List[tuple]:
        self.take(list(range(self.n_slots)))
        since_look = 0
        while self.pending or any(h >= 0 for h in self.holds):
            self.step()
            since_look += 1
            if since_look >= self.e.sync_every or self.one_is_surely_done():
                since_look = 0
                self.collect()
        self.decoder.finish()
        self.e.last_stats = self.stats
        return self.results  # type: ignore[return-value]

    def one_is_surely_done(self) -> bool:
        """Whether a slot has reached its length limit (no need to ask the device)."""
        return any(h >= 0 and self.reach[s] - len(self.prompts[h]) + 1 >= self.max_new
                   for s, h in enumerate(self.holds))

    def take(self, slots: List[int]) -> None:
        """The next waiting prompts for the free ``slots``: prefilled in the next pass."""
        for s in slots[:len(self.prompts) - self.waiting]:
            self.pending.append((s, self.waiting))
            self.waiting += 1

    # -- one pass ----------------------------------------------------------------------------
    def step(self) -> None:
        """One token for every decoding slot up to the last one, and the pending prompts'
        prefill in the same pass (their first token sampled from it)."""
        decoding = [s for s, h in enumerate(self.holds) if h >= 0]
        b = decoding[-1] + 1 if decoding else 0
        if self.graphed is not None and b and not self.pending:
            b = self.timed("decode_s", lambda: self.graphed(b))
            self.stats["graphs"] = self.graphed.captures
        else:
            self.timed("prefill_s" if self.pending else "decode_s", lambda: self.eager_step(b))
        for s in decoding:
            self.reach[s] += 1
        if self.pending:
            self.stats["prefills"] += 1
            self.stats["prefill_tokens"] += sum(len(self.prompts[i]) for _, i in self.pending)
            for s, i in self.pending:
                self.holds[s], self.reach[s] = i, len(self.prompts[i])
            self.pending = []
        if b:
            self.stats["decode_steps"] += 1
            self.stats["slot_steps"] += b
            self.stats["busy_slot_steps"] += len(decoding)

    def eager_step(self, b: int) -> None:
        st = self.state
        slots = [s for s, _ in self.pending]
        items = [i for _, i in self.pending]
        lens = [len(self.prompts[i]) for i in items]
        span = max(self.reach[:b]) + 1 if b else 0
        plan = StepPlan.build(b, span, st.pos, lens, slots, self.dev)
        x = st.cur[:b]
        if items:
            flat = torch.tensor([t for i in items for t in self.prompts[i]], dtype=torch.long).to(self.dev)
            x = torch.cat([x, flat])
        logits = self.e.through_stage(x, (plan.tokens,), lambda h: self.decoder.step(h, plan))
        if b:
            self.sample(slice(0, b), None if logits is None else logits[:b])
        if items:
            rows = plan.slots
            index = torch.tensor(items, dtype=torch.long, device=self.dev) + self.first
            st.admit(rows, index, torch.tensor(lens, dtype=torch.long, device=self.dev) - 1)
            if not self.params.greedy:
                st.uniforms[rows] = philox_uniforms(self.params.seed, index, self.max_new)
            self.sample(rows, None if logits is None else logits[b:])

    def static_step(self, b: int) -> None:
        """A decode step of fixed shapes (rows ``0..b-1``, the whole cache length): what a
        CUDA graph captures. Pipeline stages are excluded, so this rank holds the logits."""
        st = self.state
        plan = StepPlan(b, self.length, st.pos[:b])
        self.sample(slice(0, b), self.decoder.step(st.cur[:b], plan))

    def sample(self, rows, logits: Optional[torch.Tensor]) -> None:
        """Sample for ``rows`` (a slice of the decode rows, or the admitted rows' indices)
        on the last stage (the real vocabulary only: padded ids can never be picked), share
        the tokens with the other stages, record them everywhere."""
        st, s_lp, p_lp = self.state, None, None
        if logits is not None:
            step = st.step[rows].clamp(max=self.max_new - 1)
            logits = logits[:, :self.e.vocab_size]
            proc = self.params.logits_processor
            shaped = proc(logits, st.index[rows], step) if proc is not None else None
            u = st.uniforms[rows].gather(1, step[:, None])[:, 0]
            new, s_lp, p_lp = pick(logits, self.params, u, shaped)
        else:
            new = torch.zeros_like(st.cur[rows])
        new = self.e.share_from_last_stage(new)
        st.record(rows, new, s_lp, p_lp, self.stop, self.params.eos_id)

    def timed(self, key: str, fn):
        """``fn()``, its seconds added to ``stats[key]`` when the engine is timing."""
        if not self.e.timing:
            return fn()
        platform.current().synchronize()
        t0 = time.perf_counter()
        out = fn()
        platform.current().synchronize()
        self.stats[key] += time.perf_counter() - t0
        return out

    # -- the host's look -------------------------------------------------------------------
    def collect(self) -> None:
        """Take the finished slots' results (one copy to the host) and give those slots the
        next waiting prompts; once none waits, move the busy slots to the front."""
        st = self.state
        done = st.done.cpu()
        finished = [s for s, h in enumerate(self.holds) if h >= 0 and bool(done[s])]
        if finished:
            rows = torch.tensor(finished, dtype=torch.long, device=self.dev)
            length, reason, tokens = st.length[rows].tolist(), st.reason[rows].tolist(), st.tokens[rows].cpu()
            last = self.e.mp.is_last_stage
            s_lp, p_lp = (st.sample_lp[rows].cpu(), st.policy_lp[rows].cpu()) if last else (None, None)
            items = [self.holds[s] for s in finished]
            for r, (s, item) in enumerate(zip(finished, items)):
                n = length[r]
                self.results[item] = (tokens[r, :n].tolist(), _REASONS[reason[r]],
                                      s_lp[r, :n].tolist() if last else [], p_lp[r, :n].tolist() if last else [])
                self.holds[s] = -1
            if self.on_finished is not None:
                self.on_finished(items, [self.results[i][0] for i in items])
            if self.progress is not None:
                self.progress(len(finished))
            self.take(finished)
        if self.waiting == len(self.prompts) and not self.pending:
            self.compact()

    def compact(self) -> None:
        """Move the busy slots above the first free ones down, so that decode steps cover
        only as many rows as there are busy slots."""
        busy = [s for s, h in enumerate(self.holds) if h >= 0]
        movers = [s for s in busy if s >= len(busy)]
        if not movers:
            return
        free = [s for s, h in enumerate(self.holds) if h < 0 and s < len(busy)]
        src = torch.tensor(movers, dtype=torch.long, device=self.dev)
        dst = torch.tensor(free, dtype=torch.long, device=self.dev)
        self.decoder.move(src, dst)
        self.state.move(src, dst)
        for a, b in zip(movers, free):
            self.holds[b], self.reach[b], self.holds[a] = self.holds[a], self.reach[a], -1


def generate_everywhere(engine: "MegatronEngine", mp: ModelParallel, prompts: Sequence[Sequence[int]],
                        params: SamplingParams, label: str = "generate", unit: str = "prompt") -> RolloutBatch:
    """Responses to ``prompts``: each data-parallel replica answers a contiguous share
    (sampling keyed by the prompt's index, so the layout does not change them); every rank
    of the job gets them all, in input order (collective over the job)."""
    from tqdm import tqdm

    from megarlhf.train.roles import replica_share

    mine = replica_share(len(prompts), mp)
    bar = tqdm(total=len(prompts), desc=label, disable=dist.get_rank() != 0, unit=unit)
    out = engine.generate(prompts[mine.start:mine.stop], params, progress=lambda k: bar.update(k * mp.dp_size),
                          first_index=mine.start) if len(mine) else None
    bar.close()
    # each replica's last-stage TP rank 0 holds the log-probs
    holder = mp.is_last_stage and mp.tp_rank == 0 and out is not None
    parts: List[Optional[tuple]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (mp.dp_rank, out) if holder else None)
    merged = RolloutBatch([], [], [], [], [])
    for _, part in sorted((p for p in parts if p is not None), key=lambda p: p[0]):
        for name in ("prompt_ids", "response_ids", "finish_reason", "sample_logprobs", "policy_logprobs"):
            getattr(merged, name).extend(getattr(part, name))
    if len(merged.response_ids) != len(prompts):
        raise RuntimeError(f"gathered {len(merged.response_ids)} responses for {len(prompts)} prompts")
    return merged
