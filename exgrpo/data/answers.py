"""Answer extraction and checking: the outcome reward of ExGRPO.

``extract_answer(text, answer_type)`` pulls the final answer out of a model's or teacher's text;
``is_correct(text, gold, answer_type)`` compares it with the gold answer. Answer types (the loaders'
schema uses the same names):

    number  GSM8K, TabMWP, GSM8K-Reversal: ``#### 18``, "The answer is $1,800.", ``\\boxed{18}``, 18.0 = 18,
            fractions, negatives, thousands separators, $, %, trailing units
    math    MATH: ``\\boxed{...}`` with nested braces, LaTeX equivalence through math-verify (sympy)
    choice  multiple choice: "(B)", "B)", "B.", "the answer is B", "Answer: B"
    bool    yes / no / true / false
    label   NLI: entailment / neutral / contradiction
    date    MM/DD/YYYY, YYYY-MM-DD, "December 25, 1937"

Where a text states several answers, the last explicit statement wins ("#### x", then \\boxed, then "the
answer is"), and a bare value is looked for only when there is none. Model text is never evaluated: numbers
are parsed with ``fractions.Fraction``, LaTeX by math-verify's parser.
"""
from __future__ import annotations

import datetime
import re
from fractions import Fraction

ANSWER_TYPES = ("number", "math", "choice", "bool", "label", "date")
LABELS = ("entailment", "neutral", "contradiction")

_NUM = r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+"
_MARKERS = [
    re.compile(r"####\s*(?P<a>[^\n]+)"),
    re.compile(r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)\s*:?\s*(?P<a>[^\n]+)", re.I),
    re.compile(r"(?:^|\n)\s*A\s*:\s*(?P<a>[^\n]+)"),
]


def _check_type(answer_type):
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        m = re.match(r"\\boxed\s+(\S+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def _statement(text: str) -> str | None:
    """The text of the last explicit answer statement."""
    m = list(_MARKERS[0].finditer(text))
    if m:
        return m[-1].group("a").strip()
    b = last_boxed(text)
    if b is not None:
        return b.strip()
    for pat in _MARKERS[1:3]:
        m = list(pat.finditer(text))
        if m:
            return m[-1].group("a").strip()
    return None


def parse_number(s: str) -> Fraction | None:
    """'1,800', '$18.00', '-3/4', '18 apples', '12%', '\\frac{3}{4}' -> Fraction; None if no number."""
    s = s.replace("\\!", "").replace("\\,", "").replace("{,}", ",").replace("\u2212", "-")
    m = re.search(r"\\[dt]?frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    if m:
        try:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        except (ValueError, ZeroDivisionError):
            return None
    m = re.search(_NUM, s)
    if not m:
        return None
    tok = m.group(0).replace(",", "").replace(" ", "")
    try:
        if "/" in tok:
            a, b = tok.split("/")
            return Fraction(a) / Fraction(b)
        return Fraction(tok)
    except (ValueError, ZeroDivisionError):
        return None


_FRAC = r"\\[dt]?frac\{-?\d+(?:\.\d+)?\}\{-?\d+(?:\.\d+)?\}"
_VALUE = re.compile(rf"{_FRAC}|(?:-\s?)?(?:{_NUM})")
_COPULA = re.compile(r"(?:\b(?:is|was|are|were|equals|makes|gets|has|be)\b|=|:)\s*(?:about\s+|exactly\s+|\$)?\s*$", re.I)


def _final_statement_number(text: str) -> Fraction | None:
    """No explicit answer statement: the value of the last sentence that has one. In it, the value right after
    the last copula ("is", "was", "=", ":" ...), else its first value ("22 people did at least 30 sit-ups")."""
    text = text.replace("\u2212", "-").replace(",\n", "\n")
    sentences = [x for x in re.split(r"(?<=[.!?])\s+|\n+", text) if _VALUE.search(x)]
    if not sentences:
        return None
    sent = sentences[-1]
    values = list(_VALUE.finditer(sent))
    pick = values[0]
    for m in values:
        if _COPULA.search(sent[:m.start()]):
            pick = m
    return parse_number(pick.group(0).replace("- ", "-"))


def _choice(s: str) -> str | None:
    m = (re.search(r"\(([A-Ja-j1-9])\)", s) or re.search(r"(?:^|\s)([A-Ja-j1-9])\)", s)
         or re.search(r"(?:^|\s)([A-J1-9])(?:[.:,]|\s|$)", s))
    return m.group(1).upper() if m else None


def _bool(s: str) -> str | None:
    words = re.findall(r"\b(yes|no|true|false)\b", s.lower())
    if not words:
        return None
    return "yes" if words[0] in ("yes", "true") else "no"


def _label(s: str) -> str | None:
    found = re.findall(r"\b(entail(?:ment|s|ed)?|neutral|contradict(?:ion|s|ory)?)\b", s.lower())
    if not found:
        return None
    w = found[0]
    return "entailment" if w.startswith("entail") else ("neutral" if w == "neutral" else "contradiction")


_MONTHS = {m.lower(): i for i, m in enumerate(
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
     "December"], 1)}


def parse_date(s: str) -> datetime.date | None:
    m = re.search(r"(\d{1,2})/(\d{1,2})/(\d{4})", s)
    try:
        if m:
            return datetime.date(int(m.group(3)), int(m.group(1)), int(m.group(2)))
        m = re.search(r"(\d{4})-(\d{1,2})-(\d{1,2})", s)
        if m:
            return datetime.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        m = re.search(r"([A-Za-z]+)\.?\s+(\d{1,2})(?:st|nd|rd|th)?,?\s+(\d{4})", s)
        if m and m.group(1).lower() in _MONTHS:
            return datetime.date(int(m.group(3)), _MONTHS[m.group(1).lower()], int(m.group(2)))
    except ValueError:
        return None
    return None


def extract_answer(text: str, answer_type: str):
    """The final answer in ``text``, normalised for its type (Fraction, str, date, or the LaTeX string for
    math); None when the text states none."""
    _check_type(answer_type)
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    st = _statement(text)
    if answer_type == "number":
        v = parse_number(st) if st is not None else None
        return v if v is not None else _final_statement_number(text)
    if answer_type == "math":
        return st
    if answer_type == "choice":
        return _choice(st) if st is not None and _choice(st) else _choice(text.strip()[-40:])
    if answer_type == "bool":
        return (_bool(st) if st is not None else None) or _bool(text.strip()[-60:])
    if answer_type == "label":
        return (_label(st) if st is not None else None) or _label(text.strip()[-120:])
    return (parse_date(st) if st is not None else None) or parse_date(text.strip()[-80:])


def normalise_gold(gold, answer_type: str):
    """Gold answers from the loaders ("18", "B", True, "entailment", "12/25/1937", LaTeX) to extract_answer's form."""
    _check_type(answer_type)
    if answer_type == "bool":
        if isinstance(gold, bool):
            return "yes" if gold else "no"
        return _bool(str(gold))
    if answer_type == "number":
        return gold if isinstance(gold, Fraction) else parse_number(str(gold))
    if answer_type == "choice":
        return _choice(f"({str(gold).strip().strip('()')})")
    if answer_type == "label":
        return LABELS[gold] if isinstance(gold, int) else _label(str(gold))
    if answer_type == "date":
        return gold if isinstance(gold, datetime.date) else parse_date(str(gold))
    return str(gold)


def _math_equal(pred: str, gold: str) -> bool:
    from math_verify import parse, verify
    m = re.fullmatch(r"\s*[A-Za-z]\w*\s*=\s*(.+)", pred)
    if m and "=" not in gold:
        pred = m.group(1)  # "x = 5" states 5
    if ("=" in pred) != ("=" in gold):
        return False  # an equation is not a value: "10x - 4y = 0" does not answer "0"
    try:
        g = parse(f"${gold}$") or parse(gold)
        p = parse(f"${pred}$") or parse(pred)
        if g and p and verify(g, p):
            return True
    except Exception:  # noqa: BLE001  (a parser failure is a wrong answer, never a crash of the reward)
        pass
    strip = lambda s: re.sub(r"\s+|\\left|\\right|\\!|\$", "", s)  # noqa: E731
    plain = re.compile(rf"(?:{_NUM}|{_FRAC})")
    if plain.fullmatch(strip(pred)) and plain.fullmatch(strip(gold)):
        return parse_number(strip(pred)) == parse_number(strip(gold))
    return strip(pred) == strip(gold)


def is_correct(text: str, gold, answer_type: str) -> bool:
    """True when the final answer stated in ``text`` equals ``gold`` under ``answer_type``'s equivalence."""
    pred = extract_answer(text, answer_type)
    g = normalise_gold(gold, answer_type)
    if pred is None or g is None:
        return False
    if answer_type == "math":
        return _math_equal(pred, g)
    return pred == g
