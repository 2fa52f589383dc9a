"""`exgrpo demo`: the method on the built-in arithmetic domain, every arm of the paper's ablation, paired seeds,
on the CPU in under 10 minutes.

Per seed: Explanatory Inversion with the symbolic teacher (with teacher noise, so the consistency filter has
something to catch, and the difficulty filter run against the untrained student), the SFT warm-up on the paper's
(probe -> rationale) pairs, then every arm from that same SFT checkpoint, on the same questions and rollout seeds:

    sft          the warm-up alone
    sft_more     SFT continued for as many steps as the RL arms take (the control for "more training")
    rl           GRPO on the probe dialogues, outcome reward only (no bonus, no auxiliary loss)
    rl_aux       + the auxiliary SFT loss on the probes' teacher rationales
    exgrpo       + the Dialogue Structure Utility bonus (the full method)
    exgrpo_probe_rewards  + every probe answer rewarded, each turn with its own advantage
    independent  the paper's "RL without r_dsu": every probe and the question as separate prompts, each its own
                 group, rewarded on its own answer
    (cold_rl, cold_rl_aux: RL from the untrained student, with cold_start=true)

Evaluation: held-in questions (forward, as trained), an out-of-distribution split in unseen sentence frames
(paraphrase), and the reversal split (the start masked: a floor check), greedy, the question asked directly; and
held-in accuracy with 0 / 1 / 2 probes answered by the student before the question. The table gives per-arm means,
paired differences against SFT with 95% intervals over seeds, and the bonus's firing rate against its
permutation baseline. Jobs run in `workers` processes (one thread each) and each writes its result atomically: a
killed demo, started again, redoes only the unfinished jobs.
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
from dataclasses import dataclass, field

from exgrpo.config import save_config
from exgrpo.generation import SamplingConfig
from exgrpo.io import atomic_write_json, atomic_write_text
from exgrpo.model import ModelConfig
from exgrpo.trainer import OptimConfig, SFTConfig, TrainConfig

ARMS = {  # name -> TrainConfig overrides (sft_more is continued SFT; cold_* start from the untrained student)
    "rl": dict(dsu=False, aux_weight=0.0),
    "rl_aux": dict(dsu=False),
    "exgrpo": dict(),
    "exgrpo_probe_rewards": dict(probe_rewards=True),
    "independent": dict(mode="independent"),
    "cold_rl": dict(dsu=False, aux_weight=0.0),
    "cold_rl_aux": dict(dsu=False),
}
SPLITS = ("arithmetic_forward", "arithmetic_paraphrase", "arithmetic_reversal")


@dataclass(frozen=True)
class DemoConfig:
    """The built-in default: arithmetic domain, symbolic teacher, a small student, all on the CPU."""

    out_dir: str = "runs/demo"  # results.json, results.md, curves.png, and one folder per seed
    seeds: int = 3  # paired seeds (every arm of a seed starts from the same SFT checkpoint)
    workers: int = 2  # parallel processes (one torch thread each)
    quick: bool = False  # a few steps of everything (CI)
    arms: tuple[str, ...] = ("sft_more", "rl", "rl_aux", "exgrpo", "exgrpo_probe_rewards", "independent")  # + sft
    cold_start: bool = False  # also cold_rl and cold_rl_aux (RL from the untrained student)
    n_train: int = 500  # EI questions per seed
    n_eval: int = 400  # held-in test questions (and as many paraphrased, out of distribution)
    n_reversal: int = 200  # reversal questions (the floor check)
    n_probe_eval: int = 150  # held-in questions answered after 0, 1 and 2 probes
    n_ops: int = 1  # operations per problem
    rules_per_example: int = 2
    teacher_noise: float = 0.1  # probes whose rationale ends in a wrong answer: the consistency filter's catch
    tau_hard: int = 0  # difficulty filter against the untrained student (which solves nothing: 0 keeps the rest)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(hidden_size=128, intermediate_size=384, num_layers=3,
                                                                   head_dim=32, tokenizer="arithmetic"))
    sft_epochs: int = 4
    sft_batch: int = 32
    sft_lr: float = 3e-3
    rl_steps: int = 25  # optimizer steps of each RL arm (and of sft_more)
    rl_lr: float = 3e-4  # constant (1e-3 degraded every RL arm in a one-seed trial)
    questions_per_step: int = 8
    G: int = 4
    k: int = 2
    k_partial: int = 0  # Scenario B asks the question directly: the evaluated condition is trained
    delta: float = 0.5
    nu: float = 1.0
    aux_weight: float = 0.1
    beta: float = 0.04
    temperature: float = 1.0  # sampling and loss temperature
    max_new_tokens: int = 24
    backend: str = "transformers"

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS and a != "sft_more"]
        if unknown:
            raise ValueError(f"DemoConfig.arms: unknown arm(s) {unknown}; known: sft_more, {', '.join(ARMS)}")
        for name in ("seeds", "workers", "n_train", "n_eval", "rl_steps", "sft_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")

    def resolved(self) -> DemoConfig:
        if not self.quick:
            return self
        return dataclasses.replace(self, seeds=1, n_train=24, n_eval=12, n_reversal=6, n_probe_eval=4, sft_epochs=1,
                                   rl_steps=2, questions_per_step=2, G=2, max_new_tokens=16)

    def all_arms(self) -> list[str]:
        return list(self.arms) + (["cold_rl", "cold_rl_aux"] if self.cold_start else [])


# ------------------------------------------------------------------------------------------------ jobs


def _seed_dir(cfg: DemoConfig, seed: int) -> str:
    return os.path.join(cfg.out_dir, f"seed{seed}")


def _tests(cfg: DemoConfig, seed: int):
    from exgrpo.tasks.arithmetic import make_split
    s = 1000 + seed
    return (make_split(cfg.n_eval, s, "test", n_ops=cfg.n_ops) + make_split(cfg.n_eval, s, "paraphrase", n_ops=cfg.n_ops)
            + make_split(cfg.n_reversal, s, "reversal", n_ops=cfg.n_ops))


def _evaluate(cfg: DemoConfig, path_or_model: str, seed: int) -> dict:
    """Accuracy per split, and held-in accuracy after 0 / 1 / 2 student-answered probes."""
    from exgrpo.dialogue import DialogueTokenizer
    from exgrpo.generation import TransformersBackend, last_assistant_text, multi_turn_rollouts
    from exgrpo.model import build_student
    from exgrpo.tasks.arithmetic import SymbolicTeacher, make_split
    from exgrpo.data.answers import is_correct
    from exgrpo.trainer import evaluate
    model, tok = build_student(ModelConfig(path=path_or_model))
    res = {k: v["accuracy"] for k, v in evaluate(model, tok, _tests(cfg, seed), batch_size=128,
                                                  max_new_tokens=cfg.max_new_tokens).items()}
    dtok = DialogueTokenizer(tok)
    backend = TransformersBackend(model, tok, dtok.eot, batch_size=128)
    teacher = SymbolicTeacher()
    held = make_split(cfg.n_probe_eval, 2000 + seed, "test", n_ops=cfg.n_ops)
    sc = SamplingConfig(max_new_tokens=cfg.max_new_tokens)
    from exgrpo.rules import RULE_NAMES
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
    from exgrpo.ei.pipeline import EIConfig, run_ei
    from exgrpo.trainer import sft
    root = _seed_dir(cfg, seed)
    t0 = time.time()
    ei = EIConfig(limit=cfg.n_train, rules_per_example=cfg.rules_per_example, out_dir=os.path.join(root, "ei"),
                  seed=seed, arith_ops=cfg.n_ops, teacher_noise=cfg.teacher_noise, tau_hard=cfg.tau_hard)
    from exgrpo.ei.teacher import TransformersChat
    from exgrpo.model import build_student
    base, base_tok = build_student(cfg.model, seed=seed)  # the difficulty filter's student: the untrained one
    report = run_ei(ei, student=TransformersChat(base, base_tok, max_new_tokens=cfg.max_new_tokens, batch_size=128),
                    progress=False)
    sft_cfg = SFTConfig(data=os.path.join(root, "ei", "d_ei.jsonl"), model=cfg.model, out_dir=os.path.join(root, "sft"),
                        epochs=cfg.sft_epochs, batch_dialogues=cfg.sft_batch, seed=seed, progress=False,
                        optim=OptimConfig(lr=cfg.sft_lr, warmup_steps=5, min_lr_ratio=0.3))
    final = sft(sft_cfg)["final"]
    return {"sft_final": final, "ei_report": {k: report[k] for k in ("examples", "kept", "dropped")},
            "ei_probes": {"generated": sum(v["generated"] for v in report["per_rule"].values()),
                          "consistent": sum(v["consistent"] for v in report["per_rule"].values())},
            "sft": _evaluate(cfg, final, seed), "seconds": time.time() - t0}


def arm_job(cfg: DemoConfig, seed: int, arm: str, sft_final: str) -> dict:
    from exgrpo.trainer import sft, train
    root = _seed_dir(cfg, seed)
    data = os.path.join(root, "ei", "d_ei.jsonl")
    t0 = time.time()
    if arm == "sft_more":  # as many optimizer steps as an RL arm, at the rate the warm-up ended with
        c = SFTConfig(data=data, model=dataclasses.replace(cfg.model, path=sft_final), out_dir=os.path.join(root, arm),
                      max_steps=cfg.rl_steps, batch_dialogues=cfg.sft_batch, seed=seed + 100, progress=False,
                      optim=OptimConfig(lr=cfg.sft_lr * 0.3, warmup_steps=0, min_lr_ratio=1.0))
        final, curve = sft(c)["final"], []
    else:
        loss = TrainConfig().loss.replace(beta=0.0 if arm.startswith("cold") else cfg.beta,
                                          temperature=cfg.temperature)
        kw = dict(data=data, init=None if arm.startswith("cold") else sft_final, model=cfg.model,
                  out_dir=os.path.join(root, arm), steps=cfg.rl_steps, questions_per_step=cfg.questions_per_step,
                  G=cfg.G, k=cfg.k, k_partial=cfg.k_partial, delta=cfg.delta, nu=cfg.nu, aux_weight=cfg.aux_weight,
                  seed=seed, optim=OptimConfig(lr=cfg.rl_lr, warmup_steps=0, min_lr_ratio=1.0), loss=loss,
                  sampling=SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens),
                  backend=cfg.backend, progress=False, log_samples=1)
        tc = TrainConfig(**{**kw, **ARMS[arm]})
        final = train(tc)["final"]
        curve = [json.loads(x) for x in open(os.path.join(tc.out_dir, "metrics.jsonl"))]
    keep = ("step", "reward_question", "reward_probes", "bonus_rate", "bonus_rate_perm", "p_full", "p_partial", "kl")
    return {"eval": _evaluate(cfg, final, seed), "curve": [{k: r[k] for k in keep if k in r} for r in curve],
            "seconds": time.time() - t0}


def _run_job(args):
    import torch
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
            if arm != "sft":
                d = [v - _acc(results[s], "sft").get(m, 0.0) for v, s in zip(vals, seeds)]
                dm, dci = mean_ci(d)
                row[m]["diff_vs_sft"] = {"mean": dm, "ci": dci}
        if arm in ARMS:
            curves = [results[s][arm]["curve"] for s in seeds]
            for key in ("bonus_rate", "bonus_rate_perm"):
                vals = [statistics.mean(r[key] for r in c) for c in curves if c and key in c[0]]
                if vals:
                    row[key] = {"mean": statistics.mean(vals), "values": vals}
        out["arms"][arm] = row
    return out


def _fmt(x: dict, diff: bool = False) -> str:
    m, ci = (x["diff_vs_sft"]["mean"], x["diff_vs_sft"]["ci"]) if diff else (x["mean"], x["ci"])
    s = f"{m:+.3f}" if diff else f"{m:.3f}"
    return s + (f" ± {ci:.3f}" if ci is not None else "")


def render(doc: dict) -> str:
    summ, cfg = doc["summary"], doc["config"]
    arms = list(summ["arms"])
    lines = [f"{summ['seeds']} paired seed(s); {cfg['n_eval']} held-in, {cfg['n_eval']} paraphrased (OOD) and "
             f"{cfg['n_reversal']} reversal questions per seed; greedy, the question asked directly; ± is the 95% "
             f"interval over seeds. Total {doc['seconds']:.0f} s.", "",
             "| arm | held-in | paraphrase (OOD) | reversal | held-in - SFT | paraphrase - SFT |", "|---|---|---|---|---|---|"]
    for arm in arms:
        r = summ["arms"][arm]
        d = ("", "") if arm == "sft" else (_fmt(r[SPLITS[0]], True), _fmt(r[SPLITS[1]], True))
        lines.append(f"| {arm} | {_fmt(r[SPLITS[0]])} | {_fmt(r[SPLITS[1]])} | {_fmt(r[SPLITS[2]])} | {d[0]} | {d[1]} |")
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


def _plot(results, arms, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, arm in enumerate(a for a in arms if a in ARMS):
        for s in sorted(results):
            c = results[s][arm]["curve"]
            if not c:
                continue
            st = [r["step"] for r in c]
            ax[0].plot(st, [r.get("reward_question", 0) for r in c], color=colors[i % len(colors)], alpha=0.7,
                       label=arm if s == sorted(results)[0] else None)
            if "bonus_rate" in c[0]:
                ax[1].plot(st, [r["bonus_rate"] - r["bonus_rate_perm"] for r in c], color=colors[i % len(colors)],
                           alpha=0.7, label=arm if s == sorted(results)[0] else None)
    ax[0].set_title("training reward (the question's answer)")
    ax[1].set_title("bonus firing rate minus its permutation baseline")
    for a in ax:
        a.set_xlabel("step")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
