"""The 10 Explanatory Inversion rules (docs/method.md, stage 1).

Each rule is one named entry: a docstring-like description, the answer type its probes have (given the
original question's), and the prompt a teacher LLM gets to write the probe. Adding a rule is adding one
entry to ``RULES`` (and, for the built-in arithmetic domain, one method of its symbolic teacher).
Rules 1, 2, 3 and 10 are the paper's; 4-9 are this project's, in the same spirit.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    answer_type: str  # "same" (the original question's type), or one of the answer types
    template: str  # formatted with question, answer, rationale


_FORMAT = (
    "\n\nWrite ONE new question (the probe) that a student can answer in a few sentences and whose final answer is "
    "{kind}. Reply in exactly this format:\nProbe: <the probe question, self-contained>\n"
)
_CHOICE = "a single option letter; list the options in the probe as (A) ..., (B) ..., (C) ..."
_SAME = "of the same kind as the original answer (a number for arithmetic)"


def _prompt(ask: str, kind: str) -> str:
    """The teacher's prompt: the solved example, what the probe should ask, and the reply format."""
    return ("Original question: {question}\nCorrect answer: {answer}\nSolution: {rationale}\n\n" + ask
            + _FORMAT.format(kind=kind))


RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("counterfactual", "R1: change one premise and ask how the conclusion changes.", "same",
         _prompt("Change exactly one premise (a number or a condition) and ask for the new answer.", _SAME)),
    Rule("explanatory_challenge", "R2: ask the student to justify a logical step of the solution.", "choice",
         _prompt("Ask why one step of the solution is valid, as a multiple-choice question with one "
                 "correct justification.", _CHOICE)),
    Rule("decomposition", "R3: split the problem into sub-questions and ask one intermediate result.", "same",
         _prompt("Ask for the result of the first sub-step of the solution only.", _SAME)),
    Rule("inverse_problem", "Given the result, recover a premise.", "same",
         _prompt("State the final result as known, hide one given quantity, and ask for that quantity.", _SAME)),
    Rule("step_justification", "Why this operation: tie a computation to the premise it comes from.", "choice",
         _prompt("Pick one computation of the solution and ask which premise of the question it comes "
                 "from, with options.", _CHOICE)),
    Rule("error_diagnosis", "Find and fix the flaw in a wrong rationale.", "same",
         _prompt("Write a plausible solution with one wrong step, show it in the probe, and ask for the "
                 "corrected final answer.", _SAME)),
    Rule("analogical_transfer", "Same structure, new entities and numbers.", "same",
         _prompt("Write a new question with the same reasoning structure but different entities and "
                 "numbers.", _SAME)),
    Rule("generalisation", "State the rule or formula behind the answer, then apply it.", "same",
         _prompt("Ask the student to express the answer as a rule in one of the given quantities and apply "
                 "it to a new value of that quantity.", _SAME)),
    Rule("verification", "Check a candidate answer by substitution.", "bool",
         _prompt("Give a candidate answer (right or wrong) and ask whether it is correct, to be checked by "
                 "substituting it back.", "yes or no")),
    Rule("cause_oriented", "R10 (causal reinforcement): which premise causes the result.", "choice",
         _prompt("Ask which premise of the question causes a specific feature of the result, with options.", _CHOICE)),
)}

RULE_NAMES = tuple(RULES)


@dataclass(frozen=True)
class Probe:
    """An explanatory probe with the teacher's rationale (ending in "The answer is X.") and answer."""

    rule: str
    question: str
    rationale: str
    answer: str
    answer_type: str


def probe_answer_type(rule: str, question_type: str) -> str:
    r = RULES[rule]
    return question_type if r.answer_type == "same" else r.answer_type


def get_rules(names) -> list[Rule]:
    bad = [n for n in names if n not in RULES]
    if bad:
        raise ValueError(f"unknown rules {bad}; known: {list(RULES)}")
    return [RULES[n] for n in names]
