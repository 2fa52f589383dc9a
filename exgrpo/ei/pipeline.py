"""``exgrpo ei``: build D_EI, the filtered explanatory-probe dialogues (docs/method.md, stage 1).

For each example: the teacher's rationale if the data set has none; k rules sampled (seeded) and one probe
per rule with the teacher's rationale and answer; the consistency filter (Eq. 1); the student difficulty
filter (Eq. 2: drop the question when no probe is kept, when the student answers every kept probe, or when
it answers fewer than tau_hard); then one dialogue per kept question: probes as user turns, the teacher's
rationales as assistant turns, the original question last.

Every stage appends to a JSONL log keyed by (example, rule) and flushed per batch, so a run killed at any
point and started again redoes nothing that finished and loses nothing; D_EI and the report are written
atomically at the end.
"""
from __future__ import annotations

import dataclasses
import os
import random

from tqdm import tqdm

from exgrpo.config import EIConfig, save_config
from exgrpo.data.answers import is_correct
from exgrpo.data.loaders import Example, load_dataset
from exgrpo.rules import Probe
from exgrpo.ei.teacher import SOLVE, ChatClient, LLMTeacher, SymbolicBatchTeacher, TransformersChat
from exgrpo.io import AppendLog, atomic_write_json, write_jsonl_atomic
from exgrpo.tasks.arithmetic import make_split


def load_examples(cfg: EIConfig) -> list[Example]:
    out = []
    for name in cfg.data:
        if name == "arithmetic":
            out += make_split(cfg.limit or 200, cfg.seed, "train", n_ops=cfg.arith_ops)
        else:
            out += load_dataset(name, split=cfg.split, limit=cfg.limit, data_root=cfg.data_root)
    return out


def uid(e: Example) -> str:
    return f"{e.dataset}/{e.id}"


def chosen_rules(e: Example, cfg: EIConfig) -> list[str]:
    rng = random.Random(f"{cfg.seed}-{uid(e)}")
    return rng.sample(list(cfg.rules), cfg.rules_per_example)


def _batches(xs, n):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


def run_ei(cfg: EIConfig, *, teacher=None, student=None, examples=None, progress: bool = True) -> dict:
    """Run (or resume) the pipeline. teacher: an object with rationales / probes / consistent (default from
    cfg); student: a chat object with chat_many (default from cfg.student_model_path, or no difficulty
    filter). Returns the report (also written to out_dir/report.json)."""
    teacher = teacher or build_teacher(cfg)
    if student is None and cfg.student_model_path:
        student = build_local_chat(cfg.student_model_path)
    examples = examples if examples is not None else load_examples(cfg)
    out = cfg.out_dir
    save_config(cfg, out)
    rats = AppendLog(os.path.join(out, "rationales.jsonl"), lambda r: r["uid"])
    probes = AppendLog(os.path.join(out, "probes.jsonl"), lambda r: (r["uid"], r["rule"]))
    stud = AppendLog(os.path.join(out, "student.jsonl"), lambda r: (r["uid"], r["rule"]))
    bar = (lambda it, **kw: tqdm(it, **kw)) if progress else (lambda it, **kw: it)
    try:
        # 1. teacher rationales where the data set has none
        need = [e for e in examples if not e.rationale and uid(e) not in rats]
        for b in bar(list(_batches(need, cfg.batch_size)), desc="rationales", disable=not need):
            rats.extend({"uid": uid(e), "rationale": r} for e, r in zip(b, teacher.rationales(b)))

        def rationale(e):
            return e.rationale or rats.records[uid(e)]["rationale"]

        # 2. probes, their rationales and answers, consistency (Eq. 1)
        todo = [(e, r) for e in examples for r in chosen_rules(e, cfg) if (uid(e), r) not in probes]
        for b in bar(list(_batches(todo, cfg.batch_size)), desc="probes", disable=not todo):
            ps = teacher.probes([(e, rationale(e), r) for e, r in b])
            ok = [(e, p) for (e, _), p in zip(b, ps) if p is not None]
            cons = iter(teacher.consistent(ok))
            probes.extend({"uid": uid(e), "rule": r, "probe": None if p is None else dataclasses.asdict(p),
                           "consistent": False if p is None else bool(next(cons))} for (e, r), p in zip(b, ps))

        # 3. student answers on the kept probes (Eq. 2)
        if student is not None:
            todo = [k for k, rec in probes.records.items() if rec["consistent"] and k not in stud]
            for b in bar(list(_batches(todo, cfg.batch_size)), desc="student", disable=not todo):
                convs = [[{"role": "system", "content": SOLVE},
                          {"role": "user", "content": probes.records[k]["probe"]["question"]}]
                         for k in b]
                for k, text in zip(b, student.chat_many(convs)):
                    p = probes.records[k]["probe"]
                    stud.append({"uid": k[0], "rule": k[1], "response": text,
                                 "correct": is_correct(text, p["answer"], p["answer_type"])})
        return _assemble(cfg, examples, rationale, probes, stud, student is not None)
    finally:
        rats.close()
        probes.close()
        stud.close()


def _assemble(cfg, examples, rationale, probes, stud, filtered):
    report = {"examples": len(examples), "kept": 0, "dropped": {"no_consistent_probe": 0, "student_solves_all": 0,
                                                               "too_hard": 0},
              "per_rule": {r: {"generated": 0, "unreadable": 0, "consistent": 0, "student_correct": 0} for r in cfg.rules},
              "per_dataset": {}, "difficulty_filter": filtered, "tau_hard": cfg.tau_hard}
    dialogues = []
    for e in examples:
        ds = report["per_dataset"].setdefault(e.dataset, {"examples": 0, "kept": 0, "probes_kept": 0})
        ds["examples"] += 1
        kept = []
        for r in chosen_rules(e, cfg):
            rec = probes.records[(uid(e), r)]
            pr = report["per_rule"][r]
            pr["generated"] += 1
            if rec["probe"] is None:
                pr["unreadable"] += 1
                continue
            if not rec["consistent"]:
                continue
            pr["consistent"] += 1
            s = stud.records.get((uid(e), r))
            if s is not None and s["correct"]:
                pr["student_correct"] += 1
            kept.append((Probe(**rec["probe"]), None if s is None else s["correct"]))
        n_kept, n_right = len(kept), sum(bool(c) for _, c in kept)
        if n_kept == 0:
            report["dropped"]["no_consistent_probe"] += 1
            continue
        if filtered and n_right == n_kept:
            report["dropped"]["student_solves_all"] += 1
            continue
        if filtered and n_right < cfg.tau_hard:
            report["dropped"]["too_hard"] += 1
            continue
        report["kept"] += 1
        ds["kept"] += 1
        ds["probes_kept"] += n_kept
        msgs = []
        for p, _ in kept:
            msgs += [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.rationale}]
        msgs += [{"role": "user", "content": e.question}, {"role": "assistant", "content": rationale(e)}]
        dialogues.append({"uid": uid(e), "dataset": e.dataset, "question": e.question, "answer": e.answer,
                          "answer_type": e.answer_type, "rationale": rationale(e),
                          "probes": [dict(dataclasses.asdict(p), student_correct=c) for p, c in kept], "messages": msgs})
    write_jsonl_atomic(os.path.join(cfg.out_dir, "d_ei.jsonl"), dialogues)
    atomic_write_json(os.path.join(cfg.out_dir, "report.json"), report)
    return report


def build_teacher(cfg: EIConfig):
    if cfg.teacher == "symbolic":
        return SymbolicBatchTeacher(noise=cfg.teacher_noise)
    if cfg.teacher == "openai":
        return LLMTeacher(ChatClient(cfg.teacher_chat))
    if not cfg.teacher_model_path:
        raise ValueError("EIConfig.teacher='transformers' needs teacher_model_path")
    return LLMTeacher(build_local_chat(cfg.teacher_model_path))


def build_local_chat(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    return TransformersChat(model.eval(), tok)
