"""Group-normalised advantages: A_i = (r_i - mean_g) / (std_g + eps), std with Bessel's correction (TRL).

S is the number of rollouts of a step (hundreds to tens of thousands), so this is a handful of
segment reductions (bincount / index_add) rather than a Triton kernel: it runs unchanged on CPU and
CUDA, and the per-token gather of the result happens inside the GRPO loss kernel.
"""
from __future__ import annotations

import torch

from ._utils import FLOAT_DTYPES, INT_DTYPES

SCALES = ("group", "batch", "none")


def grouped_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, scale: str = "group",
                       eps: float = 1e-4) -> torch.Tensor:
    """Advantages of S rollouts from their rewards and group ids.

    Args:
        rewards: [S] float (any float dtype; computed in fp32, or fp64 for fp64 input).
        group_ids: [S] int, any values: rollouts with the same id form one group (need not be sorted
            or contiguous).
        scale: "group" divides by the group's std, "batch" by the std of all S rewards, "none" only
            centres on the group mean.
        eps: added to the std. Default 1e-4.

    Returns:
        [S] advantages (fp32, or fp64 for fp64 rewards). A group of one, or a group whose rewards are all
        equal, gets exactly 0 (never NaN).
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D [S] tensor, got {getattr(rewards, 'shape', type(rewards).__name__)}")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty (S = 0)")
    if rewards.dtype not in FLOAT_DTYPES:
        raise ValueError(f"rewards must be a float tensor, got {rewards.dtype}")
    if not isinstance(group_ids, torch.Tensor) or group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids must have shape {tuple(rewards.shape)} like rewards, got "
                         f"{getattr(group_ids, 'shape', type(group_ids).__name__)}")
    if group_ids.dtype not in INT_DTYPES:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not bool(torch.isfinite(rewards).all()):
        i = int((~torch.isfinite(rewards)).nonzero()[0, 0])
        raise ValueError(f"rewards[{i}] = {float(rewards[i])} is not finite")
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(dt)
    _, g = torch.unique(group_ids, return_inverse=True)
    G = int(g.max()) + 1
    cnt = torch.bincount(g, minlength=G).to(dt)
    mean = torch.zeros(G, dtype=dt, device=r.device).index_add_(0, g, r) / cnt
    centred = r - mean[g]
    gmax = torch.full((G,), float("-inf"), dtype=dt, device=r.device).scatter_reduce_(0, g, r, "amax")
    gmin = torch.full((G,), float("inf"), dtype=dt, device=r.device).scatter_reduce_(0, g, r, "amin")
    flat = (gmax == gmin)[g]  # a group of one is flat too
    if scale == "group":
        var = torch.zeros(G, dtype=dt, device=r.device).index_add_(0, g, centred * centred) / (cnt - 1).clamp(min=1)
        adv = centred / (var.sqrt()[g] + eps)
    elif scale == "batch":
        std = r.std(unbiased=True) if r.numel() > 1 else torch.zeros((), dtype=dt, device=r.device)
        adv = centred / (std + eps)
    else:
        adv = centred
    return torch.where(flat, torch.zeros_like(adv), adv)


def grouped_advantages_reference(rewards, group_ids, *, scale="group", eps=1e-4) -> torch.Tensor:
    """Loop over groups in float64, the plain definition."""
    r = rewards.double()
    out = torch.zeros_like(r)
    batch_std = r.std() if r.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    for gid in torch.unique(group_ids).tolist():
        sel = group_ids == gid
        x = r[sel]
        if x.numel() < 2 or bool((x == x[0]).all()):
            continue
        c = x - x.mean()
        out[sel] = {"group": lambda: c / (x.std() + eps), "batch": lambda: c / (batch_std + eps), "none": lambda: c}[scale]()
    return out
