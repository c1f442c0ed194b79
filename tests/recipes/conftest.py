"""A tiny causal checkpoint with a tokenizer, and preference pairs, for recipe tests."""

import json
import shutil

import pytest

from megarlhf.data.task import TaskConfig, write_task_files
from megarlhf.data.tokenizer import train_sentencepiece
from megarlhf.models.checkpoint import read_meta, write_meta


@pytest.fixture(scope="session")
def sft_like(mg_causal, tmp_path_factory):
    """(checkpoint, task files): the converted tiny Llama with a task tokenizer recorded."""
    root = tmp_path_factory.mktemp("sftlike")
    files = write_task_files(str(root / "task"), TaskConfig(num_sft=50, num_preference=96,
                                                            num_prompts=16, num_eval=16))
    texts = []
    for name in ("sft", "preference"):
        for line in open(files[name]):
            row = json.loads(line)
            texts += [row.get("prompt", ""), row.get("chosen", ""), row.get("rejected", "")]
    tok = train_sentencepiece([t for t in texts if t] * 4, 340, str(root / "tok.model"),
                              user_symbols=["<|user|>", "<|assistant|>", "<|system|>"])
    ckpt = root / "ckpt"
    shutil.copytree(mg_causal, ckpt)
    meta = read_meta(str(ckpt))
    write_meta(str(ckpt), meta.__class__(model=meta.model, kind="causal", tokenizer=tok.path,
                                         chat_template="tulu"))
    return ckpt, files
