"""Every loader parses the real files in ../shared/data; bad rows are reported by file and line."""
import csv
import json
import os

import pytest

from exgrpo.data.answers import is_correct
from exgrpo.data.loaders import HELD_IN, HELD_OUT, load_dataset
from tests.utils import SHARED_DATA

EXPECTED = {"strategyqa": 200, "commonsense_qa": 200, "arc_challenge": 200, "math": 200, "gsm8k": 7473,
            "tabmwp": 200, "anli": None, "date_understanding": None, "boolq": None, "openbookqa": None, "esnli": None,
            "gsm8k_reversal": None}


@pytest.mark.parametrize("name", HELD_IN + HELD_OUT)
def test_every_loader_parses_the_shared_files(name):
    report = []
    ex = load_dataset(name, data_root=SHARED_DATA, on_error="raise", report=report)
    assert report[0].skipped == [] and report[0].loaded == report[0].rows == len(ex)
    if EXPECTED[name]:
        assert len(ex) == EXPECTED[name]
    assert len(ex) >= 50
    assert len({e.id for e in ex}) == len(ex) or name in ("date_understanding", "boolq", "esnli")
    for e in ex:
        assert e.question.strip() and e.answer.strip()
        # the gold answer, stated plainly, is judged correct by the reward
        stated = f"The answer is {e.answer}." if e.answer_type != "math" else f"\\boxed{{{e.answer}}}"
        assert is_correct(stated, e.answer, e.answer_type), (name, e.id, e.answer)
        if e.answer_type == "choice":
            assert f"({e.answer})" in e.question


def test_gsm8k_test_split_and_rationales():
    ex = load_dataset("gsm8k", os.path.join(SHARED_DATA, "gsm8k", "test.jsonl"), split="test")
    assert len(ex) == 1319 and ex[0].split == "test" and ex[0].answer == "18"
    assert "<<" not in ex[0].rationale and "####" not in ex[0].rationale
    math = load_dataset("math", data_root=SHARED_DATA)
    assert all(is_correct(e.rationale, e.answer, "math") for e in math)


def test_malformed_rows_are_reported_with_file_and_line(tmp_path):
    src = os.path.join(SHARED_DATA, "gsm8k", "test.jsonl")
    lines = open(src).read().splitlines()[:5]
    lines[1] = '{"question": "no answer field"}'
    lines[3] = "{not json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    report = []
    with pytest.warns(UserWarning, match="skipped 2 malformed rows"):
        ex = load_dataset("gsm8k", str(bad), report=report)
    assert len(ex) == 3 and report[0].rows == 5
    assert report[0].skipped[0].startswith(f"{bad}:2: missing field 'answer'")
    assert report[0].skipped[1].startswith(f"{bad}:4: invalid JSON")
    with pytest.raises(ValueError, match=rf"malformed row in gsm8k: {bad}:2: missing field 'answer'"):
        load_dataset("gsm8k", str(bad), on_error="raise")


def test_csv_and_json_sources(tmp_path):
    rows = [json.loads(x) for x in open(os.path.join(SHARED_DATA, "arc_challenge", "sample.jsonl"))][:10]
    p = tmp_path / "arc.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "question", "choices", "answerKey"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "choices": json.dumps(r["choices"])})
    a = load_dataset("arc_challenge", str(p), on_error="raise")
    j = tmp_path / "arc.json"
    j.write_text(json.dumps(rows))
    b = load_dataset("arc_challenge", str(j), on_error="raise")
    assert [e.question for e in a] == [e.question for e in b] and len(a) == 10
    with pytest.raises(ValueError, match="unknown data set 'gsm9k'"):
        load_dataset("gsm9k")
    with pytest.raises(FileNotFoundError, match="no data at"):
        load_dataset("gsm8k", str(tmp_path / "missing.jsonl"))


def test_parquet_file_made_here_loads_like_jsonl(tmp_path):
    """The parquet path (pyarrow, the `data` extra) reads the hub schema: GSM8K rows written to a parquet file load
    to the same examples as the JSONL they came from."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [json.loads(x) for x in open(os.path.join(SHARED_DATA, "gsm8k", "test.jsonl"))][:25]
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    from_parquet = load_dataset("gsm8k", str(path), split="test")
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(e.question, e.answer, e.rationale) for e in from_parquet] == \
        [(e.question, e.answer, e.rationale) for e in load_dataset("gsm8k", str(jsonl), split="test")]
    assert len(from_parquet) == 25


@pytest.mark.parametrize("name", ["tabmwp", "gsm8k_reversal"])
def test_sets_without_a_hub_copy_say_how_to_supply_files(name):
    with pytest.raises(ValueError, match=rf"{name}: no hub copy .* source=<file"):
        load_dataset(name, "hub")
