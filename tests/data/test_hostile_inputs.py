"""Hostile data files: every row is kept or counted, every error names the file, the row
and (where there is one) the field, and nothing escapes as a bare KeyError, TypeError,
UnicodeDecodeError ... from deep inside the loaders.

Property tests generate JSONL files from garbage bytes, arbitrary JSON values, rows of the
right shape with wrongly typed fields, invalid UTF-8, byte-order marks, NUL bytes, lone
surrogate escapes and truncated lines; targeted tests cover the cases by name.
"""

import json
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megarlhf.data.dataset import DataConfig, build_dataset, data_problems
from megarlhf.data.load import DataError, SourceConfig, load_examples, read_rows
from megarlhf.data.schemas import PairRule

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BOM = b"\xef\xbb\xbf"
HS_ASPECTS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


# --------------------------------------------------------------------------- helpers

def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def jsonl(path, rows) -> str:
    return write(path, b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n"
                                for r in rows))


def load(path, kind="preference", **kw):
    src = SourceConfig(path=str(path), schema=kw.pop("schema", "auto"), aspects=kw.pop("aspects", None))
    return load_examples([src], kind, **kw)


def line_numbers(data: bytes):
    """1-based numbers of the lines that are rows (blank lines are not), as the loader
    counts them: lines end at b"\\n" only; a BOM opens the file."""
    if data.startswith(BOM):
        data = data[len(BOM):]
    return [i for i, line in enumerate(data.split(b"\n"), 1) if line.strip(b" \t\r\n")]


REPORT = re.compile(r"(\d+) rows -> (\d+) kept(.*)")


def counted_in_message(msg: str):
    """(rows, everything counted) from a "no usable examples" message's report line."""
    m = REPORT.search(msg)
    assert m, msg
    rows, kept, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    return rows, kept + sum(int(n) for n in re.findall(r" (\d+)", rest))


def check_error_names_row(msg: str, path: str, rows) -> None:
    """A row error names the file and a real line; a file-level one names the file."""
    assert os.path.basename(path) in msg, msg
    m = re.search(r": line (\d+): ", msg)
    if m:  # a row error: a line that is a row, and the field
        assert int(m.group(1)) in rows, (msg, rows)
        assert re.search(r": line \d+: field ['\"]", msg), msg
    assert len(msg) < 2000, "an error quotes data, never all of it"


def check_outcome(path: str, data: bytes, kind: str, **kw) -> None:
    """The property: strict loading succeeds with nothing dropped or stops with a DataError
    naming file, line and field; lenient loading accounts for every row in the report."""
    rows = line_numbers(data)
    try:
        ex, rep = load(path, kind, skip_invalid=False, **kw)
    except DataError as e:
        check_error_names_row(str(e), path, rows)
        if "no usable examples" in str(e):
            assert counted_in_message(str(e)) == (len(rows), len(rows))
    else:
        s = rep.sources[0]
        assert s.rows == len(rows) and not s.skipped and s.accounted() == s.rows
    try:
        ex, rep = load(path, kind, skip_invalid=True, **kw)
    except DataError as e:
        msg = str(e)
        check_error_names_row(msg, path, rows)
        if "no usable examples" in msg:
            assert counted_in_message(msg) == (len(rows), len(rows))
        else:  # only a file-level problem stops lenient loading
            assert "set the source's schema" in msg, msg
        return
    s = rep.sources[0]
    assert s.rows == len(rows), (s, rows)
    assert s.accounted() == s.rows, s.line()
    assert s.kept == len(ex)
    for e in ex:
        assert e["row"] in rows
        check_example(e, kind)


def check_example(e, kind: str) -> None:
    def messages(msgs):
        assert isinstance(msgs, list) and msgs
        for m in msgs:
            assert set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
            assert isinstance(m["content"], str) and m["content"].strip()
            m["content"].encode("utf-8")  # storable text: no lone surrogates

    if kind == "preference":
        messages(e["prompt"])
        for side in ("chosen", "rejected"):
            assert isinstance(e[side], str) and e[side].strip()
            e[side].encode("utf-8")
        assert e["chosen"] != e["rejected"]
    elif kind == "prompts":
        messages(e["prompt"])
        assert e["reference"] is None or isinstance(e["reference"], str)
    else:
        messages(e["messages"])
        assert any(m["role"] == "assistant" for m in e["messages"])


# --------------------------------------------------------------------------- strategies

hostile_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "   ", "\x00", "ok", "caf\u00e9", "\ud800", "a\udfffb", "\U0001F600",
                     "\n\nHuman: hi\n\nAssistant: yo", "N/A", "NaN", "-1e309", "1e309", "4.5"]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                    st.floats(allow_nan=True, allow_infinity=True), hostile_text)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(hostile_text, c, max_size=3), max_leaves=8)
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", ""]),
                           "content": hostile_text}),
    json_values), max_size=3)
field_value = st.one_of(hostile_text, json_values, messages)
ratings = st.one_of(st.integers(-3, 10), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(10**300, 10**310), hostile_text, st.none(), st.booleans(),
                    st.lists(st.integers(), max_size=2), st.just({"Rating": "5"}))

pairs_rows = st.fixed_dictionaries({}, optional={
    "prompt": field_value, "chosen": field_value, "rejected": field_value,
    "subset": json_values, "extra": json_values, "messages": messages, "response": field_value,
    "reference": json_values})
good_pairs = st.builds(lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r},
                       st.sampled_from(["q1", "q2", "q3"]), st.sampled_from(["a", "b"]),
                       st.sampled_from(["b", "c"]))
uf_rows = st.fixed_dictionaries({"instruction": hostile_text}, optional={
    "completions": st.one_of(json_values, st.lists(st.fixed_dictionaries({}, optional={
        "response": hostile_text,
        "annotations": st.one_of(json_values, st.dictionaries(
            st.sampled_from(["helpfulness", "honesty"]),
            st.one_of(ratings, st.fixed_dictionaries({"Rating": ratings})), max_size=2))}),
        max_size=3))})
hs_rows = st.fixed_dictionaries({"prompt": st.sampled_from(["p1", "p2", "", 3]),
                                 "response": st.sampled_from(["r1", "r2", "r3", None])},
                                optional={a: ratings for a in HS_ASPECTS})
nectar_rows = st.fixed_dictionaries({"prompt": st.sampled_from(
    ["\n\nHuman: hi\n\nAssistant:", "hi", "", 5])}, optional={"answers": st.one_of(
        json_values, st.lists(st.fixed_dictionaries({}, optional={"answer": hostile_text,
                                                                  "rank": ratings}), max_size=3))})


def encode_row(row, how: str) -> bytes:
    text = json.dumps(row, ensure_ascii=how != "latin-1")
    if how == "latin-1":
        return text.encode("latin-1", "replace")  # not UTF-8 wherever a character is not ASCII
    if how == "raw-nul":
        text = text.replace("\\u0000", "\x00")  # an unescaped control character
    return text.encode("utf-8", "surrogatepass")


def lines_of(rows):
    row_line = st.builds(encode_row, rows, st.sampled_from(["plain", "plain", "plain", "latin-1", "raw-nul"]))
    return st.one_of(
        row_line, row_line, row_line,
        st.builds(encode_row, json_values, st.just("plain")),  # arrays, numbers, strings, null
        st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),  # garbage
        st.builds(lambda b, cut: b[:cut], row_line, st.integers(0, 40)),  # truncated
        st.sampled_from([b"", b"   ", b"\r", b"\t", b"\x00", b"\x0c", b"\xef\xbb\xbf{}", b"[" * 3000,
                         b"1" * 5000, b'{"prompt": "\\ud800x", "chosen": "a", "rejected": "b"}']),
    )


@st.composite
def files(draw, rows):
    lines = draw(st.lists(lines_of(rows), max_size=8))
    sep = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = sep.join(lines) + draw(st.sampled_from([b"", sep]))
    return (BOM if draw(st.booleans()) else b"") + data


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


def check_file(workdir, data: bytes, kind: str, **kw) -> None:
    path = write(workdir / "f.jsonl", data)
    check_outcome(path, data, kind, **kw)


# --------------------------------------------------------------------------- properties

@SETTINGS
@given(files(st.one_of(pairs_rows, good_pairs)))
def test_any_preference_file_is_loaded_or_refused_cleanly(workdir, data):
    check_file(workdir, data, "preference")


@SETTINGS
@given(files(st.one_of(pairs_rows, good_pairs)), st.sampled_from(["prompts", "sft"]))
def test_any_prompt_or_sft_file_is_loaded_or_refused_cleanly(workdir, data, kind):
    check_file(workdir, data, kind)


@SETTINGS
@given(files(uf_rows), st.sampled_from(["random", "lowest"]))
def test_any_ultrafeedback_file_is_loaded_or_refused_cleanly(workdir, data, rejected):
    check_file(workdir, data, "preference", schema="ultrafeedback", rule=PairRule(rejected=rejected))


@SETTINGS
@given(files(hs_rows))
def test_any_helpsteer_file_is_loaded_or_refused_cleanly(workdir, data):
    check_file(workdir, data, "preference", schema="helpsteer")


@SETTINGS
@given(files(nectar_rows))
def test_any_nectar_file_is_loaded_or_refused_cleanly(workdir, data):
    check_file(workdir, data, "preference", schema="nectar")


@SETTINGS
@given(st.lists(st.one_of(pairs_rows, good_pairs, json_values), max_size=6), st.booleans())
def test_any_json_array_file_is_loaded_or_refused_cleanly(workdir, rows, wrap):
    doc = {"data": rows} if wrap else rows
    path = write(workdir / "f.json", json.dumps(doc).encode("utf-8", "surrogatepass"))
    for skip in (False, True):
        try:
            ex, rep = load(path, skip_invalid=skip)
        except DataError as e:
            assert "f.json" in str(e)
            continue
        assert rep.sources[0].rows == len(rows) and rep.sources[0].accounted() == len(rows)
        for e in ex:
            check_example(e, "preference")


# --------------------------------------------------------------------------- targeted cases

GOOD = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
U = lambda text: [{"role": "user", "content": text}]  # noqa: E731


def strict_error(path, **kw) -> str:
    with pytest.raises(DataError) as e:
        load(path, **kw)
    return str(e.value)


def test_huge_single_line(tmp_path):
    big = "x" * (20 * 2**20)
    p = jsonl(tmp_path / "big.jsonl", [GOOD, {"prompt": "q", "chosen": big, "rejected": "y"}])
    ex, rep = load(p)
    assert rep.sources[0].kept == 2 and len(ex[1]["chosen"]) == len(big)
    # 20 MB of a rating or a role: the error quotes a little of it, not all
    uf = {"instruction": "q", "completions": [{"response": "a", "annotations": {"h": big}},
                                              {"response": "b", "annotations": {"h": "1"}}]}
    p = jsonl(tmp_path / "bigrating.jsonl", [uf])
    msg = strict_error(p)
    assert "line 1" in msg and "completions[0].annotations.h.Rating" in msg and len(msg) < 500
    p = jsonl(tmp_path / "bigrole.jsonl", [{"prompt": [{"role": big, "content": "hi"}], "chosen": "a",
                                            "rejected": "b"}])
    msg = strict_error(p)
    assert "prompt[0].role" in msg and len(msg) < 500
    p = write(tmp_path / "biggarbage.jsonl", json.dumps(GOOD).encode() + b"\n{" + b"x" * (20 * 2**20) + b"\n")
    msg = strict_error(p)
    assert "line 2" in msg and "invalid JSON" in msg and len(msg) < 500
    ex, rep = load(p, skip_invalid=True)
    assert rep.sources[0].skipped == {"invalid_json": 1} and len(ex) == 1


def test_invalid_utf8_and_latin1_lines(tmp_path):
    latin = json.dumps({"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}, ensure_ascii=False)
    p = write(tmp_path / "enc.jsonl", json.dumps(GOOD).encode() + b"\n" + latin.encode("latin-1")
              + b"\n\xff\xfe\x00garbage\n")
    msg = strict_error(p)
    assert "enc.jsonl: line 2" in msg and "not valid UTF-8" in msg and "0xe9" in msg
    ex, rep = load(p, skip_invalid=True)
    assert len(ex) == 1 and rep.sources[0].skipped == {"bad_encoding": 2}
    j = write(tmp_path / "enc.json", b'[\n' + json.dumps(GOOD).encode() + b',\n' + latin.encode("latin-1") + b']')
    msg = strict_error(j)
    assert "enc.json" in msg and "line 3" in msg and "not valid UTF-8" in msg


def test_byte_order_mark_is_not_data(tmp_path):
    p = write(tmp_path / "bom.jsonl", BOM + json.dumps(GOOD).encode() + b"\n")
    assert load(p)[0][0]["prompt"] == U("2+2?")
    j = write(tmp_path / "bom.json", BOM + json.dumps([GOOD]).encode())
    assert load(j)[0][0]["prompt"] == U("2+2?")
    # a BOM anywhere else is a malformed line, counted
    p = write(tmp_path / "bom2.jsonl", json.dumps(GOOD).encode() + b"\n" + BOM + b'{"a": 1}\n')
    assert load(p, skip_invalid=True)[1].sources[0].skipped == {"invalid_json": 1}


def test_nul_bytes_and_control_characters(tmp_path):
    p = write(tmp_path / "nul.jsonl", json.dumps(GOOD).encode() + b'\n{"prompt": "q\x00", "chosen": "a", '
              b'"rejected": "b"}\n\x00\n\x0c\n')
    msg = strict_error(p)
    assert "nul.jsonl: line 2" in msg and "invalid JSON" in msg
    ex, rep = load(p, skip_invalid=True)
    assert rep.sources[0].rows == 4 and rep.sources[0].skipped == {"invalid_json": 3}
    # an escaped NUL is valid JSON text and kept as it is
    p = jsonl(tmp_path / "nul2.jsonl", [{"prompt": "q\u0000", "chosen": "a", "rejected": "b"}])
    assert load(p)[0][0]["prompt"] == U("q\x00")


def test_carriage_returns_do_not_split_lines(tmp_path):
    # JSON allows a CR between tokens; lines end at LF only, as wc -l and editors count them
    p = write(tmp_path / "cr.jsonl", b'{"prompt": "q",\r "chosen": "a", "rejected": "b"}\r\n'
              b'{"prompt": "r", "chosen": "a", "rejected": "b"}\n\r\n{"bad\n')
    msg = strict_error(p)
    assert "cr.jsonl: line 4" in msg
    ex, rep = load(p, skip_invalid=True)
    assert [e["row"] for e in ex] == [1, 2] and rep.sources[0].rows == 3


def test_truncated_last_line(tmp_path):
    p = write(tmp_path / "cut.jsonl", (json.dumps(GOOD) + "\n" + json.dumps(GOOD | {"prompt": "x"})[:17]).encode())
    msg = strict_error(p)
    assert "cut.jsonl: line 2" in msg and "invalid JSON" in msg
    ex, rep = load(p, skip_invalid=True)
    assert len(ex) == 1 and rep.sources[0].skipped == {"invalid_json": 1}


@pytest.mark.parametrize("data", [b"", b"\n\n  \n", BOM, b"\r\n"])
def test_empty_files(tmp_path, data):
    p = write(tmp_path / "empty.jsonl", data)
    for skip in (False, True):
        with pytest.raises(DataError, match=r"no usable examples.*empty\.jsonl: 0 rows"):
            load(p, skip_invalid=skip)


def test_non_object_rows_are_each_counted(tmp_path):
    # every row malformed: all of them are counted, not only the first
    p = jsonl(tmp_path / "vals.jsonl", [b"[1, 2]", b"3", b'"text"', b"null", b"true", b"NaN"])
    msg = strict_error(p)
    assert "vals.jsonl: line 1: field '<row>': expected a JSON object, got list" in msg
    with pytest.raises(DataError) as e:
        load(p, skip_invalid=True)
    assert "6 rows -> 0 kept; skipped wrong_type 6" in str(e.value)
    # the same rows beside a good one
    p = jsonl(tmp_path / "mixed.jsonl", [b"[1]", GOOD, b"null"])
    ex, rep = load(p, skip_invalid=True)
    assert len(ex) == 1 and rep.sources[0].skipped == {"wrong_type": 2}


def test_deep_nesting_and_huge_numbers(tmp_path):
    p = write(tmp_path / "deep.jsonl", json.dumps(GOOD).encode() + b"\n" + b"[" * 100_000 + b"\n"
              + b'{"prompt": "q", "chosen": "a", "rejected": ' + b"9" * 5000 + b"}\n")
    msg = strict_error(p)
    assert "deep.jsonl: line 2" in msg and "nested too deeply" in msg
    ex, rep = load(p, skip_invalid=True)
    assert len(ex) == 1 and rep.sources[0].skipped == {"invalid_json": 2}
    j = write(tmp_path / "deep.json", b"[" * 100_000)
    assert "deep.json" in strict_error(j)


FIELD_CASES = [
    # (row, field named in the error, skip reason)
    ({"prompt": ["q"], "chosen": "a", "rejected": "b"}, "prompt[0]", "bad_messages"),
    ({"prompt": {"text": "q"}, "chosen": "a", "rejected": "b"}, "prompt", "wrong_type"),
    ({"prompt": 7, "chosen": "a", "rejected": "b"}, "prompt", "wrong_type"),
    ({"prompt": "q", "chosen": ["a"], "rejected": "b"}, "rejected", "wrong_type"),
    ({"prompt": "q", "chosen": "a", "rejected": {"x": 1}}, "rejected", "wrong_type"),
    ({"prompt": "q", "chosen": 1.5, "rejected": "b"}, "chosen", "wrong_type"),
    ({"prompt": "q", "chosen": NotImplemented, "rejected": "b"}, "chosen", "missing_field"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "rejected", "empty_text"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty_text"),
    ({"prompt": [{"role": "user", "content": 3}], "chosen": "a", "rejected": "b"},
     "prompt[0].content", "bad_messages"),
    ({"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"},
     "prompt[0].role", "bad_messages"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "prompt", "bad_messages"),
    ({"prompt": "q", "chosen": "\ud800", "rejected": "b"}, "chosen", "bad_encoding"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "meta": {"k\udc00": 1}}, "meta.k\udc00", "bad_encoding"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "same"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "same"}]},
     "chosen", "identical_pair"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: same", "rejected": "\n\nHuman: q\n\nAssistant: same"},
     "chosen", "identical_pair"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"},
     "rejected", "bad_transcript"),
]


@pytest.mark.parametrize("row,field,reason", FIELD_CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(FIELD_CASES)])
def test_wrong_fields_name_the_line_and_field(tmp_path, row, field, reason):
    row = {k: v for k, v in row.items() if v is not NotImplemented}  # NotImplemented: the key is missing
    schema = "hh_rlhf" if isinstance(row.get("chosen"), str) and "\n\nHuman:" in row["chosen"] else "pairs"
    good = GOOD if schema == "pairs" else {"chosen": "\n\nHuman: q\n\nAssistant: a",
                                           "rejected": "\n\nHuman: q\n\nAssistant: b"}
    text = json.dumps(row)
    p = jsonl(tmp_path / "rows.jsonl", [good, text.encode("utf-8", "surrogatepass")])
    msg = strict_error(p, schema=schema)
    assert "rows.jsonl: line 2" in msg and f"field {field!r}" in msg, msg
    ex, rep = load(p, schema=schema, skip_invalid=True)
    assert len(ex) == 1 and rep.sources[0].skipped == {reason: 1}


def test_extra_unknown_fields_are_ignored(tmp_path):
    plain = jsonl(tmp_path / "plain.jsonl", [GOOD])
    extra = jsonl(tmp_path / "extra.jsonl", [GOOD | {"id": 7, "meta": {"a": [1, {"b": None}]}, "score": float("nan"),
                                                     "": "empty key", "\u00e9": "\u00e9"}])
    a, b = load(plain)[0][0], load(extra)[0][0]
    assert {k: v for k, v in a.items() if k != "source"} == {k: v for k, v in b.items() if k != "source"}


def uf_row(*ratings, prompt="q"):
    return {"instruction": prompt, "completions": [
        {"response": f"r{i}", "annotations": {"helpfulness": {"Rating": r}}} for i, r in enumerate(ratings)]}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "NaN", "Infinity", "-1e309",
                                 "1e309", "five", "", [], {}, True, None, 10**400])
def test_hostile_ultrafeedback_ratings(tmp_path, bad):
    p = jsonl(tmp_path / "uf.jsonl", [uf_row(5, 1, prompt="fine"),
                                      json.dumps(uf_row(bad, 1)).encode()])  # NaN/Infinity as JSON
    msg = strict_error(p)
    assert "uf.jsonl: line 2" in msg and "completions[0].annotations.helpfulness.Rating" in msg
    ex, rep = load(p, skip_invalid=True)
    assert len(ex) == 1 and rep.sources[0].skipped == {"bad_rating": 1}


def test_ultrafeedback_numbers_as_text_and_overflowing_means(tmp_path):
    p = jsonl(tmp_path / "uf.jsonl", [uf_row(" 4.5 ", "2"), uf_row("N/A", "3", prompt="r")])
    ex, rep = load(p, skip_invalid=True)
    assert [(e["chosen"], e["rejected"]) for e in ex] == [("r0", "r1")]
    assert rep.sources[0].skipped == {"bad_rating": 1}  # "N/A" only: no numeric rating
    big = {"instruction": "q", "completions": [
        {"response": "a", "annotations": {"h": 1e308, "i": 1e308}},
        {"response": "b", "annotations": {"h": 1, "i": 1}}]}
    msg = strict_error(jsonl(tmp_path / "big.jsonl", [big]))
    assert "completions[0].annotations" in msg and "not a finite number" in msg


def hs_row(prompt, response, score):
    return {"prompt": prompt, "response": response, **{a: score for a in HS_ASPECTS}}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "-1e309", "x", None, [], 10**400])
def test_hostile_helpsteer_scores_and_rows_merged_into_pairs(tmp_path, bad):
    rows = [hs_row("p1", "good", 4), hs_row("p1", "bad", 1), hs_row("p1", "worse", 0),
            hs_row("p2", "x", 3), hs_row("p2", "y", 3),  # a tie
            json.dumps(hs_row("p3", "z", bad)).encode()]
    p = jsonl(tmp_path / "hs.jsonl", rows)
    msg = strict_error(p, schema="helpsteer")
    assert "hs.jsonl: line" in msg
    ex, rep = load(p, schema="helpsteer", skip_invalid=True)
    s = rep.sources[0]
    assert [(e["chosen"], e["row"]) for e in ex] == [("good", 1)]
    assert s.skipped == {"tie": 1, "bad_rating": 1} and s.merged == 3
    assert s.accounted() == s.rows == 6 and "merged 3" in s.line()


def test_nectar_hostile_ranks_and_answers(tmp_path):
    prompt = "\n\nHuman: best?\n\nAssistant:"
    rows = [{"prompt": prompt, "answers": [{"answer": "a", "rank": 1}, {"answer": "b", "rank": 2}]},
            {"prompt": prompt, "answers": [{"answer": "a", "rank": float("nan")}, {"answer": "b", "rank": 2}]},
            {"prompt": prompt, "answers": [{"answer": 5, "rank": 1}, {"answer": "b", "rank": 2}]},
            {"prompt": prompt, "answers": "a, b"}]
    p = jsonl(tmp_path / "n.jsonl", rows)
    msg = strict_error(p)
    assert "n.jsonl: line 2" in msg and "answers[0].rank" in msg
    ex, rep = load(p, skip_invalid=True)
    assert len(ex) == 1 and rep.sources[0].skipped == {"bad_rating": 1, "wrong_type": 2}
    rows[2] = {"prompt": prompt, "answers": [{"answer": 5, "rank": 1}, {"answer": "b", "rank": 2}]}
    assert "answers[0].answer" in strict_error(jsonl(tmp_path / "n2.jsonl", [rows[0], rows[2]]))


def test_prompt_references(tmp_path):
    p = jsonl(tmp_path / "pr.jsonl", [{"prompt": "q", "reference": 4},
                                      json.dumps({"prompt": "r", "reference": float("nan")}).encode(),
                                      {"prompt": "s", "reference": ["4"]}, {"reference": "4"}])
    msg = strict_error(p, kind="prompts")
    assert "pr.jsonl: line 2" in msg and "'reference'" in msg
    ex, rep = load(p, kind="prompts", skip_invalid=True)
    assert [e["reference"] for e in ex] == ["4"]
    assert rep.sources[0].skipped == {"wrong_type": 2, "missing_field": 1}


def test_an_unrecognised_first_row_does_not_decide_the_schema(tmp_path):
    p = jsonl(tmp_path / "first.jsonl", [{"foo": 1}, GOOD])
    msg = strict_error(p)
    assert "first.jsonl: line 1" in msg and "'chosen': missing" in msg
    ex, rep = load(p, skip_invalid=True)
    assert len(ex) == 1 and rep.sources[0].skipped == {"missing_field": 1}
    # no row has a schema's keys: a clear error even when skipping, naming the first row
    p = jsonl(tmp_path / "none.jsonl", [{"foo": 1}, {"bar": 2}])
    for skip in (False, True):
        with pytest.raises(DataError, match=r"none\.jsonl: line 1: .*cannot tell the schema.*set the source's schema"):
            load(p, skip_invalid=skip)


def test_file_level_problems(tmp_path):
    (tmp_path / "top.json").write_text("42")
    assert "top.json: expected a JSON array" in strict_error(tmp_path / "top.json")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    assert "bad.parquet: cannot read as Parquet" in strict_error(tmp_path / "bad.parquet")
    os.mkdir(tmp_path / "dir.jsonl")
    assert "not found" in strict_error(tmp_path / "dir.jsonl")
    ok = jsonl(tmp_path / "ok.jsonl", [GOOD])
    for cap in (0, -1):
        with pytest.raises(DataError, match=r"ok\.jsonl: max_samples=.* must be a positive integer"):
            load_examples([SourceConfig(path=ok, max_samples=cap)], "preference")


def test_read_rows_yields_every_line_once(tmp_path):
    data = b'{"a": 1}\n\n[1]\n\xff\n{"b": \n' + BOM + b"{}\n  \n"
    p = write(tmp_path / "r.jsonl", data)
    got = [(i, type(r).__name__) for i, r in read_rows(SourceConfig(path=p))]
    assert got == [(1, "dict"), (3, "RowError"), (4, "RowError"), (5, "RowError"), (6, "RowError")]
    assert [i for i, _ in got] == line_numbers(data)


@pytest.mark.parametrize("field,value,needle", [
    ("max_length", 0, "data.max_length=0 must be > 0"),
    ("max_prompt_length", -5, "data.max_prompt_length=-5 must be > 0"),
    ("eval_size", -1, "data.eval_size=-1 must be >= 0"),
    ("seed", -3, "data.seed=-3 must be in [0, 2**32)"),
    ("pair_rule", PairRule(rejected="best"), "data.pair_rule.rejected='best'"),
    ("pair_rule", PairRule(min_margin=float("nan")), "data.pair_rule.min_margin=nan"),
    ("sources", [SourceConfig(path="a.jsonl", max_samples=0)], "data.sources[0].max_samples=0"),
    ("sources", [SourceConfig(path="a.jsonl", schema="dpo")], "data.sources[0].schema='dpo'"),
    ("sources", [SourceConfig(path="")], "data.sources[0].path is empty"),
])
def test_bad_data_config_is_refused_before_reading(field, value, needle):
    cfg = DataConfig(**{"sources": [SourceConfig(path="never-read.jsonl")], field: value})
    assert any(needle in p for p in data_problems(cfg)), data_problems(cfg)
    with pytest.raises(DataError, match=re.escape(needle)):
        build_dataset(cfg, "preference", template=None)  # refused before any file or template is used


# --------------------------------------------------------------------------- end to end

def test_build_dataset_accounts_for_every_row(tmp_path, template):
    rows = [{"prompt": f"question {i}", "chosen": f"answer {i}", "rejected": f"answer {i + 1}"} for i in range(8)]
    rows += [{"prompt": "question 0", "chosen": "answer 0", "rejected": "answer 1"},   # duplicate
             {"prompt": "q", "chosen": "answer " * 80, "rejected": "b"},                # too long
             {"prompt": "q\ud800", "chosen": "a", "rejected": "b"},                     # lone surrogate
             {"prompt": "q", "chosen": "a", "rejected": "a"}]                          # identical
    lines = [json.dumps(r).encode("utf-8", "surrogatepass") for r in rows]
    lines += [b"\xe9t\xe9", b"[1, 2]", b'{"prompt": "q", "chosen": "a", "rejected": NaN}', b'{"prompt": "q"']
    p = write(tmp_path / "mix.jsonl", b"\n".join(lines) + b"\n")
    data = build_dataset(DataConfig(sources=[SourceConfig(path=p)], skip_invalid=True, max_length=64,
                                    max_prompt_length=32, eval_size=2), "preference", template)
    s = data.report.sources[0]
    assert (s.rows, s.kept, s.truncated, s.duplicates) == (16, 8, 1, 1)
    assert s.skipped == {"bad_encoding": 2, "identical_pair": 1, "wrong_type": 2, "invalid_json": 1}
    assert s.accounted() == s.rows
    assert len(data.train) + len(data.eval) == s.kept
