"""`megarlhf eval` end to end on the tiny checkpoints: greedy exact match with few-shot
exemplars, IFEval rule checks, best-of-N with a reward model and RM pair accuracy, the
same results at TP=2 (and the reward model at PP=2), and errors before processes start."""

import json
import shutil

import pytest

from megarlhf.eval import metrics as M
from megarlhf.models.checkpoint import read_meta, write_meta
from tests.conftest import megarlhf
from tests.recipes.conftest import sft_like  # noqa: F401  (the fixture)


def cli(*args, timeout=300):
    return megarlhf(*args, threads="1", timeout=timeout)


def ok(res):
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    return res


def lines(path):
    return [json.loads(l) for l in open(path)]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rm_ckpt(sft_like, mg_reward, tmp_path_factory):  # noqa: F811
    """The tiny reward model with the policy's tokenizer and mean pooling recorded."""
    ckpt, _ = sft_like
    rm = tmp_path_factory.mktemp("rm") / "rm"
    shutil.copytree(mg_reward, rm)
    meta, policy = read_meta(str(rm)), read_meta(str(ckpt))
    write_meta(str(rm), meta.__class__(model=meta.model, kind="reward", tokenizer=policy.tokenizer,
                                       chat_template="tulu", extra={"reward_pooling": "mean"}))
    return rm


def test_greedy_builtin_with_few_shot_writes_json_and_markdown(sft_like, tmp_path):  # noqa: F811
    from megarlhf.data.task import is_correct
    from megarlhf.recipes.pairs_common import tokenizer_of

    ckpt, files = sft_like
    shots = write(tmp_path / "shots.jsonl", [
        {"question": "Ava has 1 pen. How many?", "answer": "1 = <<1=1>>1.\n#### 1"},
        {"question": "unused", "answer": "#### 0"}])
    out = tmp_path / "out"
    res = ok(cli("eval", "--ckpt", ckpt, "--data", files["eval"], "--task", "builtin", "--few-shot", shots,
                 "--shots", 1, "--limit", 5, "--max-new-tokens", 10, "--out", out))
    r = json.loads((out / "eval.json").read_text())
    assert r["prompts"] == 5 and r["few_shot_held_out"] == 0
    assert set(r["metrics"]) == {"builtin/exact_match", "builtin/no_answer"}
    assert r["counts"]["builtin/exact_match"] == 5 and sum(r["finish_reasons"].values()) == 5
    assert r["settings"]["task"] == "builtin" and r["settings"]["shots"] == 1 and r["settings"]["tp"] == 1
    recs = lines(out / "samples.jsonl")
    assert [x["source"] for x in recs] == [f"{files['eval']}: line {i}" for i in range(1, 6)]
    flags = [is_correct(x["response"], x["reference"]) for x in recs]
    assert [x["correct"] for x in recs] == flags
    assert r["metrics"]["builtin/exact_match"] == sum(flags) / 5
    assert all(0 < len(x["response"]) for x in recs)
    # the exemplar (question, then its worked answer without calculator notes) precedes every prompt
    _, template = tokenizer_of(read_meta(str(ckpt)), str(ckpt))
    shot = [{"role": "user", "content": "Ava has 1 pen. How many?"},
            {"role": "assistant", "content": "1 = 1.\n#### 1"}]
    for x, row in zip(recs, lines(files["eval"])):
        want = template.encode_prompt(shot + [{"role": "user", "content": row["prompt"]}])
        assert x["prompt_tokens"] == len(want)
    md = (out / "eval.md").read_text()
    assert "| metric | value | n |" in md and "| builtin/exact_match |" in md
    assert md in res.stdout and str(out / "eval.json") in res.stdout


def test_ifeval_rules_end_to_end(sft_like, tmp_path):  # noqa: F811
    ckpt, _ = sft_like
    rules = write(tmp_path / "ifeval.jsonl", [
        {"key": 1, "prompt": "Ava has 3 pens. How many pens does Ava have?",
         "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
         "kwargs": [{}, {"num_words": 50, "relation": "less than"}]},
        {"key": 2, "prompt": "Ben has 4 eggs. Ben eats 1. How many eggs does Ben have?",
         "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
        {"key": 3, "prompt": "Cleo has 5 cards. How many cards does Cleo have?",
         "instruction_id_list": ["keywords:existence", "detectable_format:number_bullet_lists"],
         "kwargs": [{"keywords": ["cards"], "num_bullets": None}, {"num_bullets": 0, "keywords": None}]},
    ])
    out = tmp_path / "out"
    ok(cli("eval", "--ckpt", ckpt, "--data", rules, "--max-new-tokens", 10, "--out", out))
    r = json.loads((out / "eval.json").read_text())
    assert r["settings"]["task"] == "ifeval"  # detected from the rows
    recs = lines(out / "samples.jsonl")
    assert [x["key"] for x in recs] == [1, 2, 3]
    scores = [M.score_ifeval(x["response"], M.parse_instructions(row)) for x, row in zip(recs, lines(rules))]
    assert [x["strict"] for x in recs] == [s["strict"] for s in scores]
    expected = {f"ifeval/{k}": v for k, v in M.ifeval_summary(scores).items()}
    assert r["metrics"] == pytest.approx(expected)
    assert r["counts"]["ifeval/prompt_strict"] == 3 and r["counts"]["ifeval/instruction_strict"] == 5
    assert r["counts"]["ifeval/instruction/punctuation:no_comma"] == 1


def test_best_of_n_pairs_and_tp2(sft_like, rm_ckpt, tmp_path):  # noqa: F811
    ckpt, files = sft_like
    common = ["--ckpt", ckpt, "--reward-ckpt", rm_ckpt, "--best-of", 2, "--temperature", 1.0,
              "--max-new-tokens", 12, "--reward-batch", 4]
    first = tmp_path / "first"
    ok(cli("eval", *common, "--data", files["eval"], "--limit", 6, "--out", first))
    r = json.loads((first / "eval.json").read_text())
    pre = "gsm8k/best_of_2"
    assert {f"{pre}/{k}" for k in ("accuracy", "mean_sample", "pass_at_2", "all_correct", "reward_mean",
                                   "reward_selected_mean")} <= set(r["metrics"])
    assert r["counts"][f"{pre}/mean_sample"] == 12 and r["settings"]["reward_pooling"] == "mean"
    recs = lines(first / "samples.jsonl")
    assert len(recs) == 6 and all(len(x["samples"]) == 2 for x in recs)
    for x in recs:
        rw = [s["reward"] for s in x["samples"]]
        assert x["selected"] == rw.index(max(rw))
    assert len({s["reward"] for x in recs for s in x["samples"]}) == 12  # a real score per sample

    # Second run: references that some samples match (the random policy writes numbers now and
    # then), pairs made of each prompt's two samples; at TP=2, the reward model at PP=2.
    refs = []
    for x in recs:
        found = [s["answer"] for s in x["samples"] if s["answer"] is not None] + [x["answer"]]
        refs.append(next((a for a in found if a is not None), "987654321"))
    data = write(tmp_path / "d1.jsonl", [{"prompt": x["prompt"], "reference": ref}
                                         for x, ref in zip(recs, refs)])
    subsets = ["alpacaeval-easy", "math-prm", "hep-python"]
    pairs = [{"prompt": x["prompt"][0]["content"], "chosen": x["samples"][0]["response"],
              "rejected": x["samples"][1]["response"], "subset": subsets[j % 3]}
             for j, x in enumerate(recs)
             if x["samples"][0]["response"] != x["samples"][1]["response"]
             and all(s["response"].strip() for s in x["samples"])]
    assert len(pairs) >= 4
    bench = write(tmp_path / "bench.jsonl", pairs)
    second = tmp_path / "second"
    res = ok(cli("eval", *common, "--data", data, "--pairs", bench, "--tp", 2, "--reward-tp", 1,
                 "--reward-pp", 2, "--out", second))
    assert "starting 2 processes" in res.stdout
    r2 = json.loads((second / "eval.json").read_text())
    assert r2["settings"]["dp"] == 1 and r2["settings"]["reward_pp"] == 2
    recs2 = lines(second / "samples.jsonl")
    # TP=2 answers, samples and rewards are TP=1's
    assert [x["response"] for x in recs2] == [x["response"] for x in recs]
    for a, b in zip(recs, recs2):
        assert [s["response"] for s in a["samples"]] == [s["response"] for s in b["samples"]]
        for s, t in zip(a["samples"], b["samples"]):
            assert abs(s["reward"] - t["reward"]) < 1e-4
    # correctness against the new references, and best-of-N from it
    C = [[M.numbers_equal(s["answer"], ref) for s in x["samples"]] for x, ref in zip(recs2, refs)]
    assert [[s["correct"] for s in x["samples"]] for x in recs2] == C
    sel = [x["selected"] for x in recs2]
    m = r2["metrics"]
    assert m[f"{pre}/accuracy"] == sum(c[k] for c, k in zip(C, sel)) / 6
    assert m[f"{pre}/mean_sample"] == sum(map(sum, C)) / 12
    assert m[f"{pre}/pass_at_2"] == sum(map(any, C)) / 6 > 0
    assert m[f"{pre}/all_correct"] <= m[f"{pre}/accuracy"] <= m[f"{pre}/pass_at_2"]
    assert m["gsm8k/exact_match"] == sum(M.numbers_equal(x["answer"], ref) for x, ref in zip(recs2, refs)) / 6
    # pair accuracy (the reward-model recipe's path) agrees with the best-of-N scores
    rewards = {x["prompt"][0]["content"]: [s["reward"] for s in x["samples"]] for x in recs2}
    wins = {}
    for p in pairs:
        r0, r1 = rewards[p["prompt"]]
        assert abs(r0 - r1) > 1e-4  # no near tie to flip
        wins.setdefault(p["subset"], []).append(r0 > r1)
    allw = [w for v in wins.values() for w in v]
    assert m["pairs/accuracy"] == pytest.approx(sum(allw) / len(allw))
    per = {}
    for name, v in wins.items():
        per[name] = sum(v) / len(v)
        assert m[f"pairs/accuracy/{name}"] == pytest.approx(per[name])
        assert r2["counts"][f"pairs/accuracy/{name}"] == len(v)
    sections = M.rewardbench_sections(per)
    assert m["pairs/section/Chat"] == pytest.approx(sections["Chat"])
    assert m["pairs/section/Reasoning"] == pytest.approx(sections["Reasoning"])
    assert "pairs/rewardbench" not in m  # only two of the four sections present


def test_errors_before_any_process(sft_like, rm_ckpt, tmp_path):  # noqa: F811
    from megarlhf.config import ConfigError
    from megarlhf.data.load import DataError
    from megarlhf.eval.run import _parser, _plan, processes

    ckpt, files = sft_like
    rules = write(tmp_path / "rules.jsonl", [
        {"prompt": "Hi", "instruction_id_list": ["punctuation:no_comma"]},
        {"prompt": "Hi", "instruction_id_list": ["length_constraints:number_words"],
         "kwargs": [{"num_words": "many", "relation": "at least"}]}])
    res = cli("eval", "--ckpt", ckpt, "--data", rules, "--tp", 2)
    assert res.returncode == 2 and "starting" not in res.stdout
    assert f"megarlhf eval: {rules}: line 2: field 'kwargs[0].num_words': expected an integer" in res.stderr

    base = ["--ckpt", str(ckpt), "--data", files["eval"]]
    with pytest.raises(ValueError, match="--best-of N needs --reward-ckpt"):
        processes(base + ["--best-of", "2"])
    with pytest.raises(ValueError, match="is a reward model"):
        processes(["--ckpt", str(rm_ckpt), "--data", files["eval"]])
    with pytest.raises(ValueError, match="not a reward model"):
        processes(base + ["--reward-ckpt", str(ckpt), "--best-of", "2"])
    with pytest.raises(ValueError, match="give it as --reward-ckpt"):
        processes(base + ["--pairs", files["preference"]])
    with pytest.raises(ConfigError, match="--tp/--pp"):
        processes(base + ["--tp", "3"])
    with pytest.raises(ConfigError, match="--reward-tp/--reward-pp"):
        processes(base + ["--reward-ckpt", str(rm_ckpt), "--best-of", "2", "--reward-tp", "3"])
    # the job is sized for both models: their TP x PP must both divide it
    assert processes(base) == 1
    assert processes(base + ["--tp", "2", "--reward-ckpt", str(rm_ckpt), "--best-of", "2", "--reward-tp", "1",
                             "--reward-pp", "2"]) == 2
    assert processes(["--ckpt", str(rm_ckpt), "--pairs", files["preference"], "--tp", "2"]) == 2
    # --few-shot N: the first N rows of --data become the exemplars and are not scored
    plan = _plan(_parser().parse_args(["--ckpt", str(ckpt), "--data", files["prompts"], "--few-shot", "2"]))
    assert plan.held_out_shots == 2 and len(plan.rows) == 14 and plan.shots[0].where.endswith("line 1")
    with pytest.raises(DataError, match="eval.jsonl: line 1: field 'answer': a few-shot exemplar"):
        processes(base + ["--few-shot", "1"])  # the held-out rows have no worked answer
