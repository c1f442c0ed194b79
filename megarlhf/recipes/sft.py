"""Supervised fine-tuning of a causal LM on chat data.

    megarlhf sft                                   # the built-in arithmetic task, tiny model
    megarlhf sft --config examples/tiny/sft.yaml parallel.tensor_model_parallel_size=2

Steps: tokenizer and data -> model (fresh or from a checkpoint) -> megatron DDP,
optimizer and LR schedule -> loop over global batches (packed or padded microbatches
through megatron's schedules; the loss is the mean over all assistant tokens of the
global batch; resumable training checkpoints every ``save_interval`` steps, at the end
and when a signal asks the job to stop) -> exact-match evaluation of greedy answers on
held-out prompts -> a distributed checkpoint that records its tokenizer and chat template.

Departures from open-instruct's Tulu 2 SFT: packing keeps examples apart with a
block-diagonal attention mask (RoPE makes positions relative) rather than
cross-contaminating them; the loss is per token over the global batch (as
open-instruct's "sum" reduction normalised by tokens).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from megarlhf.config import ConfigError, ModelConfig, ParallelConfig, check_layout, preset, with_runtime_of
from megarlhf.models.llama import check_row_length
from megarlhf.data.chat import ChatTemplateConfig
from megarlhf.data.dataset import DataConfig
from megarlhf.data.task import TaskConfig
from megarlhf.data.tokenizer import TokenizerConfig
from megarlhf.train.metrics import LogConfig
from megarlhf.train.loop import EvalConfig, OneModelLoopConfig
from megarlhf.train.schedule import ScheduleConfig

__all__ = ["SFTConfig", "TrainConfig", "run"]


def _tiny_model() -> ModelConfig:
    # vocab_size 0: taken from the tokenizer
    return preset("tiny", vocab_size=0, max_position_embeddings=256, params_dtype="auto")


@dataclass(frozen=True)
class TrainConfig(OneModelLoopConfig):
    """The optimisation loop (:class:`~megarlhf.train.loop.OneModelLoopConfig`) of SFT."""

    global_batch_size: int = 32
    """Examples per optimizer step (over all data-parallel ranks)."""
    micro_batch_size: int = 8
    """Rows per microbatch (a packed row holds several examples)."""
    seq_length: int = 256
    """Tokens per row; at least ``data.max_length``."""
    packing: bool = True
    """Pack several examples per row (attention kept within each example: through
    megatron's packed-sequence ``thd`` layout with Transformer Engine or SDPA, which
    ``model.attention_backend=auto`` becomes; block-diagonal masks with ``unfused``)."""
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Floor of the decay schedule."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_ratio=0.05))
    adam_beta2: float = 0.98
    out_dir: str = "runs/sft"
    """The model (``out_dir/checkpoint``), training checkpoints (``out_dir/checkpoints``),
    metrics (``metrics.jsonl``), task files."""
    init_from: Optional[str] = None
    """Start from this checkpoint instead of fresh weights (its shape; ``model``'s runtime
    fields)."""


@dataclass(frozen=True)
class SFTConfig:
    model: ModelConfig = field(default_factory=_tiny_model)
    """The model: its shape and how it runs. With ``train.init_from`` the shape is the
    checkpoint's and only the runtime fields here apply (``params_dtype``,
    ``transformer_impl``, ``attention_backend``, ``fp8*``, ``recompute_*``,
    ``bias_activation_fusion``)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    chat_template: ChatTemplateConfig = field(default_factory=ChatTemplateConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=128, max_prompt_length=96))
    """Default (no sources): the built-in task's ``sft.jsonl``."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The built-in task (used when data or tokenizer are not given)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=lambda: LogConfig(interval=20))
    world: int = 1
    """Processes started when launched without torchrun/srun (TP x PP x DP)."""

    def world_size(self) -> int:
        return self.world

    def resolved_models(self) -> Dict[str, ModelConfig]:
        """The model this job builds: ``model``; from ``train.init_from``, the checkpoint's
        shape run as ``model``'s runtime fields say (dtype, layers, FP8, recomputation...)."""
        from megarlhf.models.checkpoint import read_meta

        if not self.train.init_from:
            return {"model": self.model}
        return {"model": with_runtime_of(read_meta(self.train.init_from).model, self.model)}

    def validate(self) -> None:
        from megarlhf.config import parallel_problems, range_problems
        from megarlhf.data.dataset import data_problems
        from megarlhf.data.task import task_problems

        problems = parallel_problems(self.parallel) + self.train.problems()
        problems += data_problems(self.data) + task_problems(self.task)
        problems += range_problems(self, "", positive=("world",))
        problems += self.eval.problems()
        problems += range_problems(self.log, "log", positive=("interval",))
        if problems:  # the checks below divide by these sizes
            raise ConfigError(problems)
        if self.world % self.parallel.model_parallel_size:
            problems.append(f"world={self.world} is not divisible by TP x PP = "
                            f"{self.parallel.model_parallel_size}")
        t = self.train
        if t.seq_length < self.data.max_length:
            problems.append(f"train.seq_length={t.seq_length} is shorter than "
                            f"data.max_length={self.data.max_length}")
        try:  # every row is train.seq_length tokens long
            check_row_length(t.seq_length, self.model, self.parallel)
        except ConfigError as e:
            problems += e.problems
        if t.seq_length > self.model.max_position_embeddings:
            problems.append(f"train.seq_length={t.seq_length} exceeds "
                            f"model.max_position_embeddings={self.model.max_position_embeddings}")
        dp = max(1, self.world // self.parallel.model_parallel_size)
        if t.global_batch_size % dp:
            problems.append(f"train.global_batch_size={t.global_batch_size} is not divisible by the "
                            f"data-parallel size {dp}")
        if problems:
            raise ConfigError(problems)
        model = self.model if self.model.vocab_size else dataclasses.replace(self.model, vocab_size=1)
        check_layout(model, self.parallel, self.world)


def _sources_or_builtin(cfg: SFTConfig, builtin: dict) -> DataConfig:
    from megarlhf.data.load import SourceConfig

    if cfg.data.sources:
        return cfg.data
    return dataclasses.replace(cfg.data, sources=[SourceConfig(path=builtin["sft"], name="task-sft")],
                               eval_size=0)


def run(cfg: SFTConfig) -> dict:
    from megarlhf.data.batch import pack_examples, pad_examples, thd_tokens, to_thd
    from megarlhf.data.builtin import prepare_builtin_task
    from megarlhf.data.chat import read_hf_chat_template
    from megarlhf.data.dataset import build_dataset
    from megarlhf.data.sampler import ShardedSampler
    from megarlhf.data.tokenizer import load_tokenizer
    from megarlhf.models.checkpoint import load_model, read_meta, save_model, tokenizer_path
    from megarlhf.models.llama import build_model, describe, packed_model, pad_to, sequence_multiple_of
    from megarlhf.parallel import destroy
    from megarlhf.recipes.common import Evaluator, lm_forward_step
    from megarlhf.recipes.pairs_common import make_template, output_meta, recorded_template
    from megarlhf.train.job import make_trainable, resume, save_state, start_run, total_steps_of

    t_start = time.time()
    t = cfg.train
    run_ = start_run("sft", cfg, cfg.parallel)
    mp, log = run_.mp, run_.log

    # -- tokenizer, chat template and data --------------------------------------------------
    init_meta = read_meta(t.init_from) if t.init_from else None
    tok_path = cfg.tokenizer.path or (init_meta and tokenizer_path(init_meta, t.init_from))
    builtin_data = not cfg.data.sources
    builtin = None
    if builtin_data or not tok_path:
        builtin = prepare_builtin_task(os.path.join(t.out_dir, "task"), cfg.task)
    tok_path = tok_path or builtin["tokenizer"]
    tokenizer = load_tokenizer(tok_path, cfg.tokenizer)
    # The model's own template (from its checkpoint, or beside a Hugging Face tokenizer), a
    # configured one, or Tulu for the built-in task's tokenizer.
    recorded = recorded_template(init_meta) if init_meta else None
    if recorded is None and cfg.tokenizer.path:
        jinja = read_hf_chat_template(os.path.dirname(os.path.abspath(cfg.tokenizer.path)))
        recorded = {"name": "jinja", "jinja": jinja} if jinja else None
    template = make_template(tokenizer, cfg.chat_template, recorded, "sft", say=log.say,
                             generation_config=init_meta.extra.get("generation_config") if init_meta else None,
                             fallback="tulu" if builtin and tok_path == builtin["tokenizer"] else None)
    data = build_dataset(_sources_or_builtin(cfg, builtin or {}), "sft", template)
    for line in data.summary():
        log.say(f"data: {line}")

    # -- model -------------------------------------------------------------------------------
    model_cfg = with_runtime_of(init_meta.model, cfg.model) if init_meta else cfg.model
    if not model_cfg.vocab_size:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError([f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
                           f"tokenizer's {tokenizer.vocab_size} ({tok_path})"])
    check_layout(model_cfg, cfg.parallel, run_.env.world_size)
    if t.packing and model_cfg.attention_backend == "auto":  # packed rows as thd through SDPA
        model_cfg = packed_model(model_cfg, True, say=log.say)
    chunks = build_model(model_cfg, mp)
    if t.init_from:
        load_model(chunks, t.init_from)
    log.say(f"model: {describe(model_cfg, mp)}")
    sampler = ShardedSampler(len(data.train), t.global_batch_size, mp.dp_rank, mp.dp_size, seed=t.seed)
    total_steps = total_steps_of(t, sampler.steps_per_epoch)
    tr = make_trainable(chunks, mp, t, t.lr, t.min_lr, total_steps)
    meta = output_meta(model_cfg, "causal", tok_path, template, init_meta, recipe="sft")
    step, consumed = resume(run_, t, chunks, tr, "examples")
    # Packed rows reach the attention as megatron's thd layout (cu_seqlens) where the kernel
    # takes it (Transformer Engine, SDPA), else as block-diagonal masks (unfused attention).
    thd = t.packing and (model_cfg.transformer_impl == "transformer_engine" or model_cfg.attention_backend == "sdpa")
    multiple = sequence_multiple_of(chunks)
    log.say(f"training {total_steps} steps of {t.global_batch_size} examples "
            f"({sampler.steps_per_epoch} steps per epoch, {sampler.dropped_per_epoch} examples "
            f"left out of each epoch's last partial batch), "
            f"{'packed' if t.packing else 'padded'} rows of {t.seq_length} tokens"
            + (" (thd: cu_seqlens)" if thd else " (block-diagonal masks)" if t.packing else ""))

    # exact match: what the config names; the built-in task's own when it is the data
    evaluate = Evaluator(chunks, mp, model_cfg, template, cfg.eval,
                         cfg.eval.prompts or (builtin["eval"] if builtin_data else None), t.eval_interval, log.say)
    if step == 0 and cfg.eval.at_start:
        evaluate(0, log)
    ids_col, mask_col = data.train["input_ids"], data.train["loss_mask"]
    forward_step = lm_forward_step(mp, model_cfg, run_.device)
    batches = sampler.batches(consumed)
    log.start_progress(total_steps, step)
    t_loop = time.time()
    while step < total_steps:
        step += 1
        examples = [(ids_col[i], mask_col[i]) for i in next(batches)]
        if t.packing:
            batch = pack_examples(examples, t.seq_length, tokenizer.pad_id, row_multiple=t.micro_batch_size,
                                  attention_mask=not thd)
        else:
            rows = -(-len(examples) // t.micro_batch_size) * t.micro_batch_size
            batch = pad_examples(examples, t.seq_length, tokenizer.pad_id, rows=rows)
        micro = _split(batch, t.micro_batch_size)
        seq, rows = t.seq_length, t.micro_batch_size
        if thd:  # under pipeline stages every microbatch as long as the longest
            common = None if cfg.parallel.pp == 1 else pad_to(max(thd_tokens(m) for m in micro), multiple)
            micro = [to_thd(m, row=common, multiple=multiple) for m in micro]
            seq, rows = max(m.tokens.shape[1] for m in micro), 1
        res = tr.step(mp, forward_step, micro, seq, rows, step, run_.preempt)
        consumed += t.global_batch_size
        loss_sum, n_tok = _global_loss(res["outputs"], mp)
        log.log(step, {"loss": loss_sum / max(n_tok, 1), **tr.record(res, n_tok),
                       "epoch": round(consumed / sampler.samples_per_epoch, 2)},
                echo=step % cfg.log.interval == 0 or step in (1, total_steps))
        if evaluate.due(step, total_steps):
            evaluate(step, log)
        run_.preempt.end_of_step(step, total_steps, t.save_interval, lambda: save_state(
            t, step, consumed, chunks, tr, meta), log)  # collective; a signal on any rank stops every rank
    train_time = time.time() - t_loop
    save_state(t, step, consumed, chunks, tr, meta)

    accuracy = evaluate(total_steps, log)
    measured = {"exact_match": accuracy, "eval_prompts": evaluate.last_n} if accuracy is not None else {}
    ckpt = os.path.join(t.out_dir, "checkpoint")
    save_model(chunks, ckpt, dataclasses.replace(meta, extra={
        **meta.extra, "steps": total_steps, "consumed_samples": consumed, **measured}))
    result = {"steps": total_steps, **measured, "train_seconds": round(train_time, 1),
              "total_seconds": round(time.time() - t_start, 1), "checkpoint": ckpt}
    log.log(total_steps, {"train_seconds": result["train_seconds"]}, echo=False)
    log.close()
    log.say(f"saved {ckpt}; training took {train_time:.0f} s, everything {result['total_seconds']:.0f} s")
    destroy()
    return result


def _split(batch, mbs: int) -> List:
    from megarlhf.data.batch import LMBatch

    out = []
    for s in range(0, batch.tokens.shape[0], mbs):
        sl = slice(s, s + mbs)
        out.append(LMBatch(batch.tokens[sl], batch.labels[sl], batch.loss_mask[sl],
                           None if batch.attention_mask is None else batch.attention_mask[sl],
                           batch.position_ids[sl], None if batch.lengths is None else batch.lengths[sl]))
    return out


def _global_loss(outputs, mp) -> tuple:
    """(sum of token losses, loss tokens) over the whole global batch, on every rank."""
    from megarlhf import platform

    t = torch.zeros(2, dtype=torch.float64, device=platform.current().device)
    for o in outputs:
        t += o["lm_loss"].double()
    if mp.config.pp > 1:
        torch.distributed.all_reduce(t, group=mp.pp_group)  # only the last stage holds it
    torch.distributed.all_reduce(t, group=mp.dp_group)
    return float(t[0]), int(t[1])
