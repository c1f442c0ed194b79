"""`megarlhf generate` and `megarlhf pairs` as commands (one process and relaunched at TP=2)."""

import json
import shutil

import pytest

from megarlhf.data.task import TaskConfig, write_task_files
from megarlhf.data.tokenizer import train_sentencepiece
from megarlhf.models.checkpoint import read_meta, write_meta
from tests.conftest import megarlhf


def cli(*args):
    return megarlhf(*args, threads="1", timeout=300)


def rows(path):
    return [json.loads(l) for l in open(path)]


def test_generate_prompt_ids_one_process_and_tp2_agree(mg_causal, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": [5 + i, 17, 300 + i], "id": i}) + "\n"
                               for i in range(5)))
    a = cli("generate", "--ckpt", mg_causal, "--prompts", prompts, "--out", tmp_path / "a.jsonl",
            "--max-new-tokens", 6, "--temperature", 0.8, "--seed", 2, "--max-batch", 2)
    assert a.returncode == 0, a.stderr[-3000:]
    b = cli("generate", "--ckpt", mg_causal, "--prompts", prompts, "--out", tmp_path / "b.jsonl",
            "--max-new-tokens", 6, "--temperature", 0.8, "--seed", 2, "--tp", 2)
    assert b.returncode == 0, b.stderr[-3000:]
    ra, rb = rows(tmp_path / "a.jsonl"), rows(tmp_path / "b.jsonl")
    assert [r["id"] for r in ra] == list(range(5))  # input order, extra fields kept
    assert [r["response_ids"] for r in ra] == [r["response_ids"] for r in rb]
    assert all(r["finish_reason"] == "length" and len(r["response_ids"]) == 6 for r in ra)
    assert "response" not in ra[0]  # no tokenizer recorded in this checkpoint


def test_generate_errors(mg_causal, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "text but no tokenizer"}) + "\n")
    r = cli("generate", "--ckpt", mg_causal, "--prompts", p, "--out", tmp_path / "o.jsonl")
    assert r.returncode == 2 and "line 1" in r.stderr and "prompt_ids" in r.stderr
    p.write_text(json.dumps({"prompt_ids": "oops"}) + "\n")
    r = cli("generate", "--ckpt", mg_causal, "--prompts", p, "--out", tmp_path / "o.jsonl")
    assert r.returncode == 2 and "field 'prompt_ids'" in r.stderr
    r = cli("generate", "--ckpt", mg_causal, "--prompts", p, "--out", tmp_path / "o.jsonl", "--tp", 3)
    assert r.returncode == 2 and "--tp/--pp" in r.stderr


@pytest.fixture()
def ckpt_with_tokenizer(mg_causal, tmp_path):
    """The tiny converted model plus a task tokenizer (its 1101-id vocabulary covers it)."""
    files = write_task_files(str(tmp_path / "task"), TaskConfig(num_sft=10, num_preference=10,
                                                                num_prompts=6, num_eval=4))
    texts = [json.loads(l)["messages"][1]["content"] for l in open(files["sft"])] * 30
    texts += [json.loads(l)["prompt"] for l in open(files["prompts"])] * 30
    tok = train_sentencepiece(texts, 340, str(tmp_path / "tok.model"),
                              user_symbols=["<|user|>", "<|assistant|>", "<|system|>"])
    ckpt = tmp_path / "ckpt"
    shutil.copytree(mg_causal, ckpt)
    meta = read_meta(str(ckpt))
    write_meta(str(ckpt), meta.__class__(model=meta.model, kind="causal", tokenizer=tok.path,
                                         chat_template="tulu"))
    return ckpt, files


def test_generate_text_prompts_and_pairs(ckpt_with_tokenizer, tmp_path):
    ckpt, files = ckpt_with_tokenizer
    r = cli("generate", "--ckpt", ckpt, "--prompts", files["eval"], "--out", tmp_path / "g.jsonl",
            "--greedy", "--max-new-tokens", 8)
    assert r.returncode == 0, r.stderr[-3000:]
    out = rows(tmp_path / "g.jsonl")
    assert len(out) == 4 and all(isinstance(o["response"], str) for o in out)
    r = cli("pairs", "--ckpt", ckpt, "--prompts", files["prompts"], "--out", tmp_path / "pairs.jsonl",
            "--samples-per-prompt", 3, "--max-new-tokens", 8)
    assert r.returncode == 0, r.stderr[-3000:]
    pairs = rows(tmp_path / "pairs.jsonl")
    # a random model is never right: chosen falls back to the task's worked solution
    src = {json.loads(l)["prompt"]: json.loads(l) for l in open(files["prompts"])}
    assert len(pairs) == 6 and "chosen_from_solution': 6" in r.stdout
    for p in pairs:
        assert p["chosen"] == src[p["prompt"]]["solution"] and p["rejected"] != p["chosen"]
    # the pairs load as an ordinary preference file
    from megarlhf.data.load import SourceConfig, load_examples
    ex, _ = load_examples([SourceConfig(path=str(tmp_path / "pairs.jsonl"))], "preference")
    assert len(ex) == 6
