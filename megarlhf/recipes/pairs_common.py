"""Plain functions shared by the pairwise recipes (reward model, DPO): configs of the loop,
model set-up, pair microbatches, metric reduction and checkpoint plumbing."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megarlhf.config import ParallelConfig, RuntimeConfig
from megarlhf.data.chat import ChatTemplateConfig
from megarlhf.train.metrics import LogConfig
from megarlhf.train.loop import OneModelLoopConfig
from megarlhf.train.schedule import ScheduleConfig

__all__ = ["PairsTrainConfig", "PairsSetup", "set_up_pairs", "PairsJobConfig", "pair_job_problems", "pair_microbatches", "micro_rows", "load_init", "tokenizer_of", "recorded_template",
           "make_template", "output_meta"]


@dataclass(frozen=True)
class PairsTrainConfig(OneModelLoopConfig):
    """The optimisation loop (:class:`~megarlhf.train.loop.OneModelLoopConfig`) of a pairwise
    recipe (reward model, DPO)."""

    global_batch_size: int = 64
    """Pairs per optimizer step (over all data-parallel ranks)."""
    micro_batch_size: int = 8
    """Pairs per microbatch (2x rows: chosen and rejected in one forward)."""
    seq_length: int = 128
    """Tokens per row; at least ``data.max_length``."""
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 1e-6
    """Floor of the decay schedule."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_ratio=0.03))
    distributed_optimizer: bool = True
    """Shard optimizer states over data-parallel ranks when DP > 1."""
    init_from: str = "runs/sft/checkpoint"
    """The starting checkpoint (an SFT model)."""
    packing: bool = False
    """Pack the sequences of a step into microbatches of ``2 x micro_batch_size`` rows of
    ``seq_length`` tokens (each sequence whole, attention kept within it, positions from
    0), as many pairs per microbatch as fit, instead of ``micro_batch_size`` pairs padded
    to their longest sequence. The same losses and gradients, less padding. Local layers
    attend through SDPA (``auto`` becomes ``sdpa``); Transformer Engine layers get
    megatron's ``thd`` layout in their fused attention."""


@dataclass(frozen=True)
class PairsJobConfig:
    """What the reward model's and DPO's configs share: one model from ``train.init_from``
    on one layout over ``world`` processes."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: RuntimeConfig = field(default_factory=RuntimeConfig)
    """How the model runs (precision, layers, FP8, recomputation); unset fields keep the
    starting checkpoint's."""
    chat_template: ChatTemplateConfig = field(default_factory=ChatTemplateConfig)
    """How conversations are formatted: ``auto`` (default) is the starting checkpoint's own
    template; naming another is reported once at start."""
    log: LogConfig = field(default_factory=LogConfig)
    world: int = 1
    """Processes started when launched without torchrun/srun."""

    def world_size(self) -> int:
        return self.world

    def resolved_models(self) -> Dict[str, Any]:
        """The model this job builds: the starting checkpoint's, run as ``model`` says
        (reads the checkpoint's metadata; no process group needed)."""
        from megarlhf.models.checkpoint import read_meta

        return {"model": self.model.apply(read_meta(self.train.init_from).model)}


def pair_job_problems(cfg, finite: Tuple[str, ...] = ()) -> List[str]:
    """The checks the reward model and DPO share: ranges of every section (``finite``:
    top-level fields that must be finite numbers), then, when those hold, how batches and
    rows fit the layout."""
    from megarlhf.config import parallel_problems, range_problems, runtime_problems
    from megarlhf.data.dataset import data_problems
    from megarlhf.models.llama import packing_problems

    p = runtime_problems(cfg.model) + parallel_problems(cfg.parallel) + cfg.train.problems()
    p += data_problems(cfg.data) + range_problems(cfg, "", positive=("world",), finite=finite)
    p += range_problems(cfg.log, "log", positive=("interval",))
    if p:  # the checks below divide by these sizes
        return p
    t, mp_size = cfg.train, cfg.parallel.model_parallel_size
    if cfg.world % mp_size:
        p.append(f"world={cfg.world} is not divisible by TP x PP = {mp_size}")
    dp = max(1, cfg.world // mp_size)
    if t.global_batch_size % (dp * t.micro_batch_size):
        p.append(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                 f"DP={dp} x train.micro_batch_size={t.micro_batch_size}")
    if t.seq_length < cfg.data.max_length:
        p.append(f"train.seq_length={t.seq_length} is shorter than data.max_length={cfg.data.max_length}")
    if t.packing:
        p += packing_problems(cfg.model)
    return p


def tokenizer_of(meta, ckpt_dir: str, chosen=None, say=None, require: bool = True):
    """The tokenizer recorded in a checkpoint and the chat template conversations are
    formatted with: ``chosen`` (a ChatTemplateConfig) when it names one, else the
    checkpoint's own (``auto``). ``say`` reports a choice that differs from the
    checkpoint's, once. Without any template: an error naming the fix (``require``), or
    None (token ids only)."""
    from megarlhf.data.tokenizer import load_tokenizer
    from megarlhf.models.checkpoint import tokenizer_path

    path = tokenizer_path(meta, ckpt_dir)
    if path is None:
        raise ValueError(f"{ckpt_dir}: the checkpoint records no tokenizer (set tokenizer.path)")
    tok = load_tokenizer(path)
    return tok, make_template(tok, chosen, recorded_template(meta), ckpt_dir, say=say, require=require,
                              generation_config=meta.extra.get("generation_config"))


def make_template(tok, chosen, recorded: Optional[Dict[str, Any]], where: str, say=None, require: bool = True,
                  generation_config: Optional[Dict[str, Any]] = None, fallback: Optional[str] = None):
    """The ChatTemplate of a job (see :func:`megarlhf.data.chat.resolve_chat_template`):
    ``chosen`` when it names one (reported through ``say`` when the model has its own),
    else ``recorded`` (the model's), else ``fallback``; its stop ids include the model's
    generation settings' EOS ids. None, or an error naming the fix, without any."""
    from megarlhf.data.chat import ChatTemplate, ChatTemplateConfig, ChatTemplateError, resolve_chat_template

    cfg = resolve_chat_template(chosen or ChatTemplateConfig(), recorded, where, fallback)
    if cfg is None:
        if not require:
            return None
        raise ChatTemplateError(
            f"{where}: the model records no chat template (it came without one) and chat_template.name is "
            "auto: name one (chat_template.name=tulu, llama3, custom, or jinja with chat_template.jinja=FILE), "
            "or give token ids instead of text")
    if say is not None and recorded and chosen is not None and chosen.name != "auto":
        say(f"chat template: {cfg.name} (chat_template.name), not the model's own ({recorded['name']})")
    stops = (generation_config or {}).get("eos_token_id")
    stops = [stops] if isinstance(stops, int) else [i for i in stops or [] if isinstance(i, int)]
    return ChatTemplate(cfg, tok, extra_stop_ids=[i for i in stops if 0 <= i < tok.vocab_size])


def recorded_template(meta) -> Optional[Dict[str, Any]]:
    """The chat template a checkpoint records (as ChatTemplateConfig fields), or None."""
    cfg = meta.extra.get("chat_template_config")
    if cfg:
        return dict(cfg)
    return {"name": meta.chat_template} if meta.chat_template else None


# What a trained checkpoint carries over from the one it started from, so that export
# writes back what came in (the source's config.json and generation settings).
CARRIED = ("hf_config", "generation_config")


def output_meta(model_cfg, kind: str, tokenizer: str, template, init_meta=None, **extra):
    """The metadata of a checkpoint a recipe writes: its model, the tokenizer (an absolute
    path), the chat template it was trained with (its name, and every field in
    ``extra.chat_template_config``, a Jinja template's text included), what it carries
    over from ``init_meta``, and ``extra``."""
    from megarlhf.models.checkpoint import CheckpointMeta

    carried = {k: v for k, v in (init_meta.extra.items() if init_meta else ()) if k in CARRIED}
    return CheckpointMeta(model=model_cfg, kind=kind, tokenizer=os.path.abspath(tokenizer),
                          chat_template=template.name,
                          extra={**carried, "chat_template_config": dataclasses.asdict(template.cfg), **extra})


@dataclass
class PairsSetup:
    """What a pairwise recipe starts from: the starting checkpoint's metadata, tokenizer
    and chat template, the tokenized pairs, the model (loaded) and the row multiple."""

    init_meta: Any
    tokenizer: Any
    template: Any
    data: Any
    model_cfg: Any
    chunks: List[torch.nn.Module]
    multiple: int
    """Rows are padded to a multiple of this (:func:`~megarlhf.models.llama.check_row_length`)."""
    fresh_head: bool


def set_up_pairs(cfg, run, kind: str) -> PairsSetup:
    """Tokenizer and template from ``train.init_from``, the preference data, and the model
    (``kind``: ``causal`` for DPO's policy, ``reward`` for a reward model: a fresh scalar
    head when the checkpoint is causal) on the run's layout."""
    from megarlhf.config import check_layout
    from megarlhf.data.dataset import build_dataset
    from megarlhf.models.checkpoint import read_meta
    from megarlhf.models.llama import build_model, check_row_length, packed_model

    t, log = cfg.train, run.log
    init_meta = read_meta(t.init_from)
    tokenizer, template = tokenizer_of(init_meta, t.init_from, cfg.chat_template, log.say)
    data = build_dataset(cfg.data, "preference", template)
    for line in data.summary():
        log.say(f"data: {line}")
    model_cfg = packed_model(cfg.model.apply(init_meta.model), t.packing, log.say)
    check_layout(model_cfg, cfg.parallel, run.env.world_size)
    multiple = check_row_length(t.seq_length, model_cfg, cfg.parallel)
    chunks = build_model(model_cfg, run.mp, kind=kind)
    fresh = bool(load_init(chunks, t.init_from, kind, init_meta.kind))
    return PairsSetup(init_meta, tokenizer, template, data, model_cfg, chunks, multiple, fresh)


def load_init(chunks, ckpt_dir: str, kind: str, init_kind: str) -> List[str]:
    """Weights from ``ckpt_dir``; a reward/value model started from a causal checkpoint gets
    a fresh scalar head (the LM head is not loaded)."""
    from megarlhf.models.checkpoint import load_model

    skip = ("output_layer.",) if kind == "reward" and init_kind == "causal" else ()
    if kind == "causal" and init_kind == "reward":
        raise ValueError(f"{ckpt_dir} is a reward model; a policy needs a causal checkpoint")
    return load_model(chunks, ckpt_dir, skip_prefixes=skip)


def pair_microbatches(ds, indices: Sequence[int], mbs: int, seq_length: int, pad_id: int,
                      with_ref: bool = False, margin: Optional[float] = None,
                      multiple: int = 8, packing: bool = False, trim: bool = False) -> Tuple[List[Any], int]:
    """Pair batches of rows ``indices`` of a tokenized preference dataset, and their row
    length. Padded: ``mbs`` pairs per microbatch (``2 * mbs`` rows), rows padded to the
    longest sequence among them rounded up to ``multiple`` (the model's
    :func:`~megarlhf.models.llama.sequence_multiple`; at most ``seq_length``, itself a
    multiple), the same for every microbatch of the call, as pipeline stages require.
    ``packing``: each microbatch one row holding as many pairs as fit end to end in
    ``2 * mbs * seq_length`` tokens (:func:`~megarlhf.data.batch.pack_pairs`), as long as
    its tokens (``trim``) or as the call's longest (pipeline stages). :func:`micro_rows`
    gives the rows."""
    from megarlhf.data.batch import pack_pairs, pair_batch
    from megarlhf.models.llama import pad_to

    rows_all = [ds[int(i)] for i in indices]
    pairs_all = [((r["chosen_ids"], r["chosen_mask"]), (r["rejected_ids"], r["rejected_mask"])) for r in rows_all]
    refs_all = [(r["ref_chosen"], r["ref_rejected"]) for r in rows_all] if with_ref else None
    margins_all = [margin] * len(rows_all) if margin else None
    if packing:
        micro = pack_pairs(pairs_all, 2 * mbs * seq_length, pad_id, refs_all, margins_all, trim=trim,
                           multiple=multiple)
        return micro, max([m.tokens.shape[1] for m in micro] or [seq_length])
    longest = max([max(len(c[0]), len(r[0])) for c, r in pairs_all] or [1])
    seq_length = min(seq_length, pad_to(longest, multiple))
    out = []
    for s in range(0, len(rows_all), mbs):
        sl = slice(s, s + mbs)
        out.append(pair_batch(pairs_all[sl], seq_length, pad_id, refs_all and refs_all[sl],
                              margins_all and margins_all[sl], num_pairs=mbs))
    return out, seq_length


def micro_rows(micro: Sequence[Any], mbs: int) -> int:
    """Rows per microbatch of :func:`pair_microbatches`' output: one packed row, or
    ``2 * mbs``."""
    return 1 if micro and micro[0].packed_seq_params is not None else 2 * mbs
