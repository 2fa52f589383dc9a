"""The built-in arithmetic domain and its exact symbolic teacher."""
import pytest

from exgrpo.data.answers import is_correct
from exgrpo.rules import RULE_NAMES, RULES, get_rules, probe_answer_type
from exgrpo.tasks.arithmetic import SymbolicTeacher, make_split, problem_of


def test_splits_are_deterministic_disjoint_and_correct():
    tr, te, rv = make_split(300, 0, "train"), make_split(100, 0, "test"), make_split(100, 0, "reversal")
    assert [e.question for e in tr] == [e.question for e in make_split(300, 0, "train")]
    assert not {e.question for e in tr} & {e.question for e in te}
    for e in tr + te + rv:
        assert is_correct(e.rationale, e.answer, "number"), e
        assert int(e.answer) >= 0
    p = problem_of(rv[0])
    assert str(p.start) == rv[0].answer and f"has {p.answer}" in rv[0].question and "at first" in rv[0].question


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_every_rule_gives_exact_checkable_probes(rule):
    t = SymbolicTeacher()
    for e in make_split(150, 1, "train"):
        pr = t.probe(e, rule)
        assert pr.answer_type == probe_answer_type(rule, "number")
        assert is_correct(pr.rationale, pr.answer, pr.answer_type), (rule, pr)
        assert t.consistent(e, pr)
        assert pr.question != e.question or rule == "analogical_transfer"
        if pr.answer_type == "choice":
            assert f"({pr.answer})" in pr.question
        if rule == "inverse_problem":  # hides an operand, never the start: the reversal split stays unseen
            assert f"has {problem_of(e).start} " in pr.question


def test_counterfactual_and_inverse_recompute_the_answer():
    t = SymbolicTeacher()
    e = make_split(1, 3, "train")[0]
    p = problem_of(e)
    cf = t.probe(e, "counterfactual")
    assert cf.answer != e.answer or cf.question != e.question
    inv = t.probe(e, "inverse_problem")
    assert int(inv.answer) in [n for _, n in p.ops]


def test_rule_registry():
    assert len(RULES) == 10
    assert {"counterfactual", "explanatory_challenge", "decomposition", "cause_oriented"} <= set(RULES)
    with pytest.raises(ValueError, match="unknown rules"):
        get_rules(["counterfactual", "telepathy"])
    for r in RULES.values():
        assert "{question}" in r.template and "Probe:" in r.template
