"""The ``exgrpo_native`` op library: the row ops of the fused kernels and the pack kernel, one op each, with an
implementation per device that the dispatcher picks:

* CPU: the C++ kernels of ``csrc/`` (``exgrpo_kernels._C``, built by ``setup.py`` through the top-level
  ``CMakeLists.txt``; its row kernels compiled for AVX-512, AVX2 and the x86-64 baseline, the best the CPU runs
  chosen at load, ``$EXGRPO_NATIVE_ISA`` forcing a lower one), or, where ``_C`` is not built or
  ``$EXGRPO_NO_NATIVE=1``, the torch twins registered in Python under the same schemas.
* CUDA: the Triton kernels (registered by the op files: ``_rows.py``, ``grpo_loss/rows.py``, ``nll_loss.py``,
  ``packing.py``).

The ops (all [C] vectors contiguous; z is a [C, V] logits tile with contiguous columns, any float dtype; the math is
fp32; x' = soft_cap(pre x) / tau with cap = 0 meaning no cap):

* ``row_stats(z, t, inv_tau, pre, cap, with_entropy) -> (logp, lse, entropy or [0])``
* ``row_grad_(z, t, lse, ent?, c_l, c_h?, inv_tau, pre, cap, col0, out)``: out <- dJ/dz (out may be z)
* ``row_stats_grad_(z, t, c_l, inv_tau, pre, cap) -> (logp, lse)``: both, one row at a time, z <- dJ/dz
* ``grpo_token_rows_(z, t, sid, adv, w_seq, seq_isw?, old?, ref?, gen?, ext?, ...) -> (logp, ratio, kl, ent, j)``
* ``pack(tokens, cu, token_mask?) -> (ids, pos, targets, seq_ids, loss_mask)``
"""
from __future__ import annotations

import importlib
import os

import torch

if __package__ != "exgrpo_kernels":
    raise ImportError(f"{__name__} belongs to the package exgrpo_kernels; import exgrpo_kernels, not {__package__}")

NO_NATIVE_ENV = "EXGRPO_NO_NATIVE"  # "1": neither build (setup.py) nor load the C++ library; the torch twins serve

# The contract of the library, equal to csrc/registration.cpp's (tests/test_native.py compares them)
SCHEMAS = {
    "row_stats": "row_stats(Tensor z, Tensor t, float inv_tau, float pre, float cap, bool with_entropy) -> "
                 "(Tensor, Tensor, Tensor)",
    "row_grad_": "row_grad_(Tensor z, Tensor t, Tensor lse, Tensor? ent, Tensor c_l, Tensor? c_h, float inv_tau, "
                 "float pre, float cap, int col0, Tensor(a!) out) -> ()",
    "row_stats_grad_": "row_stats_grad_(Tensor(a!) z, Tensor t, Tensor c_l, float inv_tau, float pre, float cap) -> "
                       "(Tensor, Tensor)",
    "grpo_token_rows_": "grpo_token_rows_(Tensor(a!) z, Tensor t, Tensor sid, Tensor adv, Tensor w_seq, "
                        "Tensor? seq_isw, Tensor? old, Tensor? ref, Tensor? gen, Tensor? ext, float inv_tau, "
                        "float pre, float cap, float eps_low, float eps_high, float delta, float beta, float is_cap, "
                        "int kl_est, int is_mode, bool with_entropy, bool compute_grad) -> "
                        "(Tensor, Tensor, Tensor, Tensor, Tensor)",
    "pack": "pack(Tensor tokens, Tensor cu, Tensor? token_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}


def _load() -> str | None:
    """Load exgrpo_kernels._C (its static initialisers register the schemas and CPU kernels). None, or why not."""
    if os.environ.get(NO_NATIVE_ENV, "0") == "1":
        return f"${NO_NATIVE_ENV}=1"
    try:
        mod = importlib.import_module(f"{__package__}._C")
    except ImportError as e:
        return (f"{__package__}._C did not load ({e}); it is built by `pip install --no-build-isolation -e .` "
                f"(setup.py runs CMake)")
    if getattr(mod, "ISA_ERROR", ""):
        raise RuntimeError(mod.ISA_ERROR)
    return None


WHY_NOT = _load()
AVAILABLE = WHY_NOT is None  # the C++ CPU kernels are registered
ops = torch.ops.exgrpo_native

if AVAILABLE:
    _lib = torch.library.Library("exgrpo_native", "FRAGMENT")  # for the CUDA implementations
else:
    _lib = torch.library.Library("exgrpo_native", "DEF")
    for _schema in SCHEMAS.values():
        _lib.define(_schema)


def register(name: str, device: str, fn) -> None:
    """Register ``fn`` as the ``device`` ("CPU" / "CUDA") implementation of ``exgrpo_native::name``. CPU
    implementations (the torch twins) are taken only when the C++ library is not loaded."""
    if device == "CPU" and AVAILABLE:
        return
    _lib.impl(name, fn, device)


def status() -> dict:
    """{"available": bool, "why_not": str or None, "library": path of _C or None, "isa": the instruction set its
    row kernels were registered for (avx512 | avx2 | base) or None}: what serves the CPU."""
    path = isa = None
    if AVAILABLE:
        mod = importlib.import_module(f"{__package__}._C")
        path, isa = getattr(mod, "__file__", None), getattr(mod, "ISA", None)
    return {"available": AVAILABLE, "why_not": WHY_NOT, "library": path, "isa": isa}
