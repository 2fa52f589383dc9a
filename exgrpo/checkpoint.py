"""Checkpoints of every layout, and the final model.

A checkpoint is a folder ``<out_dir>/checkpoints/step-NNNNNN`` written under a temporary name and renamed into place
(a kill never leaves a half checkpoint), ``latest`` pointing at the newest, all but the newest ``keep`` pruned.

* DDP (and one process): the model and tokenizer in Hugging Face format (rank 0), ``trainer_state.pt`` with the
  optimizer, scheduler, RNG and data-position state.
* FSDP2: ``torch.distributed.checkpoint`` shards of the model and optimizer (every rank), the scheduler and trainer
  state, and every rank's RNG.

Both carry ``layout.json`` (the layout and world size), so a resume from another layout is a clear error.
``save_final`` writes the trained model (LoRA merged, FSDP2 gathered) as a Hugging Face folder ``<out_dir>/final``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from exgrpo import distributed
from exgrpo.io import atomic_write_text
from exgrpo.model import merged_model


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


def latest(out_dir: str) -> str | None:
    p = os.path.join(out_dir, "checkpoints", "latest")
    if not os.path.exists(p):
        return None
    path = os.path.join(out_dir, "checkpoints", open(p).read().strip())
    return path if os.path.isdir(path) else None


def _layout(parallel: str) -> dict:
    return {"layout": parallel, "world_size": distributed.world()}


# ================================================================================================ save


@dataclass
class Run:
    """What a checkpoint holds besides the trainer state: the model, its tokenizer, the optimizer and its schedule."""

    model: object
    tok: object
    opt: object
    sched: object


def save(out_dir: str, step: int, parallel: str, run: Run, state: dict, keep: int = 2) -> str:
    """The checkpoint of ``step`` (collective under FSDP2: every rank calls it). Returns its folder."""
    model, tok, opt, sched = run.model, run.tok, run.opt, run.sched
    final = step_dir(out_dir, step)
    tmp = final + ".tmp"
    if parallel != "fsdp2":
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            torch.save({"state": dict(state), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "rng": rng_state(), "step": step}, os.path.join(tmp, "trainer_state.pt"))
            with open(os.path.join(tmp, "layout.json"), "w") as f:
                json.dump(_layout(parallel), f)
            publish(tmp, final, keep)
        distributed.barrier()
        return final
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    distributed.barrier()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(tmp, "dcp"))
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{distributed.rank()}.pt"))
    distributed.barrier()
    if distributed.is_main():
        torch.save({"state": dict(state), "scheduler": sched.state_dict(), "step": step},
                   os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "layout.json"), "w") as f:
            json.dump(_layout(parallel), f)
        publish(tmp, final, keep)
    distributed.barrier()
    return final


def maybe_save(cfg, step: int, run: Run, state: dict) -> None:
    """A checkpoint after step ``step`` when ``cfg.save_every`` says so."""
    if cfg.save_every and (step + 1) % cfg.save_every == 0:
        if callable(state.get("pending")):  # the next step's rollouts (async_steps), gathered only when saved
            state = {**state, "pending": state["pending"]()}
        save(cfg.out_dir, step + 1, cfg.parallel, run, state)


def full_state_dict(model) -> dict:
    """The whole model's state on rank 0, on the CPU (collective: every rank calls it; others get {})."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_final(cfg, model, tok, rebuild=None) -> str | None:
    """The trained model as a Hugging Face folder ``<cfg.out_dir>/final`` (LoRA merged), written atomically by rank
    0; under FSDP2 the shards are gathered first (collective) and loaded into ``rebuild()``, an unsharded copy of
    the architecture. Returns the folder on rank 0, None elsewhere."""
    m = model
    if cfg.parallel == "fsdp2":
        sd = full_state_dict(model)
        if distributed.is_main():
            m = rebuild()
            m.load_state_dict(sd)
            if hasattr(m, "merge_and_unload"):
                m = m.merge_and_unload()
    elif hasattr(model, "merge_and_unload") and distributed.is_main():
        m = merged_model(model)  # LoRA merged (a QLoRA base dequantized): a plain folder
    path = None
    if distributed.is_main():
        path = os.path.join(cfg.out_dir, "final")
        tmp = path + ".tmp"
        m.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    distributed.barrier()
    return path


# ================================================================================================ restore


def check_layout(path: str, parallel: str) -> None:
    f = os.path.join(path, "layout.json")
    have = json.load(open(f)) if os.path.exists(f) else {"layout": "ddp", "world_size": None}
    if have["layout"] != parallel:
        raise ValueError(f"--resume: checkpoint {path} was written with parallel={have['layout']}, this run uses "
                         f"parallel={parallel}")
    if parallel == "fsdp2" and have["world_size"] != distributed.world():
        raise ValueError(f"--resume: checkpoint {path} was written by {have['world_size']} ranks, this run has "
                         f"{distributed.world()} (FSDP2 shards and per-rank RNG)")


def restore(path: str, parallel: str, model, opt, sched) -> dict:
    """Load the checkpoint ``path`` into the model, optimizer and scheduler and restore the RNG; returns the trainer
    state (step, ...). A checkpoint of another layout, or an unreadable one, is a ValueError naming it."""
    check_layout(path, parallel)
    try:
        if parallel == "fsdp2":
            return _restore_fsdp2(path, model, opt, sched)
        return _restore_hf(path, model, opt, sched)
    except (OSError, RuntimeError, KeyError, EOFError, ValueError) as e:
        raise ValueError(f"--resume: checkpoint {path} is unreadable or from another setup: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


def _restore_hf(path, model, opt, sched) -> dict:
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    if not files:
        raise ValueError("no model weights (*.safetensors) in it")
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(path, f)))
    if hasattr(model, "get_base_model"):
        from peft import set_peft_model_state_dict  # peft: optional (LoRA only)
        set_peft_model_state_dict(model, sd)
    else:
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m or not model.config.tie_word_embeddings]:
            raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    st = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    set_rng_state(st["rng"])
    return dict(st["state"])


def _restore_fsdp2(path: str, model, opt, sched) -> dict:
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=os.path.join(path, "dcp"))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    st = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    sched.load_state_dict(st["scheduler"])
    set_rng_state(torch.load(os.path.join(path, f"rng-rank{distributed.rank()}.pt"), weights_only=False))
    return dict(st["state"])
