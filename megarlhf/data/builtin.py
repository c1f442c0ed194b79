"""The built-in task's files and tokenizer, prepared once per output folder."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Dict

import torch.distributed as dist

from megarlhf.data.task import TASK_FILES, TaskConfig, task_texts, write_task_files
from megarlhf.data.tokenizer import train_sentencepiece

__all__ = ["prepare_builtin_task", "BUILTIN_VOCAB_SIZE"]

BUILTIN_VOCAB_SIZE = 384
_TEMPLATE_MARKERS = ("<|user|>", "<|assistant|>", "<|system|>")


def prepare_builtin_task(folder: str, cfg: TaskConfig) -> Dict[str, str]:
    """Write the task's JSONL files and train its SentencePiece tokenizer into ``folder``
    (rank 0 writes, the others wait; an existing, identical preparation is reused).
    Returns the file paths, plus ``tokenizer``."""
    stamp = os.path.join(folder, "task.json")
    paths = {name: os.path.join(folder, f"{name}.jsonl") for name in TASK_FILES}
    paths["tokenizer"] = os.path.join(folder, "tokenizer.model")
    rank = dist.get_rank() if dist.is_initialized() else 0
    want = {"task": asdict(cfg), "vocab_size": BUILTIN_VOCAB_SIZE}
    if rank == 0:
        current = None
        if os.path.isfile(stamp):
            with open(stamp) as f:
                current = json.load(f)
        if current != want or not all(os.path.isfile(p) for p in paths.values()):
            write_task_files(folder, cfg)
            # The template markers are single pieces, as special tokens are in real tokenizers.
            train_sentencepiece(task_texts(cfg), BUILTIN_VOCAB_SIZE, paths["tokenizer"],
                                user_symbols=_TEMPLATE_MARKERS)
            with open(stamp + ".tmp", "w") as f:
                json.dump(want, f)
            os.replace(stamp + ".tmp", stamp)
    if dist.is_initialized():
        dist.barrier()
    return paths
