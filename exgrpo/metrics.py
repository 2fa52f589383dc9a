"""What a run logs: metrics.jsonl and samples.jsonl (append-only, cut back to the checkpoint on resume), TensorBoard,
and the step's phase timer. Main rank only; the values are already reduced over ranks."""
from __future__ import annotations

import json
import os
import resource
import time
import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from exgrpo import distributed
from exgrpo.io import AppendLog


class MetricsLog:
    """metrics.jsonl, samples.jsonl and TensorBoard of one run folder."""

    def __init__(self, out_dir, resume_step: int):
        self.main = distributed.is_main()
        self.log = self.samples = self.tb = None
        if not self.main:
            return
        self.log = self._open(os.path.join(out_dir, "metrics.jsonl"), resume_step)
        self.samples = self._open(os.path.join(out_dir, "samples.jsonl"), resume_step, key=lambda r: (r["step"], r["i"]))
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard may not be installed
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except ImportError:
            self.tb = None

    @staticmethod
    def _open(path, resume_step, key=lambda r: r["step"]):
        if os.path.exists(path):  # drop steps after the checkpoint we resume from
            keep = [x for x in open(path) if x.strip() and json.loads(x)["step"] < resume_step]
            with open(path, "w") as f:
                f.writelines(keep)
        return AppendLog(path, key)

    def write(self, rec: dict):
        if not self.main:
            return
        self.log.append(rec)
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    def write_samples(self, step: int, samples: list[dict]):
        """A few full rollout dialogues of a step (bounded: each text cut to 4000 characters)."""
        if not self.main or not samples:
            return
        self.samples.extend({"step": step, "i": i, **s} for i, s in enumerate(samples))
        if self.tb is not None:
            md = "\n\n---\n\n".join(f"**{s['scenario']}** reward {s['reward']:.2f}\n\n```\n{s['text']}\n```"
                                      for s in samples)
            self.tb.add_text("rollouts", md, step)

    def close(self):
        for x in (self.log, self.samples, self.tb):
            if x is not None:
                x.close()


def peak_memory_gib(device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def global_mean(xs: list) -> float | None:
    """The mean of every rank's values (None when no rank has any)."""
    n = distributed.all_sum(len(xs))
    return distributed.all_sum(sum(xs)) / n if n else None


class PhaseTimer:
    """Wall time of a step's phases: ``with timer("gen"): ...``; ``record()`` -> {"time_gen_s": ...}. On CUDA each
    phase ends with a synchronize, so a phase's kernels are counted in it."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def record(self) -> dict:
        return {f"time_{k}_s": v for k, v in self.times.items()}


class LiveTensorBytes(TorchDispatchMode):
    """The exact peak of live tensor-storage bytes created inside the mode (forward, backward, optimizer step): each
    storage an op creates is counted once and subtracted when freed, as a GPU's caching allocator sees the live bytes
    (its fragmentation aside). On the CPU this replaces the process's peak RSS, which depends on the allocator's arenas
    and varies run to run. Tensors alive before the mode (weights, optimizer state) are not counted: ``peak`` is the
    peak extra. Slows every op down (Python per op): measure memory in its own pass."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _free(self, key: int):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if id(st) not in self.live and st.nbytes() > 0:
                    self.live[id(st)] = st.nbytes()
                    self.now += st.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, id(st))
        return out
