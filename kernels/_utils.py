"""Shared helpers for the kernels: backend choice, GEMM dtype under autocast, input layout, chunk sizing,
matmuls with fp32 accumulation."""
from __future__ import annotations

import functools
import os

import torch

IGNORE_INDEX = -100
_BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "EXGRPO_KERNEL_BACKEND"  # forces the backend that "auto" resolves to (CI: triton under the interpreter)


def interpret_mode() -> bool:
    """True when Triton runs its interpreter on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA, ``torch`` elsewhere, unless ``$EXGRPO_KERNEL_BACKEND`` names one.
    ``triton`` on a CPU tensor needs the interpreter."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "auto")
        if forced not in _BACKENDS:
            raise ValueError(f"${BACKEND_ENV} must be one of {_BACKENDS}, got {forced!r}")
        backend = forced
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpret_mode():
        raise ValueError(
            f"backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return backend


def pow2_floor(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def auto_chunk(rows_other: int, elem_bytes: int, budget_bytes: int, lo: int, hi: int) -> int:
    """Largest power of two c in [lo, hi] with c * rows_other * elem_bytes <= budget_bytes."""
    c = pow2_floor(max(1, budget_bytes // max(1, rows_other * elem_bytes)))
    return int(min(hi, max(lo, c)))


def tile_budget(device: torch.device) -> int:
    """Bytes one [chunk, V] (or [N, vocab-slab]) tile may take: 512 MiB on CUDA, 64 MiB on the CPU."""
    return (512 << 20) if device.type == "cuda" else (64 << 20)


def gemm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the vocabulary GEMMs run in (their accumulation is fp32 inside cuBLAS / in our buffers).

    Under ``torch.autocast`` for the inputs' device type: the autocast dtype (bf16 / fp16), as torch's own
    ``linear`` would run, whatever the parameters' dtype (fp32 master weights + bf16 autocast -> bf16 GEMMs);
    fp64 inputs are never cast down. Without autocast: the common input dtype on CUDA; on the CPU at least
    fp32 (bf16 GEMMs are slow there)."""
    dt = torch.promote_types(hidden.dtype, weight.dtype)
    dev = hidden.device.type
    if dt != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return dt if hidden.is_cuda else torch.promote_types(dt, torch.float32)


def dense_1d(x: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A 1-D input as the kernels read it: contiguous (``base + row``), in ``dtype`` if given. Strided views
    (a column of a batch tensor), expanded tensors (stride 0) and upstream gradients of ``.sum()`` all
    arrive here; copying an [N] vector is free next to the [N, V] work."""
    if x is None:
        return None
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x.contiguous()


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulator dtype for gradients of x: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a @ b, optionally with a wider output dtype (fp32 logits from bf16 operands on CUDA)."""
    if out_dtype is None or out_dtype == a.dtype:
        return torch.mm(a, b)
    if a.is_cuda and _has_mm_out_dtype(a.device.index or 0, a.dtype):
        return torch.mm(a, b, out_dtype=out_dtype)
    return torch.mm(a.to(out_dtype), b.to(out_dtype))


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b possibly bf16/fp16: fp32 accumulation, no [M, N] low-precision temp."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.dtype == torch.float64:
        acc.addmm_(a.double(), b.double())
    elif a.is_cuda and _has_addmm_out_dtype(a.device.index or 0, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif a.is_cuda and _has_mm_out_dtype(a.device.index or 0, a.dtype):
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.add_(torch.mm(a.float(), b.float()))


@functools.lru_cache(maxsize=None)
def _has_mm_out_dtype(device_index: int, dtype: torch.dtype) -> bool:
    dev = torch.device("cuda", device_index)
    try:
        a = torch.randn(16, 16, device=dev).to(dtype)
        r = torch.mm(a, a, out_dtype=torch.float32)
        return r.dtype == torch.float32 and bool(torch.allclose(r, a.float() @ a.float(), rtol=1e-2, atol=1e-2))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def _has_addmm_out_dtype(device_index: int, dtype: torch.dtype) -> bool:
    dev = torch.device("cuda", device_index)
    try:
        a = torch.randn(16, 16, device=dev).to(dtype)
        acc = torch.ones(16, 16, device=dev)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, 1 + a.float() @ a.float(), rtol=1e-2, atol=1e-2))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def check_2d(name: str, x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def check_1d(name: str, x: torch.Tensor, n: int, dtypes: tuple[torch.dtype, ...], device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device}")


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32)


def check_hidden_weight_targets(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """Shapes, dtypes, devices and target range of the common (hidden, weight, targets) triple."""
    check_2d("hidden", hidden, FLOAT_DTYPES)
    check_2d("weight", weight, FLOAT_DTYPES)
    if hidden.shape[0] == 0:
        raise ValueError("hidden has no rows (N = 0): nothing to compute")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows (V = 0)")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden is [N, H] = {tuple(hidden.shape)} but weight is [V, H] = {tuple(weight.shape)}: H differs")
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise ValueError(f"hidden dtype {hidden.dtype} differs from weight dtype {weight.dtype} "
                         f"(mixed dtypes are taken only under torch.autocast)")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    check_1d("targets", targets, hidden.shape[0], INT_DTYPES, hidden.device)
    V = weight.shape[0]
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] = {int(targets[i])} is outside [0, V={V}) and is not the ignore index {IGNORE_INDEX}")
