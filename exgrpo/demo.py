"""`exgrpo demo`: the method on the built-in arithmetic domain, paired seeds, on the CPU in under 10 minutes.

Per seed: Explanatory Inversion with the symbolic teacher (with teacher noise, so the consistency filter has
something to catch, and the difficulty filter run against the untrained student), the SFT warm-up on the paper's
(probe -> rationale) pairs run to its plateau, then every arm from that same SFT checkpoint:

    sft          the warm-up alone
    sft_more     SFT continued for as many steps as the RL arms take (the control for "more training")
    rl           GRPO on the question asked directly ("SFT + RL"), on the RL pool: D_EI's questions and more that
                 have only a gold answer
    exgrpo       the probe dialogues (Scenario A: a probe, then the question; B: the question) with the DSU bonus
                 and the auxiliary SFT loss: the full method
    full=true also: rl_ei (rl on D_EI's questions only), rl_dialogue (the dialogues, outcome reward only), rl_aux
    (+ the auxiliary loss), exgrpo_probe_rewards (every probe answer rewarded, per-turn advantages), independent
    (the paper's "RL without r_dsu": every probe and the question separate prompts); cold_start=true: RL from the
    untrained student

Evaluation: held-in questions, an out-of-distribution split in unseen sentence frames (paraphrase), and the reversal
split (the start masked: a floor check), greedy, the question asked directly; and held-in accuracy with 0 / 1 / 2
probes answered by the student before the question. The table gives per-arm means, paired differences against SFT
and continued SFT with 95% intervals over seeds, the training reward of the evaluated condition, and the bonus's
firing rate against its permutation baseline. Jobs run in `workers` processes (one thread each) and each writes its
result atomically: a killed demo, started again, redoes only the unfinished jobs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import time

import torch

from exgrpo.config import ARMS, DemoConfig, EIConfig, ModelConfig, OptimConfig, SamplingConfig, save_config
from exgrpo.data.answers import is_correct
from exgrpo.dialogue import DialogueTokenizer
from exgrpo.ei.pipeline import run_ei
from exgrpo.ei.teacher import TransformersChat
from exgrpo.evaluate import evaluate
from exgrpo.generation import TransformersBackend, last_assistant_text, multi_turn_rollouts
from exgrpo.grpo import train
from exgrpo.io import atomic_write_json, atomic_write_text
from exgrpo.model import build_student
from exgrpo.rules import RULE_NAMES
from exgrpo.sft import sft
from exgrpo.tasks.arithmetic import SymbolicTeacher, make_split

SPLITS = ("arithmetic_forward", "arithmetic_paraphrase", "arithmetic_reversal")
CURVE_KEYS = ("step", "reward_question", "reward_direct", "reward_after_probes", "reward_probes", "bonus_rate",
              "bonus_rate_perm", "p_full", "p_partial", "kl", "eval_accuracy", "eval/arithmetic_forward",
              "eval/arithmetic_paraphrase", "time_step_s")


# ------------------------------------------------------------------------------------------------ jobs


def _seed_dir(cfg: DemoConfig, seed: int) -> str:
    return os.path.join(cfg.out_dir, f"seed{seed}")


def _tests(cfg: DemoConfig, seed: int):
    s = 1000 + seed
    return (make_split(cfg.n_eval, s, "test", n_ops=cfg.n_ops) + make_split(cfg.n_eval, s, "paraphrase", n_ops=cfg.n_ops)
            + make_split(cfg.n_reversal, s, "reversal", n_ops=cfg.n_ops))


def _evaluate(cfg: DemoConfig, path: str, seed: int) -> dict:
    """Accuracy per split, and held-in accuracy after 0 / 1 / 2 student-answered probes."""
    model, tok = build_student(ModelConfig(path=path))
    max_new = cfg.rl.sampling.max_new_tokens
    res = {k: v["accuracy"] for k, v in evaluate(model, tok, _tests(cfg, seed), batch_size=128,
                                                  max_new_tokens=max_new).items()}
    dtok = DialogueTokenizer(tok)
    backend = TransformersBackend(model, tok, dtok.eot, batch_size=128)
    teacher = SymbolicTeacher()
    held = make_split(cfg.n_probe_eval, 2000 + seed, "test", n_ops=cfg.n_ops)
    sc = SamplingConfig(max_new_tokens=max_new)
    for n in (0, 1, 2):
        turns = []
        for e in held:
            rules = random.Random(f"probe-eval-{e.id}").sample(RULE_NAMES, n)
            turns.append([teacher.probe(e, r).question for r in rules] + [e.question])
        ds = multi_turn_rollouts(backend, dtok, turns, sc, greedy=True)
        res[f"probes_{n}"] = sum(is_correct(last_assistant_text(dtok, d), e.answer, e.answer_type)
                                 for d, e in zip(ds, held)) / len(held)
    return res


def seed_job(cfg: DemoConfig, seed: int) -> dict:
    """EI data with both filters, the SFT warm-up, and the SFT model's evaluation."""
    root = _seed_dir(cfg, seed)
    t0 = time.time()
    ei = EIConfig(limit=cfg.n_train, rules_per_example=cfg.rules_per_example, out_dir=os.path.join(root, "ei"),
                  seed=seed, arith_ops=cfg.n_ops, teacher_noise=cfg.teacher_noise, tau_hard=cfg.tau_hard)
    base, base_tok = build_student(cfg.model, seed=seed)  # the difficulty filter's student: the untrained one
    report = run_ei(ei, student=TransformersChat(base, base_tok, max_new_tokens=cfg.rl.sampling.max_new_tokens,
                                                 batch_size=128), progress=False)
    sft_cfg = dataclasses.replace(cfg.sft, data=os.path.join(root, "ei", "d_ei.jsonl"), model=cfg.model,
                                  out_dir=os.path.join(root, "sft"), seed=seed, progress=False)
    final = sft(sft_cfg)["final"]
    write_rl_pool(cfg, seed)
    return {"sft_final": final, "ei_report": {k: report[k] for k in ("examples", "kept", "dropped")},
            "ei_probes": {"generated": sum(v["generated"] for v in report["per_rule"].values()),
                          "consistent": sum(v["consistent"] for v in report["per_rule"].values())},
            "sft": _evaluate(cfg, final, seed), "seconds": time.time() - t0}


def write_rl_pool(cfg: DemoConfig, seed: int) -> str:
    """The RL arms' questions: D_EI's (with their probes) and ``n_rl_extra`` more training questions that have only a
    gold answer (no teacher rationale, no probe: RL needs nothing else). Dialogue and independent modes use the
    questions with probes; direct mode all of them."""
    root = _seed_dir(cfg, seed)
    recs = [json.loads(x) for x in open(os.path.join(root, "ei", "d_ei.jsonl")) if x.strip()]
    seen = {r["question"] for r in recs}
    extra = [e for e in make_split(cfg.n_rl_extra, 5000 + seed, "train", n_ops=cfg.n_ops) if e.question not in seen]
    recs += [{"id": e.id, "question": e.question, "answer": e.answer, "answer_type": e.answer_type, "probes": []}
             for e in extra]
    path = os.path.join(root, "rl_pool.jsonl")
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in recs))
    return path


def arm_config(cfg: DemoConfig, seed: int, arm: str, sft_final: str):
    """The SFTConfig (sft_more) or TrainConfig of one arm of one seed. Continued SFT trains on D_EI (the only
    questions with teacher rationales); the RL arms on the RL pool (``rl_ei``: D_EI's questions only)."""
    root = _seed_dir(cfg, seed)
    data = os.path.join(root, "ei", "d_ei.jsonl")
    if arm == "sft_more":  # as many optimizer steps as an RL arm, at a constant rate
        return dataclasses.replace(cfg.sft, data=data, model=dataclasses.replace(cfg.model, path=sft_final),
                                   out_dir=os.path.join(root, arm), max_steps=cfg.rl.steps, seed=seed + 100,
                                   progress=False, optim=OptimConfig(lr=cfg.sft_more_lr, warmup_steps=0,
                                                                     min_lr_ratio=1.0))
    cold = arm.startswith("cold")
    rl = cfg.rl if not cold else dataclasses.replace(cfg.rl, loss=cfg.rl.loss.replace(beta=0.0))
    pool = data if arm == "rl_ei" else os.path.join(root, "rl_pool.jsonl")
    over = {k: v for k, v in ARMS[arm].items() if not (cfg.quick and k in ("steps", "questions_per_step"))}
    return dataclasses.replace(rl, data=pool, init=None if cold else sft_final, model=cfg.model,
                               out_dir=os.path.join(root, arm), seed=seed, backend=cfg.backend, progress=False, **over)


def arm_job(cfg: DemoConfig, seed: int, arm: str, sft_final: str) -> dict:
    t0 = time.time()
    c = arm_config(cfg, seed, arm, sft_final)
    final = (sft if arm == "sft_more" else train)(c)["final"]
    curve = [json.loads(x) for x in open(os.path.join(c.out_dir, "metrics.jsonl"))] if arm != "sft_more" else []
    return {"eval": _evaluate(cfg, final, seed), "curve": [{k: r[k] for k in CURVE_KEYS if k in r} for r in curve],
            "seconds": time.time() - t0}


def _run_job(args):
    torch.set_num_threads(1)
    kind, cfg, seed, arm, extra = args
    path = os.path.join(_seed_dir(cfg, seed), f"result_{arm}.json")
    if os.path.exists(path):  # finished before a kill: not redone
        return kind, seed, arm, json.load(open(path))
    out = seed_job(cfg, seed) if kind == "seed" else arm_job(cfg, seed, arm, extra)
    atomic_write_json(path, out)
    return kind, seed, arm, out


# ------------------------------------------------------------------------------------------------ orchestration


def run_demo(cfg: DemoConfig) -> dict:
    cfg = cfg.resolved()
    os.makedirs(cfg.out_dir, exist_ok=True)
    save_config(cfg, cfg.out_dir)
    t_all = time.time()
    results: dict = {}
    arms = cfg.all_arms()
    ctx = mp.get_context("spawn")
    with ctx.Pool(cfg.workers) as pool:
        pending = [pool.apply_async(_run_job, (("seed", cfg, s, "sft", None),)) for s in range(cfg.seeds)]
        while pending:
            done = [p for p in pending if p.ready()]
            for p in done:
                pending.remove(p)
                kind, seed, arm, out = p.get()
                results.setdefault(seed, {})[arm] = out
                print(f"seed {seed} {arm}: {out['seconds']:.0f} s", flush=True)
                if kind == "seed":
                    pending += [pool.apply_async(_run_job, (("arm", cfg, seed, a, out["sft_final"]),)) for a in arms]
            time.sleep(0.2)
    results = {s: results[s] for s in sorted(results)}
    doc = {"config": dataclasses.asdict(cfg), "seconds": time.time() - t_all, "results": results,
           "summary": summarise(results, arms)}
    atomic_write_json(os.path.join(cfg.out_dir, "results.json"), doc)
    table = render(doc)
    atomic_write_text(os.path.join(cfg.out_dir, "results.md"), table + "\n")
    _plot(results, arms, os.path.join(cfg.out_dir, "curves.png"))
    print(table)
    print(f"total {doc['seconds']:.0f} s; wrote {cfg.out_dir}/results.json, results.md, curves.png")
    return doc


# ------------------------------------------------------------------------------------------------ statistics


T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def mean_ci(xs: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% interval (t with n-1 degrees of freedom; None for one value)."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, None
    return m, T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))


def _acc(res_seed: dict, arm: str) -> dict:
    r = res_seed[arm]
    return r["sft"] if arm == "sft" else r["eval"]


def summarise(results: dict, arms: list[str]) -> dict:
    seeds = sorted(results)
    out = {"seeds": len(seeds), "arms": {}}
    metrics = list(SPLITS) + ["probes_0", "probes_1", "probes_2"]
    for arm in ["sft"] + arms:
        row = {}
        for m in metrics:
            vals = [_acc(results[s], arm).get(m, 0.0) for s in seeds]
            mean, ci = mean_ci(vals)
            row[m] = {"mean": mean, "ci": ci, "values": vals}
            for base in ("sft", "sft_more"):  # paired differences: same seed, same test questions
                if arm in ("sft", base) or any(base not in results[s] for s in seeds):
                    continue
                d = [v - _acc(results[s], base).get(m, 0.0) for v, s in zip(vals, seeds)]
                dm, dci = mean_ci(d)
                row[m][f"diff_vs_{base}"] = {"mean": dm, "ci": dci, "values": d}
        if arm in ARMS:
            curves = [results[s][arm]["curve"] for s in seeds]
            for key in ("bonus_rate", "bonus_rate_perm", "reward_direct", "reward_after_probes"):
                vals = [statistics.mean(r[key] for r in c) for c in curves if c and key in c[0]]
                if vals:
                    row[key] = {"mean": statistics.mean(vals), "values": vals}
            for key in ("reward_direct",):  # the evaluated condition's training reward: first vs last 10 steps
                ends = [(statistics.mean(r[key] for r in c[:10]), statistics.mean(r[key] for r in c[-10:]))
                        for c in curves if c and key in c[0]]
                if ends:
                    row[f"{key}_first10"], row[f"{key}_last10"] = mean_ci([a for a, _ in ends]), mean_ci([b for _, b in ends])
        out["arms"][arm] = row
    return out


def _fmt(x: dict, diff: str | None = None) -> str:
    """mean ± 95% interval of x, or of its paired difference against ``diff`` ("sft" / "sft_more"); "" if absent."""
    if diff is not None and f"diff_vs_{diff}" not in x:
        return ""
    m, ci = (x[f"diff_vs_{diff}"]["mean"], x[f"diff_vs_{diff}"]["ci"]) if diff else (x["mean"], x["ci"])
    s = f"{m:+.3f}" if diff else f"{m:.3f}"
    return s + (f" ± {ci:.3f}" if ci is not None else "")


def render(doc: dict) -> str:
    summ, cfg = doc["summary"], doc["config"]
    arms = list(summ["arms"])
    lines = [f"{summ['seeds']} paired seed(s); {cfg['n_eval']} held-in, {cfg['n_eval']} paraphrased (OOD) and "
             f"{cfg['n_reversal']} reversal questions per seed; greedy, the question asked directly; ± is the 95% "
             f"interval over seeds. Total {doc['seconds']:.0f} s.", "",
             "| arm | held-in | paraphrase (OOD) | reversal | held-in - SFT | held-in - continued SFT | "
             "paraphrase - SFT |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        r = summ["arms"][arm]
        lines.append(f"| {arm} | {_fmt(r[SPLITS[0]])} | {_fmt(r[SPLITS[1]])} | {_fmt(r[SPLITS[2]])} | "
                     f"{_fmt(r[SPLITS[0]], 'sft')} | {_fmt(r[SPLITS[0]], 'sft_more')} | {_fmt(r[SPLITS[1]], 'sft')} |")
    rw = [(a, summ["arms"][a]) for a in arms if "reward_direct_first10" in summ["arms"][a]]
    if rw:
        lines += ["", "Training reward of the question asked directly (the evaluated condition), mean of the first and "
                  "last 10 RL steps:", "", "| arm | first 10 steps | last 10 steps |", "|---|---|---|"]
        for a, r in rw:
            f, last = r["reward_direct_first10"], r["reward_direct_last10"]
            fmt = lambda v: f"{v[0]:.3f}" + (f" ± {v[1]:.3f}" if v[1] is not None else "")  # noqa: E731
            lines.append(f"| {a} | {fmt(f)} | {fmt(last)} |")
    lines += ["", "Held-in accuracy after 0 / 1 / 2 probes answered by the student in the same dialogue:", "",
              "| arm | 0 probes | 1 probe | 2 probes |", "|---|---|---|---|"]
    for arm in arms:
        r = summ["arms"][arm]
        lines.append(f"| {arm} | {_fmt(r['probes_0'])} | {_fmt(r['probes_1'])} | {_fmt(r['probes_2'])} |")
    ei = [(s, r["sft"]) for s, r in doc["results"].items()]
    lines += ["", "Explanatory Inversion per seed (the filters, run): probes generated / kept by the consistency filter; "
              "questions kept / dropped for no consistent probe, the untrained student solving every probe, fewer "
              "than tau_hard solved:", ""]
    for s, r in ei:
        d = r["ei_report"]["dropped"]
        lines.append(f"- seed {s}: probes {r['ei_probes']['generated']} / {r['ei_probes']['consistent']}; questions "
                     f"{r['ei_report']['kept']} of {r['ei_report']['examples']} (dropped {d['no_consistent_probe']} / "
                     f"{d['student_solves_all']} / {d['too_hard']})")
    bon = [(a, summ["arms"][a]) for a in arms if "bonus_rate" in summ["arms"][a]]
    if bon:
        lines += ["", "DSU bonus firing rate (P_full > nu P_partial) per question and step, against its permutation "
                  "baseline (scenario labels shuffled within the question):", "",
                  "| arm | fires | by chance |", "|---|---|---|"]
        for a, r in bon:
            perm = r.get("bonus_rate_perm", {}).get("mean", float("nan"))
            lines.append(f"| {a} | {r['bonus_rate']['mean']:.3f} | {perm:.3f} |")
    return "\n".join(lines)


def _curve_mean(results, arm: str, key: str, window: int = 10):
    """(steps, mean over seeds of the key's moving average over ``window`` steps) or None."""
    rows = [results[s][arm]["curve"] for s in sorted(results) if results[s][arm]["curve"]]
    if not rows or any(key not in c[0] for c in rows):
        return None
    n = min(len(c) for c in rows)
    vals = [statistics.mean(c[i][key] for c in rows) for i in range(n)]
    smooth = [statistics.mean(vals[max(0, i - window + 1):i + 1]) for i in range(n)]
    return [rows[0][i]["step"] for i in range(n)], smooth


def _plot(results, arms, path):
    """Three panels, each arm's mean over seeds (10-step moving average): the reward of the evaluated condition
    (the question asked directly), the reward of the question after probes, and the DSU gate's firing rate minus its
    permutation baseline."""
    import matplotlib  # plotting only here: matplotlib is a bench/dev dependency
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = (("reward_direct", "reward of the question asked directly (evaluated condition)"),
              ("reward_after_probes", "reward of the question after the probes (Scenario A)"),
              (None, "DSU gate firing rate minus its permutation baseline"))
    for i, arm in enumerate(a for a in arms if a in ARMS):
        for j, (key, _) in enumerate(panels):
            if key is None:
                a, b = _curve_mean(results, arm, "bonus_rate"), _curve_mean(results, arm, "bonus_rate_perm")
                c = None if a is None else (a[0], [x - y for x, y in zip(a[1], b[1])])
            else:
                c = _curve_mean(results, arm, key)
            if c is not None:
                ax[j].plot(c[0], c[1], color=colors[i % len(colors)], label=arm)
    for a, (_, title) in zip(ax, panels):
        a.set_title(title, fontsize=9)
        a.set_xlabel("RL step")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    ax[2].axhline(0.0, color="gray", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
