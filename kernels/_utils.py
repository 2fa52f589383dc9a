"""Shared helpers for the kernels: backend choice, GEMM dtype under autocast, input layout, chunk sizing,
matmuls with fp32 accumulation."""
from __future__ import annotations

import enum
import functools
import os

import torch

if __package__ != "exgrpo_kernels":
    raise ImportError(f"{__name__} belongs to the package exgrpo_kernels (the folder kernels/, mapped by setup.py); "
                      f"import exgrpo_kernels, not {__package__}: `kernels` is Hugging Face's hub-kernels package")

from . import _native  # noqa: E402  (after the guard: loads the C++ CPU kernels)

IGNORE_INDEX = -100


class KernelBackend(str, enum.Enum):
    """Who computes a kernel: ``auto`` (Triton on CUDA; on the CPU the C++ kernels where built, else the torch
    twins), ``triton``, ``native`` (C++, CPU) or ``torch`` (the chunked torch twins)."""

    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"
    NATIVE = "native"


KERNEL_BACKENDS = tuple(b.value for b in KernelBackend)
BACKEND_ENV = "EXGRPO_KERNEL_BACKEND"  # forces the backend that "auto" resolves to (CI: triton under the interpreter)


def interpret_mode() -> bool:
    """True when Triton runs its interpreter on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA; on the CPU ``native`` (the C++ kernels of csrc/) where they are built, else
    ``torch`` (the torch twins); unless ``$EXGRPO_KERNEL_BACKEND`` names one. ``triton`` on a CPU tensor needs the
    interpreter; ``native`` needs a CPU tensor and the built extension."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "auto")
        if forced not in KERNEL_BACKENDS:
            raise ValueError(f"${BACKEND_ENV} must be one of {KERNEL_BACKENDS}, got {forced!r}")
        backend = forced
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        return "native" if _native.AVAILABLE and device.type == "cpu" else "torch"
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' is the C++ CPU backend, got a {device.type} tensor")
        if not _native.AVAILABLE:
            raise ValueError(f"backend='native': the C++ extension is not loaded: {_native.WHY_NOT}")
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


@functools.cache
def _has_mm_out_dtype(device_index: int, dtype: torch.dtype) -> bool:
    dev = torch.device("cuda", device_index)
    try:
        a = torch.randn(16, 16, device=dev).to(dtype)
        r = torch.mm(a, a, out_dtype=torch.float32)
        return r.dtype == torch.float32 and bool(torch.allclose(r, a.float() @ a.float(), rtol=1e-2, atol=1e-2))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@functools.cache
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
    if torch.compiler.is_compiling():  # value checks read the device: eager only (a traced graph cannot branch on them)
        return
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] = {int(targets[i])} is outside [0, V={V}) and is not the ignore index {IGNORE_INDEX}")


def check_head(weight: torch.Tensor, bias, temperature: float, softcap, logit_scale: float) -> None:
    """The lm_head's optional parts and the logit transform's scalars."""
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a [V={weight.shape[0]}] tensor or None, got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
        if bias.dtype not in FLOAT_DTYPES:
            raise ValueError(f"bias must be a float tensor, got {bias.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if not (isinstance(logit_scale, (int, float)) and logit_scale == logit_scale and abs(logit_scale) != float("inf")
            and logit_scale != 0):
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale!r}")


def scale_grads_(grad_out: torch.Tensor, *grads):
    """Stored gradients of a scalar loss times its upstream gradient. Eager: in place (no second [V, H] copy), with
    one host read to skip the multiply when the upstream is 1, as it is for ``loss.backward()``. Under
    torch.compile: out of place (no host read in a traced graph)."""
    if torch.compiler.is_compiling():
        return tuple(None if g is None else g * grad_out.to(g.dtype) for g in grads)
    s = float(grad_out)
    if s != 1.0:
        for g in grads:
            if g is not None:
                g.mul_(s)
    return grads
