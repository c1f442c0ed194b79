"""KV-cached batched sampling on the policy's own megatron weights (TP- and PP-aware).

    engine = MegatronEngine(chunks, mp, vocab_size, max_batch=64)
    out = engine.generate(prompt_ids, SamplingParams(max_new_tokens=64, greedy=True,
                                                     stop_ids=template.stop_ids()))

Each step runs :class:`~megarlhf.rollout.decoder.LlamaDecoder` on the chunk's own
parameters with a KV cache allocated once per batch chunk; batches larger than
``max_batch`` are generated in chunks, so a 512-prompt PPO step never holds 512
sequences at once. Ragged prompts are handled as megatron's static engine does:
decoding starts at the shortest prompt, and while a sequence is still inside its prompt
its prompt token is forced instead of the sample.

Randomness is tied to the prompt, not the rank: each sequence draws its uniforms from its
own generator seeded by ``(params.seed, index of the prompt)`` and samples by inverse
CDF over the real vocabulary, so the same seed gives the same samples whatever the
TP/PP/DP layout, chunking or vocabulary padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Protocol, Sequence

import torch
import torch.distributed as dist

from megarlhf import platform
from megarlhf.parallel import ModelParallel
from megarlhf.rollout.decoder import LlamaDecoder

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


def _filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to ``[b, V]`` fp32 logits."""
    logits = logits / params.temperature
    neg = torch.finfo(logits.dtype).min
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep a token while the mass before it is below top_p (the first is always kept)
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, neg)
    return logits


class MegatronEngine:
    """Generation with the training model itself (no weight copy)."""

    def __init__(self, chunks: List[torch.nn.Module], mp: ModelParallel, vocab_size: int,
                 max_batch: int = 64):
        if len(chunks) != 1:
            raise ValueError("generation needs one model chunk per rank (virtual pipeline "
                             "stages are for training); build the model without VPP")
        self.model = chunks[0]
        self.mp = mp
        self.max_batch = max_batch
        self.vocab_size = vocab_size
        self.device = platform.current().device
        config = self.model.config
        self.decoder = LlamaDecoder(self.model, mp.tp_group, mp.config.tp, config.layernorm_epsilon)

    def update_weights(self) -> None:
        """Nothing to do: this engine reads the training weights in place."""

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 progress=None, first_index: int = 0) -> RolloutBatch:
        """Responses to ``prompts`` (token ids), in order. ``progress(n)`` is called after
        each chunk of ``n`` prompts; ``first_index`` is the global index of ``prompts[0]``
        (sampling randomness is keyed by it, so a shard of a larger batch samples what the
        whole batch would)."""
        if params.temperature <= 0 and not params.greedy:
            raise ValueError("temperature must be > 0 (or use greedy)")
        out = RolloutBatch([], [], [], [], [])
        for start in range(0, len(prompts), self.max_batch):
            chunk = [list(p) for p in prompts[start:start + self.max_batch]]
            part = self._generate_chunk(chunk, params, first_index=first_index + start)
            if progress is not None:
                progress(len(chunk))
            for name in ("prompt_ids", "response_ids", "finish_reason", "sample_logprobs",
                         "policy_logprobs"):
                getattr(out, name).extend(getattr(part, name))
        return out

    # -- one chunk -----------------------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, start: int) -> Optional[torch.Tensor]:
        """One (pre)fill or decode step through this rank's pipeline stage; returns the
        last position's gathered logits ``[b, V]`` on the last stage, else None."""
        mp = self.mp
        b, s = tokens.shape
        x = tokens
        if not mp.is_first_stage:
            x = torch.empty(b, s, self.decoder.hidden, dtype=self.decoder.dtype, device=self.device)
            dist.recv(x, src=dist.get_global_rank(mp.pp_group, mp.pp_rank - 1), group=mp.pp_group)
        out = self.decoder.forward(x, start)
        if not mp.is_last_stage:
            dist.send(out.contiguous(), dst=dist.get_global_rank(mp.pp_group, mp.pp_rank + 1),
                      group=mp.pp_group)
            return None
        return out

    def _share_from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        if self.mp.config.pp > 1:
            src = dist.get_global_rank(self.mp.pp_group, self.mp.config.pp - 1)
            dist.broadcast(t, src=src, group=self.mp.pp_group)
        return t

    def _generate_chunk(self, prompts: List[List[int]], params: SamplingParams,
                        first_index: int) -> RolloutBatch:
        b = len(prompts)
        lens = torch.tensor([len(p) for p in prompts])
        if (lens == 0).any():
            raise ValueError("empty prompt")
        min_len, max_len = int(lens.min()), int(lens.max())
        total = max_len + params.max_new_tokens
        tokens = torch.zeros(b, total, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p)
        self.decoder.start(b, total, self.device)
        # One uniform per sequence and position, drawn from the prompt's own generator:
        # sampling is by inverse CDF, so the draw does not depend on the vocabulary
        # padding, the batch it runs in, or the layout.
        uniforms = torch.stack([
            torch.rand(total, generator=torch.Generator().manual_seed(
                params.seed * 1_000_003 + first_index + i), dtype=torch.float64)
            for i in range(b)])
        sample_lp = torch.zeros(b, total)
        policy_lp = torch.zeros(b, total)
        ends = lens + params.max_new_tokens  # exclusive end position per sequence
        stop = torch.tensor(sorted(set(params.stop_ids)), dtype=torch.long)
        eos = params.eos_id
        done = torch.zeros(b, dtype=torch.bool)
        stopped_at = torch.full((b,), -1, dtype=torch.long)
        prev, cur = 0, min_len
        for cur in range(min_len, total):
            logits = self._forward(tokens[:, prev:cur].to(self.device), prev)
            prev = cur
            if logits is not None:
                # The real vocabulary only: padded ids can never be picked.
                logits = logits[:, :self.vocab_size].cpu()
                new, samp, pol = _pick(logits, params, uniforms[:, cur])
            else:
                new = torch.zeros(b, dtype=torch.long)
            new = self._share_from_last_stage(new.to(self.device)).cpu()
            in_prompt = cur < lens
            tokens[:, cur] = torch.where(in_prompt, tokens[:, cur], new)
            active = ~done & ~in_prompt
            if logits is not None:
                sample_lp[:, cur] = samp
                policy_lp[:, cur] = pol
            if len(stop):
                hit = active & torch.isin(new, stop)
                stopped_at = torch.where(hit, torch.full_like(stopped_at, cur), stopped_at)
                done |= hit
            done |= (cur + 1 >= ends) & ~in_prompt
            if bool(done.all()):
                break
        responses, finish, s_lp, p_lp = [], [], [], []
        for i in range(b):
            n = int(lens[i])
            end = int(stopped_at[i]) + 1 if stopped_at[i] >= 0 else min(int(ends[i]), cur + 1)
            resp = tokens[i, n:end].tolist()
            responses.append(resp)
            if stopped_at[i] >= 0:
                finish.append("eos" if eos is not None and resp[-1] == eos else "stop")
            else:
                finish.append("length")
            s_lp.append(sample_lp[i, n:end].tolist())
            p_lp.append(policy_lp[i, n:end].tolist())
        self.decoder.finish()
        last = self.mp.is_last_stage
        return RolloutBatch(prompt_ids=prompts, response_ids=responses, finish_reason=finish,
                            sample_logprobs=s_lp if last else [], policy_logprobs=p_lp if last else [])


def _pick(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor):
    """Next tokens ``[b]`` from fp32 logits ``[b, V]`` and uniforms ``[b]``; returns the
    tokens, their log-probs under the sampling distribution and under the raw policy."""
    policy = torch.log_softmax(logits, dim=-1)
    if params.greedy:
        new = logits.argmax(-1)
        return new, torch.zeros(new.shape), policy.gather(-1, new[:, None])[:, 0]
    plain = params.temperature == 1.0 and not params.top_k and params.top_p >= 1.0
    filt = policy if plain else torch.log_softmax(_filter_logits(logits, params), dim=-1)
    cdf = filt.double().exp().cumsum(-1)
    new = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    new = new.clamp_(max=logits.shape[-1] - 1)
    # never land on a zero-probability id at a CDF plateau (possible only at the edges)
    zero = filt.gather(-1, new[:, None])[:, 0] == torch.finfo(filt.dtype).min
    if zero.any():
        new = torch.where(zero, filt.argmax(-1), new)
    return new, filt.gather(-1, new[:, None])[:, 0], policy.gather(-1, new[:, None])[:, 0]


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
