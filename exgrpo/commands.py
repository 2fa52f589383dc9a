"""The commands behind the CLI: sft, train, eval, and demo (the README's main command)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field


from exgrpo.config import save_config
from exgrpo.generation import SamplingConfig
from exgrpo.io import atomic_write_json
from exgrpo.model import ModelConfig
from exgrpo.trainer import OptimConfig, SFTConfig, TrainConfig, evaluate, sft as run_sft, train as run_train


class UserError(ValueError):
    """Something the user passed is wrong: printed as one line naming the field and the value (exit 2)."""


def check_file(field_name: str, path: str | None, what: str = "file", hint: str = "") -> None:
    if path is None:
        return
    if not os.path.exists(path):
        raise UserError(f"{field_name}: no such {what} {path!r}" + (f" ({hint})" if hint else ""))
    if what == "file" and os.path.isdir(path):
        raise UserError(f"{field_name}: {path!r} is a folder, expected a file")


def check_model_dir(field_name: str, path: str | None, hint: str = "") -> None:
    """A Hugging Face model folder: exists, and has a config.json."""
    if path is None:
        return
    check_file(field_name, path, "folder", hint)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{field_name}: {path!r} is not a model folder (no config.json)" + (f"; {hint}" if hint else ""))


def check_data_names(field_name: str, names) -> None:
    from exgrpo.data.loaders import SPECS
    for n in names:
        if n != "arithmetic" and n not in SPECS:
            raise UserError(f"{field_name}: unknown data set {n!r}; known: arithmetic, {', '.join(sorted(SPECS))}")


def sft(cfg: SFTConfig, resume=False):
    check_file("data", cfg.data, hint="run `exgrpo ei` first")
    check_model_dir("model.path", cfg.model.path)
    print(json.dumps(run_sft(cfg, resume=resume)))


def train(cfg: TrainConfig, resume=False):
    check_file("data", cfg.data, hint="run `exgrpo ei` first")
    check_model_dir("init", cfg.init, hint="run `exgrpo sft` first, or init=null to start from the model config")
    check_model_dir("model.path", cfg.model.path)
    print(json.dumps(run_train(cfg, resume=resume)))


def ei(cfg, resume=False):
    from exgrpo.ei.pipeline import run_ei
    check_data_names("data", cfg.data)
    check_model_dir("student_model_path", cfg.student_model_path)
    check_model_dir("teacher_model_path", cfg.teacher_model_path)
    check_file("data_root", cfg.data_root, "folder")
    print(json.dumps(run_ei(cfg), indent=1))


@dataclass(frozen=True)
class EvalConfig:
    model: str = "runs/exgrpo/final"  # the model folder to evaluate
    data: tuple[str, ...] = ("arithmetic",)  # data set names, or arithmetic (held-in and reversal splits)
    data_root: str | None = None  # folder of <name>/ folders (default ../shared/data)
    split: str = "test"
    limit: int | None = 200  # examples per data set
    arith_ops: int = 2  # operations per arithmetic problem (the demo trains on 1)
    seed: int = 0
    out: str | None = None  # JSON file for the results (default <model>/eval.json)
    max_new_tokens: int = 96
    backend: str = "auto"  # generation: auto (vllm where installed) | transformers | vllm

    def __post_init__(self):
        check_data_names("EvalConfig.data", self.data)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"EvalConfig.limit must be >= 1 or null, got {self.limit}")
        if self.backend not in ("auto", "transformers", "vllm"):
            raise ValueError(f"EvalConfig.backend must be auto, transformers or vllm, got {self.backend!r}")


def eval(cfg: EvalConfig, resume=False):  # noqa: A001 - the CLI command's name
    check_model_dir("model", cfg.model, hint="a folder written by exgrpo sft/train (final/) or a Hugging Face model")
    check_data_names("data", cfg.data)
    check_file("data_root", cfg.data_root, "folder")
    from exgrpo.data.loaders import load_dataset
    from exgrpo.tasks.arithmetic import make_split
    examples = []
    for name in cfg.data:
        if name == "arithmetic":
            examples += (make_split(cfg.limit or 200, cfg.seed, "test", n_ops=cfg.arith_ops) +
                         make_split(cfg.limit or 200, cfg.seed, "reversal", n_ops=cfg.arith_ops))
        else:
            examples += load_dataset(name, split=cfg.split, limit=cfg.limit, data_root=cfg.data_root)
    model, tok = _load(cfg.model)
    res = evaluate(model, tok, examples, max_new_tokens=cfg.max_new_tokens, backend=eval_backend(cfg.backend, model, tok))
    print(f"{'data set':28s} {'accuracy':>9s} {'n':>6s}")
    for k, v in res.items():
        print(f"{k:28s} {v['accuracy']:9.3f} {v['n']:6d}")
    atomic_write_json(cfg.out or os.path.join(cfg.model, "eval.json"), res)


def eval_backend(name: str, model, tok):
    """The generation backend for evaluation: vLLM (batched over every data set) where installed and asked for,
    else the trainer's transformers generation."""
    import importlib.util
    if name == "auto":
        name = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    if name == "transformers":
        return None
    from exgrpo.dialogue import DialogueTokenizer
    from exgrpo.vllm_backend import VLLMBackend
    return VLLMBackend.from_model(model, tok, DialogueTokenizer(tok).eot)


def _load(path):
    from exgrpo.model import build_student
    return build_student(ModelConfig(path=path))


# ================================================================================================ demo


@dataclass(frozen=True)
class DemoConfig:
    """The built-in default: arithmetic domain, symbolic teacher, tiny byte-level student, all on the CPU."""

    out_dir: str = "runs/demo"
    seeds: int = 1
    quick: bool = False  # a few steps of everything (CI)
    n_train: int = 1000  # EI questions
    n_eval: int = 100  # held-in test and reversal questions each
    n_ops: int = 1  # operations per arithmetic problem
    rules_per_example: int = 2
    model: ModelConfig = field(default_factory=lambda: ModelConfig(hidden_size=128, intermediate_size=384, num_layers=4,
                                                                   head_dim=32))
    sft_epochs: int = 12
    sft_batch: int = 8
    sft_lr: float = 3e-3
    rl_steps: int = 40
    rl_lr: float = 3e-4
    questions_per_step: int = 4
    G: int = 6
    k: int = 2
    k_partial: int = 1
    delta: float = 0.5
    nu: float = 1.0
    aux_weight: float = 0.1
    beta: float = 0.04
    max_new_tokens: int = 64
    backend: str = "transformers"


def demo(cfg: DemoConfig):
    from exgrpo.ei.pipeline import EIConfig, run_ei
    from exgrpo.model import build_student
    from exgrpo.tasks.arithmetic import make_split
    if cfg.quick:
        cfg = dataclasses.replace(cfg, n_train=24, n_eval=12, sft_epochs=1, rl_steps=2, questions_per_step=2, G=2,
                                  max_new_tokens=24)
    save_config(cfg, cfg.out_dir)
    results = {}
    curves = {}
    t_all = time.time()
    for seed in range(cfg.seeds):
        t_seed = time.time()
        root = os.path.join(cfg.out_dir, f"seed{seed}")
        ei = EIConfig(limit=cfg.n_train, rules_per_example=cfg.rules_per_example, out_dir=os.path.join(root, "ei"),
                      seed=seed, arith_ops=cfg.n_ops)
        report = run_ei(ei, progress=False)
        data = os.path.join(root, "ei", "d_ei.jsonl")
        tests = (make_split(cfg.n_eval, 1000 + seed, "test", n_ops=cfg.n_ops) +
                 make_split(cfg.n_eval, 1000 + seed, "reversal", n_ops=cfg.n_ops))
        res = results.setdefault(seed, {})
        model, tok = build_student(cfg.model, seed=seed)
        res["untrained"] = evaluate(model, tok, tests, max_new_tokens=cfg.max_new_tokens)
        sft_cfg = SFTConfig(data=data, model=cfg.model, out_dir=os.path.join(root, "sft"), epochs=cfg.sft_epochs,
                            optim=OptimConfig(lr=cfg.sft_lr, warmup_steps=5, min_lr_ratio=0.3), seed=seed,
                            batch_dialogues=cfg.sft_batch, progress=True)
        sft_final = run_sft(sft_cfg)["final"]
        res["sft"] = evaluate(*_load(sft_final), tests, max_new_tokens=cfg.max_new_tokens)
        for name, dsu in (("exgrpo_no_bonus", False), ("exgrpo", True)):
            tc = TrainConfig(data=data, init=sft_final, model=cfg.model, out_dir=os.path.join(root, name), steps=cfg.rl_steps,
                             questions_per_step=cfg.questions_per_step, G=cfg.G, k=cfg.k, k_partial=cfg.k_partial,
                             delta=cfg.delta, nu=cfg.nu, dsu=dsu, aux_weight=cfg.aux_weight, seed=seed,
                             optim=OptimConfig(lr=cfg.rl_lr, warmup_steps=0),
                             loss=TrainConfig().loss.replace(beta=cfg.beta),
                             sampling=SamplingConfig(temperature=1.0, max_new_tokens=cfg.max_new_tokens), backend=cfg.backend)
            final = run_train(tc)["final"]
            res[name] = evaluate(*_load(final), tests, max_new_tokens=cfg.max_new_tokens)
            curves.setdefault(name, []).append([json.loads(x) for x in open(os.path.join(tc.out_dir, "metrics.jsonl"))])
        res["ei_report"] = {"kept": report["kept"], "examples": report["examples"]}
        res["seconds"] = time.time() - t_seed
        atomic_write_json(os.path.join(cfg.out_dir, "results.json"), results)
        print(f"seed {seed}: {res['seconds']:.0f} s", flush=True)
    table = _table(results)
    print(table)
    with open(os.path.join(cfg.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    _plot(curves, os.path.join(cfg.out_dir, "curves.png"))
    print(f"total {time.time() - t_all:.0f} s; wrote {cfg.out_dir}/results.json, results.md, curves.png")


VARIANTS = ("untrained", "sft", "exgrpo_no_bonus", "exgrpo")
SPLITS = ("arithmetic_forward", "arithmetic_reversal")


def _table(results) -> str:
    lines = ["| variant | held-in (forward) | reversal (OOD) |", "|---|---|---|"]
    seeds = sorted(results)
    summary = {}
    for v in VARIANTS:
        cells = []
        for s in SPLITS:
            accs = [results[k][v][s]["accuracy"] for k in seeds]
            m = statistics.mean(accs)
            if len(accs) > 1:  # 95% interval of the mean over seeds (t with n-1 dof, n <= 10 tabulated)
                t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}.get(len(accs), 2.0)
                h = t * statistics.stdev(accs) / math.sqrt(len(accs))
                cells.append(f"{m:.3f} ± {h:.3f}")
            else:
                cells.append(f"{m:.3f}")
            summary[(v, s)] = m
        lines.append(f"| {v} | {cells[0]} | {cells[1]} |")
    n = len(seeds)
    lines.append("")
    lines.append(f"{n} seed(s), {results[seeds[0]]['sft'][SPLITS[0]]['n']} questions per split and seed.")
    d_in = summary[("exgrpo", SPLITS[0])] - summary[("sft", SPLITS[0])]
    d_rev = summary[("exgrpo", SPLITS[1])] - summary[("sft", SPLITS[1])]
    d_bonus = summary[("exgrpo", SPLITS[1])] - summary[("exgrpo_no_bonus", SPLITS[1])]
    lines.append(f"ExGRPO minus SFT: held-in {d_in:+.3f}, reversal {d_rev:+.3f}; DSU bonus (full minus no-bonus) on "
                 f"reversal: {d_bonus:+.3f}." + (" With one seed these differences are within noise; run --seeds N."
                                                  if n == 1 else ""))
    return "\n".join(lines)


def _plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in curves.items():
        for i, run in enumerate(runs):
            steps = [r["step"] for r in run]
            ax[0].plot(steps, [r["reward_base_A"] for r in run], label=f"{name} A" if i == 0 else None,
                       color="tab:green" if name == "exgrpo" else "tab:gray", alpha=0.8)
            ax[1].plot(steps, [r["p_full"] - r["p_partial"] for r in run], label=name if i == 0 else None,
                       color="tab:green" if name == "exgrpo" else "tab:gray", alpha=0.8)
    ax[0].set_title("outcome reward, Scenario A")
    ax[1].set_title("P_full - P_partial")
    for a in ax:
        a.set_xlabel("step")
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COMMANDS = {  # name -> (config class, function(cfg, resume))
    "ei": (None, ei), "sft": (SFTConfig, sft), "train": (TrainConfig, train), "eval": (EvalConfig, eval),
    "demo": (DemoConfig, lambda cfg, resume=False: demo(cfg)),
}


def _fill_ei():
    from exgrpo.ei.pipeline import EIConfig
    COMMANDS["ei"] = (EIConfig, ei)


_fill_ei()


def run(name: str, cfg, resume: bool = False):
    COMMANDS[name][1](cfg, resume=resume)
