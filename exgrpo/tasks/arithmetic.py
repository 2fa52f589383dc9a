"""Built-in arithmetic domain: multi-step word problems with an exact symbolic teacher.

The embedded default of the main command and of the CPU tests: no model download, no network.

* ``make_split(n, seed, kind)``: "train"/"test" (held-in: forward problems) or "reversal" (out of
  distribution: the starting amount is masked and the final amount given; GSM8K-Reversal in miniature).
* ``SymbolicTeacher``: exact rationales and answers, and probes for all 10 rules of ``exgrpo.rules``
  (counterfactuals recompute the answer, inverse problems solve for a hidden operand, verification checks a
  candidate by substitution, ...). Every probe has a checkable answer (number, option letter, yes/no).

The inverse-problem probe hides an operand of a step, never the start: the reversal split stays a format
the student never sees in training.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, replace

from exgrpo.data.loaders import Example
from exgrpo.rules import RULE_NAMES, Probe

NAMES = ("Mia", "Leo", "Ana", "Sam", "Ivy", "Max", "Zoe", "Ben", "Eva", "Tom")
ITEMS = ("pens", "apples", "cards", "books", "coins", "shells", "stamps", "eggs")
OPS = ("add", "sub", "mul")
SYM = {"add": "+", "sub": "-", "mul": "*"}


@dataclass(frozen=True)
class ArithProblem:
    """start, then each op (add n | sub n | mul n) applied in turn."""

    name: str
    item: str
    start: int
    ops: tuple  # ((op, n), ...)

    def values(self) -> list[int]:
        v = [self.start]
        for op, n in self.ops:
            v.append(v[-1] + n if op == "add" else v[-1] - n if op == "sub" else v[-1] * n)
        return v

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def _event(self, op, n) -> str:
        if op == "add":
            return f"gets {n} more"
        if op == "sub":
            return f"gives away {n}"
        return {2: "doubles them", 3: "triples them"}.get(n, f"multiplies them by {n}")

    def premises(self) -> str:
        return " ".join([f"{self.name} has {self.start} {self.item}."] +
                        [f"Then {self.name} {self._event(op, n)}." for op, n in self.ops])

    def question(self) -> str:
        return f"{self.premises()} How many {self.item} does {self.name} have now?"

    def rationale(self) -> str:
        v = self.values()
        steps = [f"{v[i]} {SYM[op]} {n} = {v[i + 1]}." for i, (op, n) in enumerate(self.ops)]
        return " ".join(steps) + f" The answer is {self.answer}."

    def paraphrase_question(self) -> str:
        """The same problem in sentence frames the training data never uses (an out-of-distribution phrasing whose
        arithmetic is the familiar one)."""
        events = " ".join(f"After that, {self.name} {self._event(op, n)}." for op, n in self.ops)
        return (f"At first, {self.name} owns {self.start} {self.item}. {events} "
                f"What is the number of {self.item} that {self.name} holds in the end?")

    def reversal_question(self) -> str:
        events = " ".join(f"Then {self.name} {self._event(op, n)}." for op, n in self.ops)
        return (f"{self.name} has some {self.item}. {events} Now {self.name} has {self.answer} {self.item}. "
                f"How many {self.item} did {self.name} have at first?")

    def reversal_rationale(self) -> str:
        v = self.values()
        steps = []
        for i in range(len(self.ops) - 1, -1, -1):
            op, n = self.ops[i]
            inv = {"add": "-", "sub": "+", "mul": "/"}[op]
            steps.append(f"{v[i + 1]} {inv} {n} = {v[i]}.")
        return " ".join(steps) + f" The answer is {self.start}."


def random_problem(rng: random.Random, n_ops: int = 2) -> ArithProblem:
    """Small numbers (every value stays in 1..40), at most one multiplication."""
    while True:
        start = rng.randint(2, 12)
        ops, v, used_mul = [], start, False
        for _ in range(n_ops):
            choices = ["add", "sub"] + ([] if used_mul or v > 12 else ["mul"])
            op = rng.choice(choices)
            if op == "add":
                n = rng.randint(1, 9)
                v += n
            elif op == "sub":
                if v < 2:
                    break
                n = rng.randint(1, min(9, v - 1))
                v -= n
            else:
                n = rng.choice((2, 3))
                v *= n
                used_mul = True
            ops.append((op, n))
        if len(ops) == n_ops and v <= 40:
            return ArithProblem(rng.choice(NAMES), rng.choice(ITEMS), start, tuple(ops))


KINDS = ("train", "test", "reversal", "paraphrase")


def make_split(n: int, seed: int, kind: str = "train", n_ops: int = 2) -> list[Example]:
    """n examples. kind: "train" / "test" (forward questions), "reversal" (start masked) or "paraphrase" (forward
    questions in unseen sentence frames). Test, reversal and paraphrase questions come from a fixed fifth of the
    problem space that "train" never draws from."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rng = random.Random(f"{kind}-{seed}-{n_ops}")
    out = []
    seen = set()
    while len(out) < n:
        p = random_problem(rng, n_ops)
        key = (p.name, p.item, p.start, p.ops)
        held_out = zlib.crc32(repr(key).encode()) % 5 == 0  # a fixed fifth of all problems is never trained on
        if key in seen or held_out != (kind != "train"):
            continue
        seen.add(key)
        if kind == "reversal":
            q, a, r = p.reversal_question(), p.start, p.reversal_rationale()
        elif kind == "paraphrase":
            q, a, r = p.paraphrase_question(), p.answer, p.rationale()
        else:
            q, a, r = p.question(), p.answer, p.rationale()
        name = {"reversal": "reversal", "paraphrase": "paraphrase"}.get(kind, "forward")
        out.append(Example(id=f"arith-{kind}-{seed}-{len(out)}", dataset=f"arithmetic_{name}",
                           split=kind, question=q, answer=str(a), answer_type="number", rationale=r,
                           meta={"problem": {"name": p.name, "item": p.item, "start": p.start, "ops": [list(o) for o in p.ops]}}))
    return out


def problem_of(ex: Example) -> ArithProblem:
    m = ex.meta["problem"]
    return ArithProblem(m["name"], m["item"], m["start"], tuple(tuple(o) for o in m["ops"]))


def _options(rng, correct: str, wrong: list[str]):
    opts = [correct] + wrong
    rng.shuffle(opts)
    letters = "ABCDE"
    text = " ".join(f"({letters[i]}) {o}" for i, o in enumerate(opts))
    return text, letters[opts.index(correct)]


class SymbolicTeacher:
    """Exact teacher for the arithmetic domain: rationales, answers and probes for all 10 rules."""

    def rationale(self, ex: Example) -> str:
        return ex.rationale

    def answer(self, ex: Example) -> str:
        return ex.answer

    def probe(self, ex: Example, rule: str, seed: int = 0) -> Probe:
        if rule not in RULE_NAMES:
            raise ValueError(f"unknown rule {rule!r}")
        p = problem_of(ex)
        rng = random.Random(f"{ex.id}-{rule}-{seed}")
        return getattr(self, f"_{rule}")(p, rng)

    def consistent(self, ex: Example, probe: Probe) -> bool:
        """Eq. 1: given [probe, rationale, answer] as context, the teacher still answers Q with the gold answer.
        The symbolic teacher's answer to Q does not depend on context, so this checks the probe's own answer
        against an independent recomputation."""
        return probe.rationale.rstrip().endswith(f"The answer is {probe.answer}.")

    # -- the rules -------------------------------------------------------------------------------

    def _counterfactual(self, p, rng):
        j = rng.randrange(len(p.ops))
        op, n = p.ops[j]
        choices = [m for m in ((2, 3) if op == "mul" else range(1, 10)) if m != n]
        for m in rng.sample(choices, len(choices)):
            ops = list(p.ops)
            ops[j] = (op, m)
            q = replace(p, ops=tuple(ops))
            if all(x >= 0 for x in q.values()):
                break
        return Probe("counterfactual", f"Suppose the numbers change. {q.question()}", q.rationale(), str(q.answer), "number")

    def _explanatory_challenge(self, p, rng):
        j = rng.randrange(len(p.ops))
        op, n = p.ops[j]
        why = {"add": f"add, because getting {n} more increases the count",
               "sub": f"subtract, because giving away {n} decreases the count",
               "mul": f"multiply, because the count becomes {n} times as large"}
        wrong = [why[o] for o in OPS if o != op]
        opts, letter = _options(rng, why[op], wrong)
        v = p.values()
        q = (f"{p.name} has {v[j]} {p.item}. Then {p.name} {p._event(op, n)}. Which step is right, and why? {opts}")
        r = f"{v[j]} {SYM[op]} {n} = {v[j + 1]}, so the step is: {why[op]}. The answer is {letter}."
        return Probe("explanatory_challenge", q, r, letter, "choice")

    def _decomposition(self, p, rng):
        v = p.values()
        op, n = p.ops[0]
        q = f"{p.name} has {p.start} {p.item}. Then {p.name} {p._event(op, n)}. How many {p.item} after this first step?"
        return Probe("decomposition", q, f"{v[0]} {SYM[op]} {n} = {v[1]}. The answer is {v[1]}.", str(v[1]), "number")

    def _inverse_problem(self, p, rng):
        j = rng.randrange(len(p.ops))
        op, n = p.ops[j]
        v = p.values()
        events = []
        for i, (o, m) in enumerate(p.ops):
            if i == j:
                events.append({"add": f"Then {p.name} gets some more.", "sub": f"Then {p.name} gives some away.",
                               "mul": f"Then {p.name} multiplies them by some number."}[o])
            else:
                events.append(f"Then {p.name} {p._event(o, m)}.")
        q = (f"{p.name} has {p.start} {p.item}. {' '.join(events)} Now {p.name} has {p.answer} {p.item}. "
             f"{'How many did ' + p.name + ' get' if op == 'add' else 'How many did ' + p.name + ' give away' if op == 'sub' else 'By what number did ' + p.name + ' multiply'}?")  # noqa: E501
        # forward to the step, backward from the end to it
        fwd = [f"{v[i]} {SYM[o]} {m} = {v[i + 1]}." for i, (o, m) in enumerate(p.ops[:j])]
        back = []
        for i in range(len(p.ops) - 1, j, -1):
            o, m = p.ops[i]
            back.append(f"{v[i + 1]} {dict(add='-', sub='+', mul='/')[o]} {m} = {v[i]}.")
        solve = {"add": f"{v[j + 1]} - {v[j]} = {n}.", "sub": f"{v[j]} - {v[j + 1]} = {n}.",
                 "mul": f"{v[j + 1]} / {v[j]} = {n}."}[op]
        r = " ".join(fwd + back + [solve]) + f" The answer is {n}."
        return Probe("inverse_problem", q, r, str(n), "number")

    def _step_justification(self, p, rng):
        j = rng.randrange(len(p.ops))
        op, n = p.ops[j]
        v = p.values()
        right = f"because {p.name} {p._event(op, n)}"
        other_op = "sub" if op == "add" else "add"
        wrong = [f"because {p.name} {p._event(other_op, n)}", f"because {p.name} had {n} {p.item} at first"]
        opts, letter = _options(rng, right, wrong)
        q = f"{p.premises()} In the step {v[j]} {SYM[op]} {n} = {v[j + 1]}, why is {n} used? {opts}"
        return Probe("step_justification", q, f"The step {v[j]} {SYM[op]} {n} comes from: {right}. The answer is {letter}.",
                     letter, "choice")

    def _error_diagnosis(self, p, rng):
        v = p.values()
        j = rng.randrange(len(p.ops))
        wrong_vals = list(v)
        wrong_vals[j + 1] = v[j + 1] + rng.choice((-2, -1, 1, 2))
        steps = []
        for i, (op, n) in enumerate(p.ops):
            a = wrong_vals[i]
            res = wrong_vals[i + 1] if i == j else (a + n if op == "add" else a - n if op == "sub" else a * n)
            wrong_vals[i + 1] = res
            steps.append(f"{a} {SYM[op]} {n} = {res}.")
        q = f"{p.question()} A student wrote: \"{' '.join(steps)}\" Find the mistake. What is the correct answer?"
        r = f"Step {j + 1} is wrong. {p.rationale()}"
        return Probe("error_diagnosis", q, r, str(p.answer), "number")

    def _analogical_transfer(self, p, rng):
        for _ in range(100):
            ops = tuple((op, rng.choice((2, 3)) if op == "mul" else rng.randint(1, 9)) for op, _ in p.ops)
            q = ArithProblem(rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 12), ops)
            if all(0 <= x <= 60 for x in q.values()):
                break
        return Probe("analogical_transfer", q.question(), q.rationale(), str(q.answer), "number")

    def _generalisation(self, p, rng):
        x = p.start + rng.randint(1, 5)
        q = replace(p, start=x)
        a_coef, c = 1, 0
        for op, n in p.ops:
            a_coef, c = (a_coef, c + n) if op == "add" else (a_coef, c - n) if op == "sub" else (a_coef * n, c * n)
        rule = f"{a_coef} * x {'+' if c >= 0 else '-'} {abs(c)}" if a_coef != 1 else f"x {'+' if c >= 0 else '-'} {abs(c)}"
        text = (f"{p.name} has x {p.item}. " + " ".join(f"Then {p.name} {p._event(op, n)}." for op, n in p.ops) +
                f" The final count is a rule in x. Use the rule for x = {x}: how many {p.item}?")
        r = f"The rule is {rule}. With x = {x}: {q.rationale()}"
        return Probe("generalisation", text, r, str(q.answer), "number")

    def _verification(self, p, rng):
        right = rng.random() < 0.5
        cand = p.answer if right else p.answer + rng.choice((-3, -2, -1, 1, 2, 3))
        q = f"{p.question()} Is {cand} correct? Answer yes or no."
        a = "yes" if right else "no"
        r = f"{p.rationale()[:-len(f' The answer is {p.answer}.')]} {p.answer} {'equals' if right else 'is not'} {cand}. The answer is {a}."  # noqa: E501
        return Probe("verification", q, r, a, "bool")

    def _cause_oriented(self, p, rng):
        subs = [(i, n) for i, (op, n) in enumerate(p.ops) if op == "sub"]
        if subs:
            i, n = subs[0]
            right, feature = f"giving away {n}", "go down"
            wrong = [f"having {p.start} at first"] + [f"getting {m} more" if o == "add" else f"multiplying by {m}"
                                                      for o, m in p.ops if o != "sub"][:1]
        else:
            op, n = p.ops[-1]
            right = f"getting {n} more" if op == "add" else f"multiplying by {n}"
            feature = "go up in the last step"
            wrong = [f"having {p.start} at first", "nothing, it stays the same"]
        opts, letter = _options(rng, right, wrong)
        q = f"{p.premises()} What makes the count {feature}? {opts}"
        return Probe("cause_oriented", q, f"The count changes because of {right}. The answer is {letter}.", letter, "choice")


def tokenizer_corpus(n: int = 1500) -> list[str]:
    """Text of the whole domain for training a tokenizer: questions of every kind (1 and 2 operations), their
    rationales, and every rule's probes with their rationales. Fixed seeds: the same corpus every time."""
    t = SymbolicTeacher()
    out = []
    for n_ops in (1, 2):
        for kind in KINDS:
            for e in make_split(n // 4 if kind != "train" else n, 7, kind, n_ops=n_ops):
                out += [e.question, e.rationale]
                if kind == "train":
                    for rule in RULE_NAMES:
                        pr = t.probe(e, rule)
                        out += [pr.question, pr.rationale]
    return out
