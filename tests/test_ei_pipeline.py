"""exgrpo ei on the built-in arithmetic domain: D_EI dialogues, filters, report, resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from exgrpo.config import EIConfig, load_config
from exgrpo.ei.pipeline import run_ei
from exgrpo.ei.teacher import SymbolicBatchTeacher

ROOT = os.path.join(os.path.dirname(__file__), "..")


def read(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


class CountingTeacher(SymbolicBatchTeacher):
    def __init__(self):
        super().__init__()
        self.probe_calls = 0

    def probes(self, items):
        self.probe_calls += len(items)
        return super().probes(items)


class RuleStudent:
    """A deterministic student for the filter logic: right on the rules it knows, wrong elsewhere."""

    def __init__(self, known):
        self.known = known

    def chat_many(self, convs):
        from exgrpo.tasks.arithmetic import SymbolicTeacher  # noqa: F401
        out = []
        for c in convs:
            q = c[-1]["content"]
            out.append(self.known.get(q, "I do not know."))
        return out


def test_dialogues_and_report(tmp_path):
    cfg = EIConfig(limit=20, rules_per_example=4, out_dir=str(tmp_path / "ei"), batch_size=7)
    rep = run_ei(cfg, progress=False)
    d = read(tmp_path / "ei" / "d_ei.jsonl")
    assert rep["examples"] == 20 and rep["kept"] == 20 == len(d)
    assert sum(v["generated"] for v in rep["per_rule"].values()) == 80
    for x in d:
        m = x["messages"]
        assert len(m) == 2 * 4 + 2 and [t["role"] for t in m] == ["user", "assistant"] * 5
        assert m[-2]["content"] == x["question"] and m[-1]["content"].endswith(f"The answer is {x['answer']}.")
    assert os.path.exists(tmp_path / "ei" / "config.yaml") and os.path.exists(tmp_path / "ei" / "report.json")


def test_difficulty_filter_eq2(tmp_path):
    cfg = EIConfig(limit=12, rules_per_example=3, out_dir=str(tmp_path / "ei"), tau_hard=1)
    run_ei(cfg, progress=False)  # probes first, to know what the student will be asked
    probes = read(tmp_path / "ei" / "probes.jsonl")
    by_uid = {}
    for p in probes:
        by_uid.setdefault(p["uid"], []).append(p)
    uids = sorted(by_uid)
    known = {}
    for p in by_uid[uids[0]]:  # student solves every probe of the first question -> dropped (too easy)
        known[p["probe"]["question"]] = p["probe"]["rationale"]
    p = by_uid[uids[1]][0]  # one probe of the second question -> kept
    known[p["probe"]["question"]] = p["probe"]["rationale"]
    cfg2 = EIConfig(limit=12, rules_per_example=3, out_dir=str(tmp_path / "ei2"), tau_hard=1)
    rep = run_ei(cfg2, student=RuleStudent(known), progress=False)
    assert rep["dropped"]["student_solves_all"] == 1 and rep["dropped"]["too_hard"] == 10 and rep["kept"] == 1
    kept = read(tmp_path / "ei2" / "d_ei.jsonl")
    assert [x["uid"] for x in kept] == [uids[1]]
    rep0 = run_ei(EIConfig(limit=12, rules_per_example=3, out_dir=str(tmp_path / "ei3"), tau_hard=0),
                  student=RuleStudent(known), progress=False)
    assert rep0["kept"] == 11  # tau_hard 0 keeps the hard ones, still drops the solved one


def test_resume_after_kill_redoes_nothing(tmp_path):
    out = tmp_path / "ei"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from exgrpo.config import EIConfig
        from exgrpo.ei.pipeline import run_ei
        from exgrpo.ei.teacher import SymbolicBatchTeacher
        class Slow(SymbolicBatchTeacher):
            def probes(self, items):
                time.sleep(0.3)
                return super().probes(items)
        run_ei(EIConfig(limit=40, rules_per_example=5, out_dir={str(out)!r}, batch_size=10), teacher=Slow(), progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    log = out / "probes.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or sum(1 for _ in open(log)) < 30):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sum(1 for _ in open(log))
    assert 30 <= done < 200, done
    with open(log, "a") as f:
        f.write('{"uid": "arithmetic_forward/arith-tr')  # a torn line, as a kill mid-write leaves
    t = CountingTeacher()
    run_ei(EIConfig(limit=40, rules_per_example=5, out_dir=str(out), batch_size=10), teacher=t, progress=False)
    assert t.probe_calls == 200 - done  # nothing finished was redone
    ref = tmp_path / "ref"
    run_ei(EIConfig(limit=40, rules_per_example=5, out_dir=str(ref), batch_size=10), progress=False)
    assert read(out / "d_ei.jsonl") == read(ref / "d_ei.jsonl")  # nothing lost
    assert len(read(log)) == 200


def test_config_errors_and_overrides(tmp_path):
    with pytest.raises(ValueError, match=r"rules_per_example must be in \[1, 10\], got 11"):
        EIConfig(rules_per_example=11)
    with pytest.raises(ValueError, match=r"unknown rules \['telepathy'\]"):
        EIConfig(rules=("telepathy",))
    with pytest.raises(ValueError, match=r"only knows the built-in 'arithmetic'"):
        EIConfig(data=("gsm8k",))
    cfg = load_config(EIConfig, None, ["limit=5", "teacher=openai", "data=gsm8k,math", "teacher_chat.max_concurrency=3"])
    assert cfg.limit == 5 and cfg.data == ("gsm8k", "math") and cfg.teacher_chat.max_concurrency == 3
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['teacher_chat.port'\]"):
        load_config(EIConfig, None, ["teacher_chat.port=1"])
    with pytest.raises(ValueError, match=r"config field 'limit': cannot read 'many' as int"):
        load_config(EIConfig, None, ["limit=many"])


def test_cli_runs_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "exgrpo", "ei", f"out_dir={tmp_path}/cli", "limit=6", "rules_per_example=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kept"] == 6
    r = subprocess.run([sys.executable, "-m", "exgrpo", "ei", "rules_per_example=0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "rules_per_example must be in [1, 10], got 0" in r.stderr
