"""Data parallelism: the process group from torchrun's environment, the trainer's scalar collectives, and the
model's wrapping: DDP (every rank holds the model) or FSDP2 (PyTorch's ``fully_shard``: parameters, gradients and
optimizer state sharded over the ranks).

One process group serves two kinds of traffic: the model's gradients and parameters (CUDA tensors: NCCL on a
GPU) and the trainer's bookkeeping (token counts, metrics, micro-batch plans: CPU scalars and objects). NCCL has
no CPU transport, so on CUDA the group is created with a backend per device type, ``cpu:gloo,cuda:nccl``:
collectives on CPU tensors go through gloo, on CUDA tensors through NCCL. On the CPU it is plain gloo.
``$EXGRPO_DIST_BACKEND`` overrides the string (tests use it to run the CUDA layout with gloo on both sides).

FSDP2: each decoder layer is its own shard group, then the root (embeddings, final norm, lm_head). The fused loss
runs inside the root module's forward (``PolicyHidden.forward(batch, loss_fn)``), so the lm_head weight is
unsharded while the kernel reads it and its gradient is reduce-scattered like every other; tied embeddings are one
parameter of the root. ``MixedPrecisionPolicy`` and ``CPUOffloadPolicy`` come from ``FSDPConfig``; activation
checkpointing (``model.gradient_checkpointing``) is applied when the model is built, before sharding. Checkpoints of
both layouts: ``exgrpo.checkpoint``.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from exgrpo.config import PARALLEL

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


def side_barrier():
    """A barrier over a gloo group of its own, for a thread that runs beside the trainer's collectives (the
    generation thread of ``async_steps``); None on one rank. Every rank creates it at the same point."""
    if world() == 1:
        return None
    group = dist.new_group(backend="gloo")
    return lambda: dist.barrier(group=group)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def close():
    if dist.is_initialized():
        dist.destroy_process_group()


# ================================================================================================ wrapping


def check_launch(parallel: str, global_batch: int, batch_field: str) -> None:
    """Clear errors before any work: the layout's name, torchrun for FSDP2, a batch the ranks can split."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if parallel == "fsdp2" and not launched():
        raise ValueError("parallel=fsdp2 needs torchrun (python -m torch.distributed.run --nproc_per_node N -m exgrpo "
                         "...): WORLD_SIZE is not set")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if global_batch % world:
        raise ValueError(f"{batch_field}={global_batch} does not divide over the world size {world}")


def decoder_layers(causal_lm):
    base = getattr(causal_lm, causal_lm.base_model_prefix)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"parallel=fsdp2: no decoder layers found on {type(base).__name__}")
    return list(layers)


def wrap(policy, parallel: str, fsdp, device):
    """The module that runs the forward: the policy itself (one rank), DDP, or the policy sharded by FSDP2."""
    if parallel == "fsdp2":
        mesh = init_device_mesh(device.type, (world(),))
        kw = dict(mesh=mesh, reshard_after_forward=fsdp.reshard_after_forward,
                  mp_policy=MixedPrecisionPolicy(param_dtype=getattr(torch, fsdp.param_dtype),
                                                 reduce_dtype=getattr(torch, fsdp.reduce_dtype)))
        if fsdp.cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy()
        for layer in decoder_layers(policy.causal_lm):
            fully_shard(layer, **kw)
        fully_shard(policy, **kw)
        return policy
    if world() == 1:
        return policy
    return DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)


def is_fsdp(module) -> bool:
    return isinstance(module, FSDPModule)


def sync_context(module, sync: bool):
    """Gradient sync on this backward (the last micro-batch) or not (the others accumulate locally)."""
    if is_fsdp(module):
        module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return module.no_sync() if (hasattr(module, "no_sync") and not sync) else contextlib.nullcontext()


def clip_grad_norm(params, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)
