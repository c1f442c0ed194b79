"""KV-cached batched sampling on the policy's own megatron weights (TP- and PP-aware).

    engine = MegatronEngine(chunks, mp, max_batch=64)
    out = engine.generate(prompt_ids, SamplingParams(max_new_tokens=64, greedy=True,
                                                     stop_ids=template.stop_ids()))

Ragged prompts are handled as megatron's static engine does: decoding starts at the
shortest prompt; while a sequence is still inside its prompt, its prompt token is
forced instead of the sample. The KV cache (megatron ``StaticInferenceContext``) is
sized from the chunk's batch and lengths and allocated once per chunk; batches larger
than ``max_batch`` are generated in chunks.

Randomness is tied to the prompt, not the rank: each sequence draws from its own
generator seeded by ``(params.seed, index of the prompt)``, so the same seed gives the
same samples whatever the TP/PP/DP layout or chunking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megarlhf import platform
from megarlhf.parallel import ModelParallel

__all__ = ["SamplingParams", "RolloutBatch", "MegatronEngine"]


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


@dataclass
class RolloutBatch:
    """Per sequence, in input order."""

    prompt_ids: List[List[int]]
    response_ids: List[List[int]]
    finish_reason: List[str]  # "stop" (a stop id) or "length"
    sample_logprobs: List[List[float]] = field(default_factory=list)
    """log-prob of each response token under the sampling distribution (temperature,
    top-k/p applied); 0 for greedy."""
    policy_logprobs: List[List[float]] = field(default_factory=list)
    """log-prob of each response token under the unmodified policy (temperature 1, no
    truncation): what PPO's ratio needs."""


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

    def update_weights(self) -> None:
        """Nothing to do: this engine reads the training weights in place."""

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        if params.temperature <= 0 and not params.greedy:
            raise ValueError("temperature must be > 0 (or use greedy)")
        out = RolloutBatch([], [], [], [], [])
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompts), self.max_batch):
                chunk = [list(p) for p in prompts[start:start + self.max_batch]]
                part = self._generate_chunk(chunk, params, first_index=start)
                for name in ("prompt_ids", "response_ids", "finish_reason", "sample_logprobs",
                             "policy_logprobs"):
                    getattr(out, name).extend(getattr(part, name))
        finally:
            self.model.train(was_training)
        return out

    # -- one chunk -----------------------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, ctx) -> Optional[torch.Tensor]:
        """One (pre)fill or decode step through this rank's pipeline stage; returns the
        last position's gathered logits ``[b, V]`` on the last stage, else None."""
        mp = self.mp
        b, s = tokens.shape
        hidden = self.model.config.hidden_size
        if not mp.is_first_stage:
            recv = torch.empty(s, b, hidden, dtype=self.model.config.params_dtype, device=self.device)
            dist.recv(recv, src=dist.get_global_rank(mp.pp_group, mp.pp_rank - 1), group=mp.pp_group)
            self.model.set_input_tensor(recv)
        out = self.model(tokens, positions, attention_mask=None, inference_context=ctx,
                         runtime_gather_output=True)
        if not mp.is_last_stage:
            dist.send(out.contiguous(), dst=dist.get_global_rank(mp.pp_group, mp.pp_rank + 1),
                      group=mp.pp_group)
            return None
        return out[:, -1, :].float()

    def _share_from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        if self.mp.config.pp > 1:
            src = dist.get_global_rank(self.mp.pp_group, self.mp.config.pp - 1)
            dist.broadcast(t, src=src, group=self.mp.pp_group)
        return t

    def _generate_chunk(self, prompts: List[List[int]], params: SamplingParams,
                        first_index: int) -> RolloutBatch:
        from megatron.core.inference.contexts import StaticInferenceContext

        b = len(prompts)
        lens = torch.tensor([len(p) for p in prompts])
        if (lens == 0).any():
            raise ValueError("empty prompt")
        min_len, max_len = int(lens.min()), int(lens.max())
        total = max_len + params.max_new_tokens
        tokens = torch.zeros(b, total, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p)
        positions = torch.arange(total).unsqueeze(0).expand(b, -1)
        ctx = StaticInferenceContext(b, total)
        gens = [torch.Generator().manual_seed(params.seed * 1_000_003 + first_index + i)
                for i in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        finish = ["length"] * b
        sample_lp = [[] for _ in range(b)]
        policy_lp = [[] for _ in range(b)]
        ends = lens + params.max_new_tokens  # last position (exclusive) per sequence
        stop = torch.tensor(sorted(set(params.stop_ids)), dtype=torch.long)
        prev = 0
        for cur in range(min_len, total):
            step_tokens = tokens[:, prev:cur].to(self.device)
            step_pos = positions[:, prev:cur].to(self.device)
            logits = self._forward(step_tokens, step_pos, ctx)
            ctx.increment_sequence_len_offset(cur - prev)
            prev = cur
            new = torch.zeros(b, dtype=torch.long)
            if logits is not None:
                # The real vocabulary only: padded ids can never be picked, and the
                # samples do not depend on how much padding this TP size adds.
                logits = logits[:, :self.vocab_size].cpu()
                policy = torch.log_softmax(logits, dim=-1)
                if params.greedy:
                    new = logits.argmax(-1)
                    samp = torch.zeros(b)
                else:
                    filt = torch.log_softmax(_filter_logits(logits, params), dim=-1)
                    probs = filt.exp()
                    new = torch.stack([torch.multinomial(probs[i], 1, generator=gens[i])[0]
                                       for i in range(b)])
                    samp = filt.gather(-1, new[:, None])[:, 0]
                pol = policy.gather(-1, new[:, None])[:, 0]
            new = self._share_from_last_stage(new.to(self.device)).cpu()
            in_prompt = cur < lens
            active = ~done & ~in_prompt & (cur < ends)
            tokens[:, cur] = torch.where(in_prompt, tokens[:, cur], new)
            if logits is not None:
                for i in torch.nonzero(active).flatten().tolist():
                    sample_lp[i].append(float(samp[i]))
                    policy_lp[i].append(float(pol[i]))
            for i in torch.nonzero(active).flatten().tolist():
                if len(stop) and (new[i] == stop).any():
                    done[i] = True
                    finish[i] = "stop"
            generated_enough = (torch.tensor([cur + 1 for _ in range(b)]) >= ends) & ~in_prompt
            done |= generated_enough
            if bool(done.all()):
                break
        responses = []
        for i in range(b):
            n = int(lens[i])
            resp = tokens[i, n:n + params.max_new_tokens].tolist()
            if finish[i] == "stop":
                k = next(j for j, t in enumerate(resp) if t in set(params.stop_ids))
                resp = resp[:k + 1]
            else:
                resp = resp[:min(params.max_new_tokens, prev + 1 - n)]
            responses.append(resp)
            sample_lp[i] = sample_lp[i][:len(resp)]
            policy_lp[i] = policy_lp[i][:len(resp)]
        return RolloutBatch(prompt_ids=prompts, response_ids=responses, finish_reason=finish,
                            sample_logprobs=sample_lp if self.mp.is_last_stage else [],
                            policy_logprobs=policy_lp if self.mp.is_last_stage else [])
