"""Tokenized datasets: truncated examples dropped and counted, split by seed, empty is an error."""

import json

import pytest

from megarlhf.data.dataset import DataConfig, build_dataset
from megarlhf.data.load import DataError, SourceConfig


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_preference_tokenization_filter_and_split(tmp_path, template):
    rows = [{"prompt": f"question {i}", "chosen": f"answer {i}", "rejected": f"answer {i + 1}"}
            for i in range(20)]
    rows.append({"prompt": "question " * 60, "chosen": "a", "rejected": "b"})  # prompt too long
    rows.append({"prompt": "q", "chosen": "answer " * 80, "rejected": "b"})    # response too long
    cfg = DataConfig(sources=[SourceConfig(path=write(tmp_path / "p.jsonl", rows))],
                     max_length=64, max_prompt_length=32, eval_size=5, seed=2)
    data = build_dataset(cfg, "preference", template)
    assert len(data.train) == 15 and len(data.eval) == 5
    rep = data.report.sources[0]
    assert (rep.rows, rep.truncated, rep.kept) == (22, 2, 20)
    ex = data.train[0]
    assert len(ex["chosen_ids"]) == len(ex["chosen_mask"]) <= 64
    assert ex["prompt_len"] <= 32 and sum(ex["chosen_mask"]) > 0
    assert "truncated 2" in data.summary()[0]
    again = build_dataset(cfg, "preference", template)
    assert again.train["row"] == data.train["row"]  # the split is deterministic


def test_prompt_and_sft_kinds(tmp_path, template):
    p = write(tmp_path / "p.jsonl", [{"prompt": f"question {i}", "reference": str(i)} for i in range(4)])
    data = build_dataset(DataConfig(sources=[SourceConfig(path=p)]), "prompts", template)
    assert len(data.train) == 4 and data.train[0]["prompt_ids"][-1] == template.tok.encode("<|assistant|>\n")[-1]
    s = write(tmp_path / "s.jsonl", [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(4)])
    data = build_dataset(DataConfig(sources=[SourceConfig(path=s)]), "sft", template)
    assert data.train[0]["loss_mask"][data.train[0]["prompt_len"]] is True


def test_everything_truncated_is_an_error(tmp_path, template):
    p = write(tmp_path / "p.jsonl", [{"prompt": "question " * 50, "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="no examples left after dropping"):
        build_dataset(DataConfig(sources=[SourceConfig(path=p)], max_prompt_length=8), "preference",
                      template)
    q = write(tmp_path / "q.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3)
    with pytest.raises(DataError, match="leaves no training examples"):
        build_dataset(DataConfig(sources=[SourceConfig(path=q)], eval_size=3, dedup=False,
                                 max_length=64), "preference", template)
