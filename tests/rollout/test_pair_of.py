"""How `megarlhf pairs` turns one prompt's samples into a preference pair (pure function)."""

import random

from megarlhf.rollout.commands import pair_of

ROW = {"prompt": "Ava has 2 pens. Ava buys 3 more. How many pens does Ava have now?", "reference": "5",
       "solution": "2 + 3 = 5.\n#### 5"}


def counts():
    return {"pairs": 0, "all_correct": 0, "no_correct_no_solution": 0, "chosen_from_policy": 0,
            "chosen_from_solution": 0, "empty_samples": 0, "only_empty_wrong": 0}


def test_right_against_wrong_preferring_wrong_answers_with_a_number():
    c = counts()
    pair = pair_of(["2 + 3 = 6.\n#### 6", "2 + 3 = 5.\n#### 5", "2 + 3 ="], ROW, random.Random(0), c)
    assert pair == ("2 + 3 = 5.\n#### 5", "2 + 3 = 6.\n#### 6")
    assert c["chosen_from_policy"] == 1


def test_an_empty_answer_is_never_a_side_and_is_counted():
    """A policy that stops at once gives '': it is wrong, but a pair with an empty side is
    refused by the pair loaders, so it is left out and counted."""
    c = counts()
    assert pair_of(["", "2 + 3 = 5.\n#### 5"], ROW, random.Random(0), c) is None
    assert c["empty_samples"] == 1 and c["only_empty_wrong"] == 1 and c["all_correct"] == 0
    c = counts()
    assert pair_of(["  ", "2 + 3 = 4.\n#### 4"], ROW, random.Random(0), c) == (ROW["solution"], "2 + 3 = 4.\n#### 4")
    assert c["empty_samples"] == 1 and c["chosen_from_solution"] == 1
    c = counts()
    assert pair_of(["2 + 3 = 5.\n#### 5", "2 + 3 = 5.\n#### 5"], ROW, random.Random(0), c) is None
    assert c["all_correct"] == 1 and c["empty_samples"] == 0


def test_no_right_answer_and_no_solution_gives_no_pair():
    c = counts()
    assert pair_of(["#### 4"], {"reference": "5"}, random.Random(0), c) is None
    assert c["no_correct_no_solution"] == 1
