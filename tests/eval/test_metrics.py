"""Scoring functions of `megarlhf eval` against hand-worked cases (no model, no processes)."""

import json

import pytest

from megarlhf.data.load import DataError
from megarlhf.eval import metrics as M
from megarlhf.eval.run import read_eval_rows, with_shots


# -- GSM8k answers ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, answer, how", [
    ("3 + 4 = 7.\n#### 7", "7", "marker"),
    ("so she has 42 apples.", "42", "last_number"),                  # no marker: the last number
    ("#### 5\nwait, recount\n#### 7", "7", "marker"),                # several markers: the last
    ("#### 5 and then ####", "5", "last_number"),                    # last marker empty: fall back
    ("#### The answer is 18 apples", "18", "marker"),                # first number after the marker
    ("#### -12", "-12", "marker"),                                   # negative
    ("it fell to -3 degrees", "-3", "last_number"),
    ("read pages 3-5", "5", "last_number"),                          # a hyphen is not a minus sign
    ("#### 1,234", "1234", "marker"),                                # thousands commas
    ("#### $1,234.50.", "1234.5", "marker"),                         # dollar, decimals, full stop
    ("a total of 1,000,000 people", "1000000", "last_number"),
    ("items 1,2,3", "3", "last_number"),                             # list commas are not thousands
    ("#### 3.0", "3", "marker"),
    ("4x2 = 8", "8", "last_number"),
    ("no digits at all", None, None),
    ("", None, None),
    ("#### nothing here", None, None),
])
def test_extract_gsm8k(text, answer, how):
    assert M.extract_gsm8k(text) == (answer, how)


def test_extract_gsm8k_strict_needs_the_marker():
    assert M.extract_gsm8k("so she has 42 apples.", strict=True) == (None, None)
    assert M.extract_gsm8k("#### 5 and then ####", strict=True) == (None, None)
    assert M.extract_gsm8k("#### 7", strict=True) == ("7", "marker")


@pytest.mark.parametrize("a, b, equal", [
    ("3.0", "3", True), ("3.10", "3.1", True), ("1,000", "1000", True), ("$5", "5", True),
    ("72.", "72", True), ("-0", "0", True), ("007", "7", True), ("3.5", "3", False),
    ("-4", "4", False), ("abc", "abc", False), ("", "", False), (None, "1", False),
])
def test_numbers_equal(a, b, equal):
    assert M.numbers_equal(a, b) is equal


def test_normalize_number():
    assert M.normalize_number(" $1,234.50. ") == "1234.5"
    assert M.normalize_number("12") == "12"
    assert M.normalize_number("1e5") is None and M.normalize_number("12 apples") is None


def test_gsm8k_reference_and_score():
    assert M.gsm8k_reference("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert M.gsm8k_reference("1,000") == "1000"
    assert M.gsm8k_reference("seventy") is None
    s = M.score_gsm8k("she has 18 now", "18")
    assert s == {"answer": "18", "how": "last_number", "correct": True, "correct_strict": False}
    s = M.score_gsm8k("#### 18.00", "#### 18")
    assert s["correct"] and s["correct_strict"]
    assert not M.score_gsm8k("#### 19", "18")["correct"]
    assert not M.score_gsm8k("I do not know", "18")["correct"]


def test_builtin_checker_is_the_task_one():
    assert M.score_builtin("3 + 4 = 7.\n#### 7", "7") == {"answer": "7", "correct": True}
    # the built-in checker compares the marker's number as a string, GSM8k's numerically
    assert not M.score_builtin("#### 07", "7")["correct"] and M.score_gsm8k("#### 07", "7")["correct"]
    assert M.score_builtin("the answer is 7", "7") == {"answer": None, "correct": False}


def test_strip_calculator_annotations():
    assert M.strip_calculator_annotations("48/2 = <<48/2=24>>24 clips") == "48/2 = 24 clips"


# -- IFEval rules: one passing and one failing response each --------------------------------------
CASES = [
    ("punctuation:no_comma", {}, "no commas here", "one, two"),
    ("change_case:english_lowercase", {}, "all lower case.", "Not lower."),
    ("change_case:english_capital", {}, "ALL CAPS HERE.", "ALL CAPS except this"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THE END is near", "THE end is near"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. any other questions?\n",
     "Any other questions? Bye."),
    ("startend:start_checker", {"start_phrase": "Dear Sir"}, "dear sir, hello", "Hello, dear sir"),
    ("startend:quotation", {}, '  "all quoted"  ', 'not "quoted"'),
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "An Apple and a PEAR", "An apple only"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "a badge is fine", "this is Bad."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"},
     "cat, cat and Cat", "cat and cat"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
     "zebra", "Zzz"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},
     "one two three four", "one two three four five"),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at most"},
     "Dr. Smith paid 3.5 dollars. He left!", "One. Two. Three."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "first\n***\nsecond\n***",
     "first\n***\n\n***\nsecond"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Then"},
     'First part.\n\n"Then, the second.', "First part.\n\nSecond part."),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', '{"a": 1} and more'),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Intro\n* one\n- two",
     "* one\n* two\n* three"),
    ("detectable_format:title", {}, "<<A Poem>>\nroses", "<< >> untitled"),
    ("detectable_format:constrained_response", {}, "Hmm. My answer is maybe.", "Yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**",
     "*one* and ** **"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nfoo\nSection 2\nbar", "Section 1\nfoo"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] lives at [address]",
     "[name] only"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bring cake", "Hi. PS cake"),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", "Same.\n******\nSame."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "write a poem. Roses...",
     "Roses... Write a poem."),
]


def test_every_rule_has_a_case():
    assert {c[0] for c in CASES} == set(M.RULES) - {"language:response_language"}


@pytest.mark.parametrize("rid, kwargs, good, bad", CASES, ids=[c[0] for c in CASES])
def test_rule_true_and_false(rid, kwargs, good, bad):
    [ins] = M.parse_instructions({"instruction_id_list": [rid], "kwargs": [kwargs]})
    assert M.follows(good, ins) is True
    assert M.follows(bad, ins) is False


def test_counts():
    assert M.count_words("Hello, world! It's 3.5 km.") == 7  # \w+ runs, as IFEval
    assert M.count_sentences("Hello world") == 1
    assert M.count_sentences("Wait... what?! \"Yes.\" Mr. Smith, e.g. him, came at 3.30 p.m. today.") == 4
    assert M.count_sentences("") == 0


def test_loose_and_empty_responses():
    lower = ("change_case:english_lowercase", {})
    text = "Sure, Here it is:\nall lowercase text"
    assert not M.follows(text, lower) and M.follows(text, lower, loose=True)  # first line dropped
    end = ("startend:end_checker", {"end_phrase": "the end"})
    assert not M.follows("**The End**", end) and M.follows("**The End**", end, loose=True)  # '*' dropped
    assert not M.follows("", ("punctuation:no_comma", {}))  # an empty response follows nothing
    assert not M.follows("  \n", ("punctuation:no_comma", {}), loose=True)


def test_score_ifeval_and_summary():
    a = M.parse_instructions({"instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
                              "kwargs": [{}, {"keywords": ["sun"]}]})
    b = M.parse_instructions({"instruction_id_list": ["punctuation:no_comma"]})  # kwargs may be left out
    s1 = M.score_ifeval("the sun, it shines", a)   # comma: 1 of 2
    s2 = M.score_ifeval("The sun shines", a)        # 2 of 2
    s3 = M.score_ifeval("Sure,\nno commas", b)      # strict fails, loose passes
    assert s1["strict"] == [False, True] and not s1["correct"]
    assert s2["correct"] and not s3["correct"] and s3["correct_loose"]
    got = M.ifeval_summary([s1, s2, s3])
    assert got["prompt_strict"] == pytest.approx(1 / 3) and got["prompt_loose"] == pytest.approx(2 / 3)
    assert got["instruction_strict"] == pytest.approx(3 / 5)
    assert got["instruction_loose"] == pytest.approx(4 / 5)
    assert got["instruction/punctuation:no_comma"] == pytest.approx(1 / 3)
    assert got["instruction/keywords:existence"] == 1.0


@pytest.mark.parametrize("row, field, words", [
    ({"instruction_id_list": ["punctuation:no_comma", "foo:bar"], "kwargs": [{}, {}]},
     "instruction_id_list[1]", "unknown instruction id 'foo:bar'"),
    ({"instruction_id_list": "punctuation:no_comma"}, "instruction_id_list", "non-empty list"),
    ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]}, "kwargs", "list of 1"),
    ({"instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"relation": "at least"}]},
     "kwargs[0].num_words", "missing"),
    ({"instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": "ten", "relation": "at least"}]},
     "kwargs[0].num_words", "expected an integer"),
    ({"instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": 2.5, "relation": "at least"}]}, "kwargs[0].num_words", "expected an integer"),
    ({"instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": 10, "relation": "around"}]}, "kwargs[0].relation", "'less than'"),
    ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"extra": 1}]},
     "kwargs[0].extra", "unexpected argument"),
    ({"instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": []}]},
     "kwargs[0].keywords", "non-empty list of strings"),
    ({"instruction_id_list": ["keywords:letter_frequency"],
      "kwargs": [{"letter": "ab", "let_frequency": 1, "let_relation": "at least"}]},
     "kwargs[0].letter", "single letter"),
    ({"instruction_id_list": ["length_constraints:nth_paragraph_first_word"],
      "kwargs": [{"num_paragraphs": 2, "nth_paragraph": 0, "first_word": "a"}]},
     "kwargs[0].nth_paragraph", ">= 1"),
])
def test_rule_errors_name_the_field(row, field, words):
    with pytest.raises(M.RuleError) as e:
        M.parse_instructions(row)
    assert e.value.field == field and words in str(e.value)


def test_rule_arguments_in_the_hub_layout():
    # the Hugging Face copy of IFEval fills every argument name in, with nulls
    [(rid, args)] = M.parse_instructions({"instruction_id_list": ["length_constraints:number_words"],
                                          "kwargs": [{"num_words": 300.0, "relation": "less than",
                                                      "keywords": None, "num_bullets": float("nan")}]})
    assert args == {"num_words": 300, "relation": "less than"}


def test_language_rule_needs_langdetect():
    try:
        import langdetect  # noqa: F401
        pytest.skip("langdetect is installed")
    except ImportError:
        pass
    with pytest.raises(M.RuleError, match="langdetect"):
        M.parse_instructions({"instruction_id_list": ["language:response_language"],
                              "kwargs": [{"language": "fr"}]})


# -- rule files, data files, few-shot -------------------------------------------------------------
def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rule_file_errors_name_file_line_and_field(tmp_path):
    good = {"prompt": "Write.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    path = write(tmp_path / "rules.jsonl", [good, good, {**good, "kwargs": [{"num_words": 3}]}])
    with pytest.raises(DataError) as e:
        read_eval_rows(path, "auto")
    assert f"{path}: line 3: field 'kwargs[0].num_words': unexpected argument" in str(e.value)
    path = write(tmp_path / "rules2.jsonl", [{**good, "instruction_id_list": ["nope"]}])
    with pytest.raises(DataError, match=r"rules2.jsonl: line 1: field 'instruction_id_list\[0\]': unknown"):
        read_eval_rows(path, "ifeval")
    path = write(tmp_path / "rules3.jsonl", [{"instruction_id_list": ["punctuation:no_comma"]}])
    with pytest.raises(DataError, match="line 1: field 'prompt': missing"):
        read_eval_rows(path, "ifeval")
    rows, task = read_eval_rows(write(tmp_path / "ok.jsonl", [good]), "auto")
    assert task == "ifeval" and rows[0].instructions == [("punctuation:no_comma", {})]


def test_read_rows_in_the_usual_layouts(tmp_path):
    gsm = write(tmp_path / "gsm8k.jsonl", [{"question": "Q1?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}])
    rows, task = read_eval_rows(gsm, "auto")
    assert task == "gsm8k" and rows[0].reference == "4"
    assert rows[0].prompt == [{"role": "user", "content": "Q1?"}]
    assert rows[0].solution.endswith("#### 4")
    task_rows = write(tmp_path / "prompts.jsonl", [{"prompt": "Q?", "reference": 12, "solution": "#### 12"},
                                                   {"messages": [{"role": "user", "content": "Q2?"},
                                                                 {"role": "assistant", "content": "#### 3"}],
                                                    "reference": "3"}])
    rows, task = read_eval_rows(task_rows, "builtin")
    assert [r.reference for r in rows] == ["12", "3"] and rows[1].solution == "#### 3"
    assert rows[1].prompt == [{"role": "user", "content": "Q2?"}] and rows[1].where.endswith("line 2")
    with pytest.raises(DataError, match="line 1: field 'reference': missing"):
        read_eval_rows(write(tmp_path / "noref.jsonl", [{"prompt": "Q?"}]), "gsm8k")
    with pytest.raises(DataError, match="line 1: field 'reference': not a number: 'twelve'"):
        read_eval_rows(write(tmp_path / "word.jsonl", [{"prompt": "Q?", "reference": "twelve"}]), "gsm8k")
    with pytest.raises(DataError, match="line 1: field 'answer': a few-shot exemplar needs a worked answer"):
        read_eval_rows(write(tmp_path / "shots.jsonl", [{"prompt": "Q?"}]), "shots")


def test_with_shots_puts_exemplars_first():
    from megarlhf.eval.run import EvalRow

    shots = [EvalRow(prompt=[{"role": "user", "content": "1+1?"}], solution="1+1=<<1+1=2>>2\n#### 2"),
             EvalRow(prompt=[{"role": "user", "content": "2+2?"}], solution="#### 4")]
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+3?"}]
    assert with_shots(prompt, shots) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "1+1=2\n#### 2"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "#### 4"},
        {"role": "user", "content": "3+3?"}]
    assert with_shots(prompt, []) == prompt


# -- best-of-N and RewardBench ----------------------------------------------------------------------
def test_best_of_n():
    rewards = [[0.1, 0.9, 0.3], [0.5, 0.5, 0.1], [2.0, 1.0, -1.0], [0.0, 0.2, 0.1]]
    correct = [[False, True, False], [False, True, True], [True, True, True], [False, False, False]]
    got = M.best_of_n(rewards, correct)
    assert got["selected"] == [1, 0, 0, 1]  # a tie goes to the first sample
    assert got["accuracy"] == pytest.approx(2 / 4)
    assert got["mean_sample"] == pytest.approx(6 / 12)
    assert got["pass_at_n"] == pytest.approx(3 / 4) and got["all_correct"] == pytest.approx(1 / 4)
    assert got["all_correct"] <= got["accuracy"] <= got["pass_at_n"]
    with pytest.raises(ValueError):
        M.best_of_n([[0.1, 0.2], [0.3]], [[True, False], [True]])


def test_rewardbench_sections():
    acc = {"alpacaeval-easy": 1.0, "mt-bench-easy": 0.5, "math-prm": 1.0, "hep-cpp": 0.0, "mine": 0.0}
    got = M.rewardbench_sections(acc)
    assert got == {"Chat": pytest.approx((100 * 1.0 + 28 * 0.5) / 128),
                   "Reasoning": pytest.approx(984 / (984 + 164))}  # math-prm counts as much as all code
    full = {**acc, "mt-bench-hard": 0.25, "donotanswer": 0.75}
    got = M.rewardbench_sections(full)
    assert got["Chat Hard"] == 0.25 and got["Safety"] == 0.75
    assert got["score"] == pytest.approx((got["Chat"] + 0.25 + 0.75 + got["Reasoning"]) / 4)
