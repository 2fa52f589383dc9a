"""Loaders for the paper's 12 data sets into one schema (``Example``).

Held-in: StrategyQA, CommonsenseQA, ARC-Challenge, MATH, GSM8K, TabMWP, ANLI, Date Understanding.
Held-out: BoolQ, OpenBookQA, e-SNLI, GSM8K-Reversal.

Sources: local JSON / JSONL / CSV / parquet files in the Hugging Face hub schema of each set (what
``../shared/data`` holds), or a hub id through ``datasets`` (online users). A malformed row is reported
with its file and line; ``on_error="skip"`` skips it (and counts it in the report), ``"raise"`` stops.
"""
from __future__ import annotations

import csv
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field

from exgrpo.data.answers import ANSWER_TYPES, last_boxed

HELD_IN = ("strategyqa", "commonsense_qa", "arc_challenge", "math", "gsm8k", "tabmwp", "anli", "date_understanding")
HELD_OUT = ("boolq", "openbookqa", "esnli", "gsm8k_reversal")
NLI_LABELS = ("entailment", "neutral", "contradiction")


@dataclass(frozen=True)
class Example:
    """One question in the common schema.

    id: unique within its data set; question: the full prompt text (choices, passage or table rendered in);
    answer: gold answer as a string ("18", "B", "yes", "entailment", "12/25/1937", LaTeX for math);
    answer_type: one of exgrpo.data.answers.ANSWER_TYPES; rationale: a worked solution if the set has one.
    """

    id: str
    dataset: str
    split: str
    question: str
    answer: str
    answer_type: str
    rationale: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"Example.answer_type must be one of {ANSWER_TYPES}, got {self.answer_type!r}")

    def to_dict(self):
        return asdict(self)


class RowError(ValueError):
    pass


def _choices(labels, texts):
    return "\n".join(f"({l}) {t}" for l, t in zip(labels, texts))


def _need(row, *keys):
    for k in keys:
        if k not in row or row[k] is None:
            raise RowError(f"missing field {k!r}")
    return [row[k] for k in keys]


def _yes_no(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    s = str(v).strip().lower()
    if s in ("true", "yes", "1"):
        return "yes"
    if s in ("false", "no", "0"):
        return "no"
    raise RowError(f"answer {v!r} is not a yes/no value")


def _mc(row, stem_key):
    stem, ch, key = _need(row, stem_key, "choices", "answerKey")
    if not isinstance(ch, dict) or "label" not in ch or "text" not in ch or len(ch["label"]) != len(ch["text"]):
        raise RowError("choices must be {label: [...], text: [...]} of equal length")
    if key not in ch["label"]:
        raise RowError(f"answerKey {key!r} is not among the choice labels {ch['label']}")
    return f"{stem}\nAnswer Choices:\n{_choices(ch['label'], ch['text'])}", key


def _strategyqa(r, i):
    q, a = _need(r, "question", "answer")
    return dict(id=r.get("qid", str(i)), question=q, answer=_yes_no(a), answer_type="bool",
                rationale=" ".join(r["facts"]) if r.get("facts") else None)


def _commonsense_qa(r, i):
    q, key = _mc(r, "question")
    return dict(id=r.get("id", str(i)), question=q, answer=key, answer_type="choice")


_arc = _commonsense_qa


def _openbookqa(r, i):
    q, key = _mc(r, "question_stem")
    return dict(id=r.get("id", str(i)), question=q, answer=key, answer_type="choice")


def _math(r, i):
    p, sol = _need(r, "problem", "solution")
    a = last_boxed(sol)
    if a is None:
        raise RowError("solution has no \\boxed{} answer")
    return dict(id=str(r.get("idx", r.get("unique_id", i))), question=p, answer=a.strip(), answer_type="math",
                rationale=sol, meta={k: r[k] for k in ("level", "type") if k in r})


def _gsm8k(r, i):
    q, sol = _need(r, "question", "answer")
    if "####" not in sol:
        raise RowError("answer has no '#### <number>' line")
    body, a = sol.rsplit("####", 1)
    return dict(id=str(r.get("id", i)), question=q, answer=a.strip().replace(",", ""), answer_type="number",
                rationale=re.sub(r"<<[^>]*>>", "", body).strip())


def _tabmwp(r, i):
    q, a, table = _need(r, "question", "answer", "table")
    title = r.get("table_title")
    text = (f"{title}\n" if title else "") + f"{table}\n\n{q}"
    if r.get("choices"):
        labels = [chr(ord("A") + k) for k in range(len(r["choices"]))]
        if str(a) not in r["choices"]:
            raise RowError(f"answer {a!r} is not among the choices")
        return dict(id=str(r.get("pid", i)), question=f"{text}\nAnswer Choices:\n{_choices(labels, r['choices'])}",
                    answer=labels[r["choices"].index(str(a))], answer_type="choice", rationale=r.get("solution"))
    return dict(id=str(r.get("pid", i)), question=text + (f" (Unit: {r['unit']})" if r.get("unit") else ""),
                answer=str(a).replace(",", ""), answer_type="number", rationale=r.get("solution"))


def _nli(premise_key, hyp_key, rationale_key):
    def load(r, i):
        p, h, lab = _need(r, premise_key, hyp_key, "label")
        if isinstance(lab, str) and lab in NLI_LABELS:
            lab = NLI_LABELS.index(lab)
        if lab not in (0, 1, 2):
            raise RowError(f"label {lab!r} is not 0, 1 or 2")
        q = (f"Premise: {p}\nHypothesis: {h}\nDoes the premise entail the hypothesis, contradict it, or neither? "
             f"Answer with entailment, neutral or contradiction.")
        return dict(id=str(r.get("uid", i)), question=q, answer=NLI_LABELS[lab], answer_type="label",
                    rationale=r.get(rationale_key) or None)
    return load


def _date_understanding(r, i):
    q, t = _need(r, "input", "target")
    m = re.fullmatch(r"\(?([A-F])\)?", str(t).strip())
    if not m:
        raise RowError(f"target {t!r} is not an option letter")
    return dict(id=str(i), question=q, answer=m.group(1), answer_type="choice")


def _boolq(r, i):
    q, a, p = _need(r, "question", "answer", "passage")
    return dict(id=str(i), question=f"{p}\n\nQuestion: {q}?", answer=_yes_no(a), answer_type="bool")


def _gsm8k_reversal(r, i):
    q, a = _need(r, "question", "ground_truth_answer")
    return dict(id=r.get("uuid", str(i)), question=q, answer=str(a).replace(",", ""), answer_type="number",
                rationale=r.get("ground_truth_solution") or None)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    row: callable
    hub: tuple | None  # (path, config) for datasets.load_dataset; None: no public hub copy in this schema
    default_file: str = "sample.jsonl"


SPECS = {s.name: s for s in (
    DatasetSpec("strategyqa", _strategyqa, ("ChilleD/StrategyQA", None)),
    DatasetSpec("commonsense_qa", _commonsense_qa, ("tau/commonsense_qa", None)),
    DatasetSpec("arc_challenge", _arc, ("allenai/ai2_arc", "ARC-Challenge")),
    DatasetSpec("math", _math, ("EleutherAI/hendrycks_math", None)),
    DatasetSpec("gsm8k", _gsm8k, ("openai/gsm8k", "main"), "train.jsonl"),
    DatasetSpec("tabmwp", _tabmwp, None),  # the authors publish JSON files (lupantech/PromptPG), not a hub set
    DatasetSpec("anli", _nli("premise", "hypothesis", "reason"), ("facebook/anli", None)),
    DatasetSpec("date_understanding", _date_understanding, ("lukaemon/bbh", "date_understanding")),
    DatasetSpec("boolq", _boolq, ("google/boolq", None)),
    DatasetSpec("openbookqa", _openbookqa, ("allenai/openbookqa", "main")),
    DatasetSpec("esnli", _nli("premise", "hypothesis", "explanation_1"), ("esnli", None)),
    DatasetSpec("gsm8k_reversal", _gsm8k_reversal, None),  # no hub set in the MR-GSM8K "reversed" schema
)}


@dataclass
class LoadReport:
    path: str
    rows: int = 0
    loaded: int = 0
    skipped: list = field(default_factory=list)  # "file:line: reason"


def _read_rows(path):
    """(line_number, row dict or the exception) for each row of a JSON / JSONL / CSV / parquet file."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, RowError(f"invalid JSON: {e.msg}")
    elif ext == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            data = data.get("data", data.get("examples", list(data.values())))
        for n, row in enumerate(data, 1):
            yield n, row
    elif ext == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                yield n, {k: _csv_value(v) for k, v in row.items()}
    elif ext == ".parquet":
        import pyarrow.parquet as pq  # the data extra: parquet files only
        for n, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield n, row
    else:
        raise ValueError(f"unsupported file type {ext!r} for {path} (use .jsonl, .json, .csv or .parquet)")


def _csv_value(v):
    if v and v[0] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def load_dataset(name: str, source: str | None = None, *, split: str = "train", limit: int | None = None,
                 on_error: str = "skip", data_root: str | None = None, report: list | None = None) -> list[Example]:
    """Load one of the 12 sets.

    Args:
        name: one of HELD_IN + HELD_OUT.
        source: a local file (.jsonl/.json/.csv/.parquet), a folder (``<split>.jsonl`` or its default file), ``hub`` or
            ``hub:<path>[:<config>]`` for ``datasets.load_dataset``; default: ``<data_root>/<name>/<default file>``.
        split: the split name recorded in the examples (and requested from the hub).
        limit: keep the first ``limit`` examples.
        on_error: "skip" (report and go on) or "raise" (ValueError naming file and line).
        data_root: folder holding ``<name>/`` folders (default: $EXGRPO_DATA or ../shared/data).
        report: a list that receives this call's LoadReport.
    """
    if name not in SPECS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(SPECS)}")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    spec = SPECS[name]
    if source is not None and source.startswith("hub"):
        rows, where = _hub_rows(spec, source, split), f"hub:{spec.hub[0]}"
    else:
        path = source or os.path.join(data_root or default_data_root(), name)
        if os.path.isdir(path):  # <split>.jsonl when the folder has one (gsm8k/test.jsonl), else the default file
            by_split = os.path.join(path, f"{split}.jsonl")
            path = by_split if os.path.exists(by_split) else os.path.join(path, spec.default_file)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name}: no data at {path}")
        rows, where = _read_rows(path), path
    rep = LoadReport(where)
    out = []
    for line, row in rows:
        rep.rows += 1
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise RowError(f"row is a {type(row).__name__}, not an object")
            fields = spec.row(row, line)
            out.append(Example(dataset=name, split=split, **fields))
        except (RowError, KeyError, TypeError, ValueError) as e:
            msg = f"{where}:{line}: {e}"
            if on_error == "raise":
                raise ValueError(f"malformed row in {name}: {msg}") from None
            rep.skipped.append(msg)
            continue
        if limit is not None and len(out) >= limit:
            break
    rep.loaded = len(out)
    if report is not None:
        report.append(rep)
    if rep.skipped:
        warnings.warn(f"{name}: skipped {len(rep.skipped)} malformed rows, first: {rep.skipped[0]}", stacklevel=2)
    return out


def _hub_rows(spec, source, split):
    try:
        import datasets  # the data extra: source=hub only
    except ImportError as e:
        raise ImportError("loading from the Hugging Face hub needs `pip install datasets`") from e
    parts = source.split(":")
    if (len(parts) < 2 or not parts[1]) and spec.hub is None:
        raise ValueError(f"{spec.name}: no hub copy in the schema this loader reads; download the files and pass "
                         f"source=<file.json|.jsonl|.csv|.parquet> (or data_root=<folder with {spec.name}/>), or name a "
                         f"hub set in this schema with source=hub:<id>[:<config>]")
    path = parts[1] if len(parts) > 1 and parts[1] else spec.hub[0]
    config = parts[2] if len(parts) > 2 else (spec.hub[1] if spec.hub else None)
    ds = datasets.load_dataset(path, config, split=split)
    return ((i + 1, dict(r)) for i, r in enumerate(ds))


def default_data_root() -> str:
    env = os.environ.get("EXGRPO_DATA")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", "shared", "data"))
