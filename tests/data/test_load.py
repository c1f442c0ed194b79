"""Loaders: every schema, the paper's mixing and capping, and every kind of bad input."""

import json
import random

import pytest

from megarlhf.data.load import DataError, SourceConfig, load_examples
from megarlhf.data.schemas import PairRule, RowError, parse_transcript


def jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def load(path, kind="preference", **kw):
    schema = kw.pop("schema", "auto")
    cap = kw.pop("max_samples", None)
    aspects = kw.pop("aspects", None)
    return load_examples([SourceConfig(path=str(path), schema=schema, max_samples=cap,
                                       aspects=aspects)], kind, **kw)


U = lambda text: [{"role": "user", "content": text}]  # noqa: E731


def test_pairs_strings(tmp_path):
    p = jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    ex, rep = load(p)
    assert ex == [{"prompt": U("2+2?"), "chosen": "4", "rejected": "5", "row": 1, "source": "p.jsonl",
                   "subset": None}]
    assert rep.sources[0].kept == 1


def test_pairs_message_lists_ultrafeedback_binarized(tmp_path):
    conv = lambda a: [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a}]  # noqa
    p = jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": conv("hello!"), "rejected": conv("go away")}])
    ex, _ = load(p)
    assert ex[0]["prompt"] == U("hi") and ex[0]["chosen"] == "hello!" and ex[0]["rejected"] == "go away"


def test_ultrafeedback_mean_of_aspects(tmp_path):
    def comp(text, *ratings):
        names = ["helpfulness", "honesty", "instruction_following", "truthfulness"]
        return {"response": text, "annotations": {n: {"Rating": str(r)} for n, r in zip(names, ratings)}}
    row = {"instruction": "q", "completions": [comp("a", 5, 1, 1, 1), comp("b", 3, 3, 3, 3),
                                               comp("c", 2, 2, 2, "N/A"), comp("d", 1, 1, 1, 1)]}
    p = jsonl(tmp_path / "uf.jsonl", [row])
    ex, _ = load(p, rule=PairRule(rejected="lowest"))
    # means: a 2.0, b 3.0, c 2.0 (N/A excluded), d 1.0 -> chosen b (not a: the mean, not one aspect)
    assert (ex[0]["chosen"], ex[0]["rejected"]) == ("b", "d")
    ex, _ = load(p, rule=PairRule(rejected="random"), seed=3)
    assert ex[0]["chosen"] == "b" and ex[0]["rejected"] in ("a", "c", "d")
    ex, _ = load(p, aspects=["helpfulness"], rule=PairRule(rejected="lowest"))
    assert (ex[0]["chosen"], ex[0]["rejected"]) == ("a", "d")


def test_ultrafeedback_ties_and_margins(tmp_path):
    same = {"instruction": "q", "completions": [
        {"response": "a", "annotations": {"h": {"Rating": "3"}}},
        {"response": "b", "annotations": {"h": {"Rating": "3"}}}]}
    close = {"instruction": "r", "completions": [
        {"response": "a", "annotations": {"h": {"Rating": "4"}}},
        {"response": "b", "annotations": {"h": {"Rating": "3.5"}}}]}
    ok = {"instruction": "s", "completions": [
        {"response": "a", "annotations": {"h": {"Rating": "5"}}},
        {"response": "b", "annotations": {"h": {"Rating": "1"}}}]}
    p = jsonl(tmp_path / "uf.jsonl", [same, close, ok])
    ex, rep = load(p, skip_invalid=True, rule=PairRule(min_margin=1.0))
    assert [e["prompt"] for e in ex] == [U("s")]
    assert rep.sources[0].skipped == {"tie": 1, "small_margin": 1}


def test_hh_rlhf_transcripts(tmp_path):
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name?\n\nAssistant: Ada",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name?\n\nAssistant: no"}
    ex, _ = load(jsonl(tmp_path / "hh.jsonl", [row]))
    assert ex[0]["prompt"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": "name?"}]
    assert (ex[0]["chosen"], ex[0]["rejected"]) == ("Ada", "no")
    with pytest.raises(RowError):
        parse_transcript("no speakers here", "chosen")


def test_nectar_rankings(tmp_path):
    row = {"prompt": "\n\nHuman: best color?\n\nAssistant:",
           "answers": [{"answer": "blue", "rank": 2}, {"answer": "red", "rank": 1},
                       {"answer": "mud", "rank": 7}]}
    ex, _ = load(jsonl(tmp_path / "n.jsonl", [row]), rule=PairRule(rejected="lowest"))
    assert ex[0]["prompt"] == U("best color?") and (ex[0]["chosen"], ex[0]["rejected"]) == ("red", "mud")


def test_helpsteer_groups_rows_by_prompt(tmp_path):
    def r(prompt, resp, h):
        return {"prompt": prompt, "response": resp, "helpfulness": h, "correctness": h, "coherence": 4,
                "complexity": 2, "verbosity": 2}
    p = jsonl(tmp_path / "hs.jsonl", [r("p1", "good", 4), r("p2", "x", 3), r("p1", "bad", 1),
                                      r("p2", "y", 3)])
    ex, rep = load(p, schema="helpsteer", skip_invalid=True)
    assert [(e["prompt"][0]["content"], e["chosen"], e["rejected"]) for e in ex] == [("p1", "good", "bad")]
    assert rep.sources[0].skipped == {"tie": 1}


def test_prompts_and_sft_schemas(tmp_path):
    p = jsonl(tmp_path / "pr.jsonl", [{"prompt": "2+2?", "reference": 4},
                                      {"messages": [{"role": "user", "content": "hi"}]}])
    ex, _ = load(p, kind="prompts")
    assert ex[0]["reference"] == "4" and ex[1]["prompt"] == U("hi") and ex[1]["reference"] is None
    s = jsonl(tmp_path / "s.jsonl", [{"prompt": "hi", "response": "hello"},
                                     {"messages": U("q") + [{"role": "assistant", "content": "a"}]}])
    ex, _ = load(s, kind="sft")
    assert ex[0]["messages"][-1] == {"role": "assistant", "content": "hello"}


def test_json_and_parquet_files(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    assert len(load(tmp_path / "p.json")[0]) == 3
    import datasets
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    ex, _ = load(tmp_path / "p.parquet")
    assert [e["prompt"][0]["content"] for e in ex] == ["q0", "q1", "q2"] and ex[2]["row"] == 2


def test_mixture_with_per_source_cap_and_dedup(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "chosen": "x", "rejected": "y"} for i in range(10)]
              + [{"prompt": "a0", "chosen": "x", "rejected": "y"}])
    b = jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "chosen": "x", "rejected": "y"} for i in range(4)])
    srcs = [SourceConfig(path=a, max_samples=6), SourceConfig(path=b, max_samples=6, name="B")]
    ex, rep = load_examples(srcs, "preference", seed=5)
    assert [s.line() for s in rep.sources] == ["a.jsonl: 11 rows -> 6 kept; duplicates 1; capped 4",
                                               "B: 4 rows -> 4 kept"]
    again, _ = load_examples(srcs, "preference", seed=5)
    assert again == ex  # the cap is deterministic by seed
    other, _ = load_examples(srcs, "preference", seed=6)
    assert [e["prompt"] for e in other] != [e["prompt"] for e in ex]


# --------------------------------------------------------------------------- bad input

BAD = [
    ('{"prompt": "q", "chosen": "a", "rejected": "b"', "invalid JSON", "invalid_json"),
    ({"prompt": "q", "chosen": "a"}, "'rejected': missing", "missing_field"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen': expected a string, got int", "wrong_type"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "'prompt': empty text", "empty_text"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical to rejected", "identical_pair"),
    ({"instruction": "q", "completions": [{"response": "a", "annotations": {"h": {"Rating": "great"}}},
                                          {"response": "b", "annotations": {"h": {"Rating": "1"}}}]},
     "completions[0].annotations.h.Rating", "bad_rating"),
]


@pytest.mark.parametrize("row,needle,reason", BAD, ids=[b[2] for b in BAD])
def test_bad_row_stops_loading_naming_file_row_and_field(tmp_path, row, needle, reason):
    good = {"prompt": "fine", "chosen": "a", "rejected": "b"}
    if reason == "bad_rating":
        good = {"instruction": "fine", "completions": [
            {"response": "a", "annotations": {"h": {"Rating": "5"}}},
            {"response": "b", "annotations": {"h": {"Rating": "1"}}}]}
    p = jsonl(tmp_path / "data.jsonl", [good, good | {"prompt" if "prompt" in good else "instruction": "2"},
                                        row])
    with pytest.raises(DataError) as e:
        load(p)
    msg = str(e.value)
    assert "data.jsonl" in msg and "line 3" in msg and needle in msg and "skip_invalid" in msg
    ex, rep = load(p, skip_invalid=True)
    assert len(ex) == 2 and rep.sources[0].skipped == {reason: 1}


def test_all_rows_invalid_or_empty_is_an_error(tmp_path):
    p = jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError, match="no usable examples"):
        load(p, skip_invalid=True)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no usable examples"):
        load(tmp_path / "empty.jsonl")


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load(tmp_path / "x.csv")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match="bad.json: invalid JSON at line 1"):
        load(tmp_path / "bad.json")
    p = jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="schema 'dpo'"):
        load(p, schema="dpo")


def test_rng_for_random_rejected_is_per_source_and_seeded(tmp_path):
    rows = [{"instruction": f"q{i}", "completions": [
        {"response": f"r{j}", "annotations": {"h": {"Rating": str(5 - j)}}} for j in range(4)]}
        for i in range(20)]
    p = jsonl(tmp_path / "uf.jsonl", rows)
    a, _ = load(p, seed=1)
    b, _ = load(p, seed=1)
    c, _ = load(p, seed=2)
    assert a == b and [x["rejected"] for x in a] != [x["rejected"] for x in c]
    assert all(x["chosen"] == "r0" for x in a)
    random.seed(0)  # the global RNG plays no part
    assert load(p, seed=1)[0] == a
