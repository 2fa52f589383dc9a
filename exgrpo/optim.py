"""The optimizer, its schedule, and one guarded optimizer step (clip, skip a non-finite step, count the skips)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim import lr_scheduler

from exgrpo import distributed
from exgrpo.config import OptimConfig


def make_optimizer(model, oc: OptimConfig, total_steps: int):
    """AdamW (betas 0.9 / 0.95) over the trainable parameters; torch's schedulers: linear warm-up from
    lr / (warmup + 1) (the first step already learns), then cosine decay to lr * min_lr_ratio at ``total_steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=oc.lr, weight_decay=oc.weight_decay, betas=(0.9, 0.95))
    w = min(oc.warmup_steps, max(0, total_steps - 1))
    cosine = lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps - w), eta_min=oc.lr * oc.min_lr_ratio)
    if w == 0:
        return opt, cosine
    warm = lr_scheduler.LinearLR(opt, start_factor=1.0 / (w + 1), end_factor=1.0, total_iters=w)
    return opt, lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[w])


@dataclass
class NonFiniteGuard:
    """Counts steps skipped for a non-finite loss or gradient; more than ``limit`` stop the run."""

    limit: int
    count: int = 0

    def record_skip(self):
        self.count += 1
        if self.count > self.limit:
            raise RuntimeError(f"{self.count} steps with a non-finite loss or gradient (max_nonfinite={self.limit}): "
                               f"stopping")


def optimizer_step(model, opt, sched, oc: OptimConfig, loss_ok: bool | None,
                   guard: NonFiniteGuard) -> tuple[bool, float | None]:
    """Clip, check, step. ``loss_ok`` None: nothing was backpropagated (the schedule still advances). A non-finite
    loss or gradient skips the step. Returns (stepped, grad_norm or None)."""
    if loss_ok is None:
        opt.zero_grad(set_to_none=True)
        sched.step()
        return False, None
    params = [p for p in model.parameters() if p.requires_grad]
    norm = distributed.clip_grad_norm(params, oc.grad_clip)
    ok = loss_ok and math.isfinite(norm)
    if ok:
        opt.step()
    else:
        guard.record_skip()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return ok, norm
