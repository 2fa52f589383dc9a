"""Process group from torchrun's environment, and the scalar collectives of the trainer.

One process group serves two kinds of traffic: the model's gradients and parameters (CUDA tensors: NCCL on a
GPU) and the trainer's bookkeeping (token counts, metrics, micro-batch plans: CPU scalars and objects). NCCL has
no CPU transport, so on CUDA the group is created with a backend per device type, ``cpu:gloo,cuda:nccl``:
collectives on CPU tensors go through gloo, on CUDA tensors through NCCL. On the CPU it is plain gloo.
``$EXGRPO_DIST_BACKEND`` overrides the string (tests use it to run the CUDA layout with gloo on both sides).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

BACKEND_ENV = "EXGRPO_DIST_BACKEND"


def backend_for(device_type: str) -> str:
    """The process-group backend string for a device type: CPU scalars always have gloo."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "cpu:gloo"


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def init() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Single process when WORLD_SIZE is unset; under torchrun the process group is
    created even for one rank, so that a 1-GPU torchrun exercises the same collectives as 8."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if launched() and not dist.is_initialized():
        backend = os.environ.get(BACKEND_ENV) or backend_for(device.type)
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return rank, world, device


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _reduce(x: float | int, op) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)  # a CPU scalar: served by the group's gloo backend
    dist.all_reduce(t, op=op)
    return float(t)


def all_sum(x: float | int) -> float:
    return _reduce(x, dist.ReduceOp.SUM if dist.is_initialized() else None)


def all_max(x: float | int) -> float:
    return _reduce(x, dist.ReduceOp.MAX if dist.is_initialized() else None)


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (pickled over the CPU backend)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def close():
    if dist.is_initialized():
        dist.destroy_process_group()
