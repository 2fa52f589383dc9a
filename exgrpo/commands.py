"""The commands behind the CLI: sft, train, eval, and demo (the README's main command)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass


from exgrpo.io import atomic_write_json
from exgrpo.model import ModelConfig
from exgrpo.demo import DemoConfig
from exgrpo.trainer import SFTConfig, TrainConfig, evaluate, sft as run_sft, train as run_train


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


def demo(cfg: DemoConfig):
    from exgrpo.demo import run_demo
    run_demo(cfg)


def plan(cfg, resume=False):
    from exgrpo.plan import plan as compute, render
    check_model_dir("model.path", cfg.model.path)
    print(render(cfg, compute(cfg)))


COMMANDS = {  # name -> (config class, function(cfg, resume))
    "ei": (None, ei), "sft": (SFTConfig, sft), "train": (TrainConfig, train), "eval": (EvalConfig, eval),
    "demo": (DemoConfig, lambda cfg, resume=False: demo(cfg)), "plan": (None, plan),
}


def _fill_ei():
    from exgrpo.ei.pipeline import EIConfig
    from exgrpo.plan import PlanConfig
    COMMANDS["ei"] = (EIConfig, ei)
    COMMANDS["plan"] = (PlanConfig, plan)


_fill_ei()


def run(name: str, cfg, resume: bool = False):
    COMMANDS[name][1](cfg, resume=resume)
