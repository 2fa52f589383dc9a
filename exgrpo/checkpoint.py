"""Checkpoints: the model and tokenizer in Hugging Face format plus optimizer, scheduler, RNG and data-position
state, written to a temporary folder and renamed into place (a kill never leaves a half checkpoint)."""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

from exgrpo.io import atomic_write_text


def rng_state() -> dict:
    """Every generator this process samples from: Python, numpy, torch's CPU one and (CUDA) this device's."""
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def step_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"step-{step:06d}")


def publish(tmp: str, final: str, keep: int) -> None:
    """Rename the fully written folder ``tmp`` into place as ``final``, point ``latest`` at it, and drop all but
    the newest ``keep`` checkpoints."""
    root = os.path.dirname(final)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(os.path.join(root, "latest"), os.path.basename(final))
    done = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))
    for d in done[:-keep]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def save(out_dir: str, step: int, model, tokenizer, state: dict, keep: int = 2,
         json_files: dict | None = None) -> str:
    """The checkpoint of ``step``; ``json_files`` ({name: object}) are written into it before it is published."""
    final = step_dir(out_dir, step)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(dict(state, rng=rng_state(), step=step), os.path.join(tmp, "trainer_state.pt"))
    for name, obj in (json_files or {}).items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f)
    publish(tmp, final, keep)
    return final


def latest(out_dir: str) -> str | None:
    p = os.path.join(out_dir, "checkpoints", "latest")
    if not os.path.exists(p):
        return None
    path = os.path.join(out_dir, "checkpoints", open(p).read().strip())
    return path if os.path.isdir(path) else None


def load_state(path: str) -> dict:
    return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
