"""The outcome reward: extract_answer / is_correct on real solutions (GSM8K test, GSM8K socratic, MATH,
TabMWP, all human-written worked solutions from ../shared/data) and on every stated answer format, with
right and deliberately wrong answers."""
import json
import os
from fractions import Fraction

import pytest

from exgrpo.data.answers import extract_answer, is_correct, last_boxed, normalise_gold, parse_number
from tests.utils import SHARED_DATA


def rows(name, file="sample.jsonl"):
    with open(os.path.join(SHARED_DATA, name, file)) as f:
        return [json.loads(line) for line in f]


def gsm_gold(answer):
    return answer.split("####")[-1].strip().replace(",", "")


@pytest.mark.parametrize("file", ["test.jsonl", "test_socratic.jsonl"])
def test_gsm8k_real_solutions_are_right_and_perturbed_ones_wrong(file):
    data = rows("gsm8k", file)
    assert len(data) == 1319
    for r in data:
        gold = gsm_gold(r["answer"])
        assert is_correct(r["answer"], gold, "number"), r["answer"]
        wrong = str(Fraction(gold) + 1)
        assert not is_correct(r["answer"], wrong, "number")
        body = r["answer"].split("####")[0]
        # the same worked solution ending in a wrong final statement is wrong
        assert not is_correct(body + f"\nThe answer is {wrong}.", gold, "number") or Fraction(wrong) == Fraction(gold)


FORMATS = [
    "#### {a}", "The answer is {a}.", "The final answer is {a}", "Answer: {a}", "A: {a}", "\\boxed{{{a}}}",
    "So the answer is ${a}.", "Therefore she makes {a} dollars.", "The answer is: {a} apples", "{a}",
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_number_formats_on_gsm8k_golds(fmt):
    for r in rows("gsm8k", "test.jsonl")[:300]:
        gold = gsm_gold(r["answer"])
        g = Fraction(gold)
        shown = f"{int(g):,}" if g.denominator == 1 and abs(g) >= 1000 and "$" in fmt else gold
        text = "Let me think. First 3 + 4 = 7.\n" + fmt.format(a=shown)
        assert is_correct(text, gold, "number"), text
        assert not is_correct("Let me think.\n" + fmt.format(a=str(g + 7)), gold, "number")


@pytest.mark.parametrize("text,gold,ok", [
    ("The answer is 18.0", "18", True), ("#### 1,800", "1800", True), ("The answer is $1,800.50.", "1800.5", True),
    ("The answer is -3", "-3", True), ("The answer is \u22123", "-3", True), ("The answer is 3/4", "0.75", True),
    ("The answer is \\frac{3}{4}", "0.75", True), ("The answer is 12%", "12", True), ("The answer is 0.5", "1/2", True),
    ("I get 17 first, but the answer is 18", "18", True), ("The answer is 18, not 17", "18", True),
    ("The answer is 17", "18", False), ("no number here", "18", False), ("The answer is 180", "18", False),
])
def test_number_cases(text, gold, ok):
    assert is_correct(text, gold, "number") is ok


def test_math_real_solutions_and_latex_equivalence():
    data = rows("math")
    golds = [last_boxed(r["solution"]) for r in data]
    assert all(g is not None for g in golds)
    for r, g in zip(data, golds):
        assert is_correct(r["solution"], g, "math"), (r["solution"][-80:], g)
    wrong = sum(is_correct(data[i]["solution"], golds[(i + 1) % len(golds)], "math") for i in range(len(data)))
    same = sum(golds[i] == golds[(i + 1) % len(golds)] for i in range(len(data)))
    assert wrong == same  # only identical answers of neighbouring problems agree
    assert is_correct("so $x = \\boxed{\\dfrac{1}{2}}$", "0.5", "math")
    assert is_correct("The answer is \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", "math")
    assert is_correct("\\boxed{2x+1}", "1+2x", "math")
    assert not is_correct("\\boxed{2x-1}", "1+2x", "math")
    assert last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"


def test_tabmwp_real_solutions():
    # human solutions with no answer marker ("22 people did at least 30 sit-ups."): the fallback reads the
    # final statement. Measured: 144 of 146 numeric rows; a wrong gold is never accepted.
    data = [r for r in rows("tabmwp") if r["ans_type"] in ("integer_number", "decimal_number")]
    right = sum(is_correct(r["solution"], r["answer"], "number") for r in data)
    assert len(data) == 146 and right >= 143, right
    assert not any(is_correct(r["solution"], str(parse_number(r["answer"]) + 1), "number") for r in data)
    # stated the way our prompts ask for it, every one is read right
    assert all(is_correct(r["solution"] + f"\nThe answer is {r['answer']}.", r["answer"], "number") for r in data)


@pytest.mark.parametrize("text,gold,ok", [
    ("The answer is (B).", "B", True), ("Answer: C", "C", True), ("So the answer is b)", "B", True),
    ("(A) is wrong; the answer is D", "D", True), ("The correct option is (E)", "E", True),
    ("The answer is (B).", "(B)", True), ("The answer is A.", "B", False), ("I am not sure", "B", False),
])
def test_choice(text, gold, ok):
    assert is_correct(text, gold, "choice") is ok


def test_choice_on_real_keys():
    for name in ("commonsense_qa", "arc_challenge", "openbookqa"):
        for r in rows(name):
            key = r["answerKey"]
            assert is_correct(f"Let's see. The answer is ({key}).", key, "choice")
            other = next(l for l in r["choices"]["label"] if l != key)
            assert not is_correct(f"The answer is {other}.", key, "choice")
    for r in rows("date_understanding"):
        assert is_correct(f"So the answer is {r['target']}.", r["target"], "choice")


@pytest.mark.parametrize("text,gold,ok", [
    ("Yes.", True, True), ("The answer is no", False, True), ("So the answer is: true", "yes", True),
    ("No, because ... so no.", True, False), ("Thus the answer is yes.", "no", False),
])
def test_bool(text, gold, ok):
    assert is_correct(text, gold, "bool") is ok


def test_bool_and_labels_on_real_rows():
    for r in rows("strategyqa"):
        a = "yes" if r["answer"] else "no"
        assert is_correct(" ".join(r["facts"]) + f" So the answer is {a}.", r["answer"], "bool")
        assert not is_correct(f"So the answer is {'no' if r['answer'] else 'yes'}.", r["answer"], "bool")
    names = ["entailment", "neutral", "contradiction"]
    for r in rows("anli") + rows("esnli"):
        lab = names[r["label"]]
        assert is_correct(f"Reasoning... The answer is {lab}.", r["label"], "label")
        assert not is_correct(f"The answer is {names[(r['label'] + 1) % 3]}.", r["label"], "label")
    assert is_correct("The hypothesis contradicts the premise.", "contradiction", "label")


def test_dates():
    assert is_correct("The answer is 12/25/1937.", "12/25/1937", "date")
    assert is_correct("It is December 25, 1937.", "12/25/1937", "date")
    assert is_correct("Answer: 1937-12-25", "12/25/1937", "date")
    assert not is_correct("The answer is 12/24/1937", "12/25/1937", "date")


def test_never_evaluates_and_rejects_bad_types():
    assert not is_correct("The answer is __import__('os').system('echo hi')", "0", "number")
    assert extract_answer("The answer is \\boxed{2**1000000}", "math") == "2**1000000"
    with pytest.raises(ValueError, match="answer_type must be one of"):
        is_correct("1", "1", "integer")
    with pytest.raises(ValueError, match="text must be a str"):
        extract_answer(None, "number")
    assert normalise_gold(True, "bool") == "yes" and normalise_gold(2, "label") == "contradiction"
