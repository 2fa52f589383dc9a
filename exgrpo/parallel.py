"""Data parallelism: DDP (every rank holds the model) or FSDP2 (PyTorch's ``fully_shard``: parameters, gradients
and optimizer state sharded over the ranks), and the checkpoints of each layout.

FSDP2: each decoder layer is its own shard group, then the root (embeddings, final norm, lm_head). The fused loss
runs inside the root module's forward (``PolicyHidden.forward(batch, head)``), so the lm_head weight is unsharded
while the kernel reads it and its gradient is reduce-scattered like every other; tied embeddings are one
parameter of the root. ``MixedPrecisionPolicy`` and ``CPUOffloadPolicy`` come from ``FSDPConfig``; activation
checkpointing (``model.gradient_checkpointing``) is applied when the model is built, before sharding.

Checkpoints: DDP writes a Hugging Face folder (rank 0); FSDP2 writes ``torch.distributed.checkpoint`` shards of the
model and optimizer (every rank), the scheduler and trainer state, and every rank's RNG; both atomically (a
temporary folder renamed into place) and with ``layout.json`` naming the layout and world size, so a resume from
another layout is a clear error.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass

import torch

from exgrpo import checkpoint, distributed

PARALLEL = ("ddp", "fsdp2")


@dataclass(frozen=True)
class FSDPConfig:
    param_dtype: str = "float32"  # dtype parameters are gathered in for compute (bfloat16: bf16 compute, fp32 master)
    reduce_dtype: str = "float32"  # dtype of the gradient reduce-scatter
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in host memory
    reshard_after_forward: bool = True  # free gathered layers after their forward (ZeRO-3); False: keep (ZeRO-2)

    def __post_init__(self):
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"FSDPConfig.{name} must be float32 or bfloat16, got {getattr(self, name)!r}")


def check_launch(parallel: str, global_batch: int, batch_field: str) -> None:
    """Clear errors before any work: the layout's name, torchrun for FSDP2, a batch the ranks can split."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if parallel == "fsdp2" and not distributed.launched():
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
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(device.type, (distributed.world(),))
        kw = dict(mesh=mesh, reshard_after_forward=fsdp.reshard_after_forward,
                  mp_policy=MixedPrecisionPolicy(param_dtype=getattr(torch, fsdp.param_dtype),
                                                 reduce_dtype=getattr(torch, fsdp.reduce_dtype)))
        if fsdp.cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy()
        for layer in decoder_layers(policy.causal_lm):
            fully_shard(layer, **kw)
        fully_shard(policy, **kw)
        return policy
    if distributed.world() == 1:
        return policy
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)


def is_fsdp(module) -> bool:
    from torch.distributed.fsdp import FSDPModule
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


# ------------------------------------------------------------------------------------------------ checkpoints


def _layout(parallel: str) -> dict:
    return {"layout": parallel, "world_size": distributed.world()}


def save(out_dir: str, step: int, parallel: str, model, tok, opt, sched, state: dict, keep: int = 2) -> None:
    """A checkpoint of this step (collective under FSDP2: every rank calls it)."""
    if parallel != "fsdp2":
        if distributed.is_main():
            checkpoint.save(out_dir, step, model, tok, {"state": dict(state), "optimizer": opt.state_dict(),
                                                        "scheduler": sched.state_dict()}, keep=keep,
                            json_files={"layout.json": _layout(parallel)})
        distributed.barrier()
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = checkpoint.step_dir(out_dir, step)
    tmp = final + ".tmp"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    distributed.barrier()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(tmp, "dcp"))
    torch.save(checkpoint.rng_state(), os.path.join(tmp, f"rng-rank{distributed.rank()}.pt"))
    distributed.barrier()
    if distributed.is_main():
        torch.save({"state": dict(state), "scheduler": sched.state_dict(), "step": step},
                   os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "layout.json"), "w") as f:
            json.dump(_layout(parallel), f)
        checkpoint.publish(tmp, final, keep)
    distributed.barrier()


def check_layout(path: str, parallel: str) -> None:
    f = os.path.join(path, "layout.json")
    have = json.load(open(f)) if os.path.exists(f) else {"layout": "ddp", "world_size": None}
    if have["layout"] != parallel:
        raise ValueError(f"--resume: checkpoint {path} was written with parallel={have['layout']}, this run uses "
                         f"parallel={parallel}")
    if parallel == "fsdp2" and have["world_size"] != distributed.world():
        raise ValueError(f"--resume: checkpoint {path} was written by {have['world_size']} ranks, this run has "
                         f"{distributed.world()} (FSDP2 shards and per-rank RNG)")


def load_fsdp2(path: str, model, opt, sched) -> dict:
    """Restore an FSDP2 checkpoint into the sharded model and optimizer (every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=os.path.join(path, "dcp"))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    st = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    sched.load_state_dict(st["scheduler"])
    checkpoint.set_rng_state(torch.load(os.path.join(path, f"rng-rank{distributed.rank()}.pt"), weights_only=False))
    return dict(st["state"])


def full_state_dict(model) -> dict:
    """The whole model's state on rank 0, on the CPU (collective: every rank calls it; others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
