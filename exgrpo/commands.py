"""The commands behind the CLI: sft, train, eval, and demo (the README's main command)."""
from __future__ import annotations

import importlib.util
import json
import os

from exgrpo.config import (DemoConfig, EIConfig, EvalConfig, ModelConfig, PlanConfig, SFTConfig, TrainConfig,
                           check_data_names as _check_data_names)
from exgrpo.data.loaders import load_dataset
from exgrpo.demo import run_demo
from exgrpo.dialogue import DialogueTokenizer
from exgrpo.ei.pipeline import run_ei
from exgrpo.evaluate import evaluate
from exgrpo.grpo import train as run_train
from exgrpo.io import atomic_write_json
from exgrpo.model import build_student
from exgrpo.plan import plan as compute_plan, render as render_plan
from exgrpo.sft import sft as run_sft
from exgrpo.tasks.arithmetic import make_split


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
    try:
        _check_data_names(field_name, names)
    except ValueError as e:
        raise UserError(str(e)) from None


def sft(cfg: SFTConfig, resume=False):
    check_file("data", cfg.data, hint="run `exgrpo ei` first")
    check_model_dir("model.path", cfg.model.path)
    print(json.dumps(run_sft(cfg, resume=resume)))


def train(cfg: TrainConfig, resume=False):
    check_file("data", cfg.data, hint="run `exgrpo ei` first")
    check_model_dir("init", cfg.init, hint="run `exgrpo sft` first, or init=null to start from the model config")
    check_model_dir("model.path", cfg.model.path)
    print(json.dumps(run_train(cfg, resume=resume)))


def ei(cfg: EIConfig, resume=False):
    check_data_names("data", cfg.data)
    check_model_dir("student_model_path", cfg.student_model_path)
    check_model_dir("teacher_model_path", cfg.teacher_model_path)
    check_file("data_root", cfg.data_root, "folder")
    print(json.dumps(run_ei(cfg), indent=1))


def eval(cfg: EvalConfig, resume=False):  # noqa: A001 - the CLI command's name
    check_model_dir("model", cfg.model, hint="a folder written by exgrpo sft/train (final/) or a Hugging Face model")
    check_data_names("data", cfg.data)
    check_file("data_root", cfg.data_root, "folder")
    examples = []
    for name in cfg.data:
        if name == "arithmetic":
            examples += (make_split(cfg.limit or 200, cfg.seed, "test", n_ops=cfg.arith_ops) +
                         make_split(cfg.limit or 200, cfg.seed, "reversal", n_ops=cfg.arith_ops))
        else:
            examples += load_dataset(name, split=cfg.split, limit=cfg.limit, data_root=cfg.data_root)
    model, tok = build_student(ModelConfig(path=cfg.model))
    res = evaluate(model, tok, examples, max_new_tokens=cfg.max_new_tokens, backend=eval_backend(cfg.backend, model, tok))
    print(f"{'data set':28s} {'accuracy':>9s} {'n':>6s}")
    for k, v in res.items():
        print(f"{k:28s} {v['accuracy']:9.3f} {v['n']:6d}")
    atomic_write_json(cfg.out or os.path.join(cfg.model, "eval.json"), res)


def eval_backend(name: str, model, tok):
    """The generation backend for evaluation: vLLM (batched over every data set) where installed and asked for,
    else the trainer's transformers generation. vLLM is a heavy optional dependency: imported only when chosen."""
    if name == "auto":
        name = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    if name == "transformers":
        return None
    from exgrpo.vllm_backend import VLLMBackend
    return VLLMBackend.from_model(model, tok, DialogueTokenizer(tok).eot)


# ================================================================================================ demo


def demo(cfg: DemoConfig, resume=False):
    run_demo(cfg)


def plan(cfg: PlanConfig, resume=False):
    check_model_dir("model.path", cfg.model.path)
    print(render_plan(cfg, compute_plan(cfg)))


COMMANDS = {  # name -> (config class, function(cfg, resume))
    "ei": (EIConfig, ei), "sft": (SFTConfig, sft), "train": (TrainConfig, train), "eval": (EvalConfig, eval),
    "demo": (DemoConfig, demo), "plan": (PlanConfig, plan),
}


def run(name: str, cfg, resume: bool = False):
    COMMANDS[name][1](cfg, resume=resume)
