"""Row kernels over a [rows, V] logits tile, shared by every op of the package, and their torch twins.

In-package interface (the ops import these names; users call the public functions of the op files):

* ``row_stats`` / ``row_grad``: Triton device functions (one row, online over ``BLOCK_V`` columns).
* ``chunk_stats(z, t, ...)``: log-prob, log-sum-exp and entropy of each row of a tile.
* ``chunk_grad_(z, t, lse, ...)``: the tile turned into the gradient of the logits (in place by default).
* ``block_v(V)``, ``num_warps(block)``: launch sizes; ``MAX_BLOCK_V`` caps the block (tests lower it so that a
  small vocabulary spans several blocks under the interpreter; ``$EXGRPO_MAX_BLOCK_V`` sets it too,
  ``$EXGRPO_ROW_WARPS`` the warps: bench/tune_rows.py measures both).
* ``chunk_rows(...)``: rows per [chunk, V] logits tile.
* ``Tiles``: the GEMM side of a fused op: the [chunk, V] logits tile of a row range, and the grad-hidden /
  grad-weight GEMMs of its gradient (fp32 accumulation of grad-weight).

Each chunk op has a ``backend`` argument: "triton" runs the kernels, "native" the exgrpo_native op (the C++ kernels
of csrc/ on the CPU), "torch" the twin (the CPU path where the C++ library is not built).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _native
from ._utils import IGNORE_INDEX, acc_dtype, addmm_fp32_, mm

# H100 (bench/tune_rows.py, 2026-11-26, [1024, 151936] bf16 tile): BLOCK_V 4096 with 16 warps was the fastest sum of
# the statistics, gradient and GRPO token kernels; see bench/NOTES.md
MAX_BLOCK_V = int(os.environ.get("EXGRPO_MAX_BLOCK_V", "4096"))
ROW_WARPS = int(os.environ.get("EXGRPO_ROW_WARPS", "0"))  # 0: by block size


def block_v(V: int) -> int:
    return int(min(MAX_BLOCK_V, triton.next_power_of_2(V)))


def num_warps(block: int) -> int:
    if ROW_WARPS:
        return ROW_WARPS
    return 16 if block >= 4096 else (8 if block >= 2048 else 4)


# ----------------------------------------------------------------------------------------------
# Triton device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def logit_transform(x, pre, cap, inv_tau, HAS_CAP: tl.constexpr):
    # raw logit x (GEMM output, bias included) -> z' = soft_cap(pre * x) / tau,  soft_cap(y) = cap tanh(y / cap)
    y = x * pre
    if HAS_CAP:
        y = cap * (2.0 / (1.0 + tl.exp(-2.0 * y / cap)) - 1.0)  # tanh(v) = 2 sigmoid(2v) - 1
    return y * inv_tau


@triton.jit
def logit_transform_grad(x, pre, cap, inv_tau, HAS_CAP: tl.constexpr):
    # dz'/dx = pre (1 - tanh^2(pre x / cap)) / tau   (without the cap: pre / tau)
    d = pre * inv_tau
    if HAS_CAP:
        t = 2.0 / (1.0 + tl.exp(-2.0 * x * pre / cap)) - 1.0
        d = d * (1.0 - t * t)
    return d


@triton.jit
def row_stats(z_ptr, V, target, inv_tau, pre, cap, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
              HAS_CAP: tl.constexpr):
    # z' = transform(x) (fp32).  Online, per lane j of the block (no cross-lane reduction inside the loop):
    #   m_j = max z',  s_j = sum exp(z' - m_j),  a_j = sum exp(z' - m_j) z'
    # then across lanes, with M = max_j m_j and w_j = exp(m_j - M):
    #   lse = M + log sum_j s_j w_j,   l = z'[target] - lse,   H = lse - (sum_j a_j w_j) / (sum_j s_j w_j)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    a = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        msk = cols < V
        x = tl.load(z_ptr + cols, mask=msk, other=0.0).to(tl.float32)
        z = tl.where(msk, logit_transform(x, pre, cap, inv_tau, HAS_CAP), float("-inf"))
        m_new = tl.maximum(m, z)
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # a lane with no column yet: every exp below is 0
        scale = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref)
        s = s * scale + e
        if WITH_ENTROPY:
            a = a * scale + e * tl.where(e > 0, z, 0.0)
        m = m_new
    M = tl.max(m, 0)
    w = tl.exp(m - M)
    S = tl.sum(s * w, 0)
    lse = M + tl.log(S)
    zt = logit_transform(tl.load(z_ptr + target).to(tl.float32), pre, cap, inv_tau, HAS_CAP)
    ent = lse - tl.sum(a * w, 0) / S
    return lse, zt - lse, ent


@triton.jit
def row_grad(z_ptr, g_ptr, V, col0, target, inv_tau, pre, cap, lse, ent, c_l, c_h,
             BLOCK_V: tl.constexpr, WITH_ENT_GRAD: tl.constexpr, HAS_CAP: tl.constexpr):
    # p_j = exp(z'_j - lse).  With upstream c_l on l and c_h on H:
    #   dJ/dz'_j = c_l (1[j = target] - p_j) - c_h p_j (log p_j + H),   dJ/dx_j = dJ/dz'_j dz'_j/dx_j
    # Columns j = col0 + local index (col0 > 0 when the tile is a vocabulary slab). g may alias z.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        msk = cols < V
        x = tl.load(z_ptr + cols, mask=msk, other=0.0).to(tl.float32)
        logp = logit_transform(x, pre, cap, inv_tau, HAS_CAP) - lse
        p = tl.exp(logp)
        g = c_l * (tl.where(cols + col0 == target, 1.0, 0.0) - p)
        if WITH_ENT_GRAD:
            g -= c_h * p * tl.where(p > 0, logp + ent, 0.0)
        g = g * logit_transform_grad(x, pre, cap, inv_tau, HAS_CAP)
        tl.store(g_ptr + cols, g.to(g_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _stats_kernel(Z, stride_z, T, LOGP, LSE, ENT, V, inv_tau, pre, cap, BLOCK_V: tl.constexpr,
                  WITH_ENTROPY: tl.constexpr, HAS_CAP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T + row)
    valid = t != -100
    lse, l, ent = row_stats(Z + row * stride_z, V, tl.where(valid, t, 0), inv_tau, pre, cap, BLOCK_V, WITH_ENTROPY,
                            HAS_CAP)
    tl.store(LOGP + row, tl.where(valid, l, 0.0))
    tl.store(LSE + row, lse)
    if WITH_ENTROPY:
        tl.store(ENT + row, ent)


@triton.jit
def _grad_kernel(Z, stride_z, G, stride_g, T, LSE, ENT, GL, GH, V, col0, inv_tau, pre, cap,
                 BLOCK_V: tl.constexpr, WITH_ENT_GRAD: tl.constexpr, HAS_CAP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T + row)
    c_l = tl.where(t != -100, tl.load(GL + row), 0.0)
    c_h = 0.0
    ent = 0.0
    if WITH_ENT_GRAD:
        c_h = tl.load(GH + row)
        ent = tl.load(ENT + row)
    row_grad(Z + row * stride_z, G + row * stride_g, V, col0, t, inv_tau, pre, cap, tl.load(LSE + row), ent,
             c_l, c_h, BLOCK_V, WITH_ENT_GRAD, HAS_CAP)


# ----------------------------------------------------------------------------------------------
# Chunk-level operations, one per backend (triton: the kernels above; torch: the CPU twin)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitTransform:
    """What turns a GEMM output x (h W^T + b) into the logits the softmax sees: z = soft_cap(scale x) / tau,
    soft_cap(y) = softcap tanh(y / softcap) (Gemma-2/3 ``final_logit_softcapping``; None = off), scale: Cohere's
    ``logit_scale`` (and the multipliers of other families)."""

    inv_tau: float = 1.0
    scale: float = 1.0
    softcap: float | None = None

    @property
    def args(self):
        return float(self.inv_tau), float(self.scale), float(self.softcap or 0.0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """torch: z [.., V] fp32 from x."""
        y = x.float() * self.scale if self.scale != 1.0 else x.float()
        if self.softcap:
            y = self.softcap * torch.tanh(y / self.softcap)
        return y * self.inv_tau if self.inv_tau != 1.0 else y


def _check_rows(name: str, x: torch.Tensor, C: int) -> None:
    # the kernels read 1-D inputs as base + row: a strided or expanded vector would be read wrongly
    if x.shape != (C,) or (C > 1 and x.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous [{C}] vector, got shape {tuple(x.shape)} strides {x.stride()}")


def chunk_stats(z: torch.Tensor, t: torch.Tensor, xf: LogitTransform, with_entropy: bool, backend: str):
    """Row statistics of a logits tile. z [C, V] any float dtype (raw GEMM output; rows may be strided, columns
    contiguous), t [C] int64 contiguous (-100 = no target), xf the logit transform (temperature etc.).
    backend: "triton", "native" (the exgrpo_native::row_stats op: C++ on the CPU) or "torch" (the twin).

    Returns (logp [C] fp32, 0 where t == -100; lse [C] fp32; entropy [C] fp32 or None).
    """
    if backend == "torch":
        return _stats_torch(z, t, xf, with_entropy)
    _check_rows("t", t, z.shape[0])
    fn = _stats_triton if backend == "triton" else _native.ops.row_stats
    logp, lse, ent = fn(z, t, *xf.args, with_entropy)
    return logp, lse, (ent if with_entropy else None)


def chunk_grad_(z: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor | None,
                c_l: torch.Tensor, c_h: torch.Tensor | None, xf: LogitTransform, backend: str,
                col0: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of J with respect to the raw logits tile z [C, Vs] (columns col0 .. col0+Vs of the vocabulary).

    dJ/dz' = c_l (onehot(t) - p) - c_h p (log p + H), p = softmax(z'), z' = xf(z) with the full-row lse [C];
    dJ/dz = dJ/dz' * dz'/dz. c_l [C] fp32 (ignored where t == -100), c_h [C] fp32 or None (no entropy
    gradient); all [C] vectors contiguous. Written into ``out`` (default: z itself, in place) and returned.
    """
    out = z if out is None else out
    if backend == "torch":
        return _grad_torch(z, t, lse, ent, c_l, c_h, xf, col0, out)
    C = z.shape[0]
    for name, x in (("t", t), ("lse", lse), ("c_l", c_l)) + ((("ent", ent), ("c_h", c_h)) if c_h is not None else ()):
        _check_rows(name, x, C)
    fn = _grad_triton if backend == "triton" else _native.ops.row_grad_
    fn(z, t, lse, ent if c_h is not None else None, c_l, c_h, *xf.args, col0, out)
    return out


# the op implementations (signatures: kernels/_native.py SCHEMAS). CUDA and, under the interpreter, the CPU: Triton


def _stats_triton(z, t, inv_tau: float, pre: float, cap: float, with_entropy: bool):
    C, V = z.shape
    assert z.stride(1) == 1
    logp = torch.full((C,), float("nan"), dtype=torch.float32, device=z.device)
    lse = torch.full((C,), float("nan"), dtype=torch.float32, device=z.device)
    ent = torch.full((C,), float("nan"), dtype=torch.float32, device=z.device) if with_entropy else lse.new_empty(0)
    bv = block_v(V)
    _stats_kernel[(C,)](z, z.stride(0), t, logp, lse, ent if with_entropy else lse, V, inv_tau, pre, cap,
                        BLOCK_V=bv, WITH_ENTROPY=with_entropy, HAS_CAP=cap > 0, num_warps=num_warps(bv))
    return logp, lse, ent


def _grad_triton(z, t, lse, ent, c_l, c_h, inv_tau: float, pre: float, cap: float, col0: int, out) -> None:
    C, V = z.shape
    with_h = c_h is not None
    bv = block_v(V)
    _grad_kernel[(C,)](z, z.stride(0), out, out.stride(0), t, lse, ent if with_h else lse, c_l,
                       c_h if with_h else c_l, V, col0, inv_tau, pre, cap,
                       BLOCK_V=bv, WITH_ENT_GRAD=with_h, HAS_CAP=cap > 0, num_warps=num_warps(bv))


# the torch twins: the CPU implementations where the C++ library is not built, and backend="torch"


def _stats_torch(z, t, xf: LogitTransform, with_entropy: bool):
    zs = xf.apply(z)
    lse = torch.logsumexp(zs, dim=-1)
    valid = t != IGNORE_INDEX
    zt = zs.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
    logp = torch.where(valid, zt - lse, 0.0)
    ent = None
    if with_entropy:
        p = torch.exp(zs - lse.unsqueeze(1))
        ent = lse - torch.where(p > 0, p * zs, 0.0).sum(-1)
    return logp, lse, ent


def _grad_torch(z, t, lse, ent, c_l, c_h, xf: LogitTransform, col0: int, out):
    """In place on an fp32 buffer: a few passes over the tile."""
    C, V = z.shape
    with_h = c_h is not None
    buf = z if (out is z and z.dtype == torch.float32) else z.to(torch.float32, copy=True)  # z stays unchanged
    dz = None  # dz'/dz where it is not a constant
    if xf.scale != 1.0:
        buf.mul_(xf.scale)
    if xf.softcap:
        th = torch.tanh(buf / xf.softcap)
        dz = 1.0 - th * th
        torch.mul(th, xf.softcap, out=buf)
    if xf.inv_tau != 1.0:
        buf.mul_(xf.inv_tau)
    buf.sub_(lse.unsqueeze(1))  # log p
    q = None
    if with_h:
        q = buf + ent.unsqueeze(1)  # log p + H
    buf.exp_()  # p
    if with_h:
        q = torch.where(buf > 0, q * buf, 0.0).mul_(c_h.unsqueeze(1))  # c_h p (log p + H)
    valid = t != IGNORE_INDEX
    cl = torch.where(valid, c_l, 0.0)
    buf.mul_(-cl.unsqueeze(1))
    local = t - col0
    hit = valid & (local >= 0) & (local < V)
    rows = hit.nonzero().squeeze(1)
    buf[rows, local[rows]] += cl[rows]
    if with_h:
        buf.sub_(q)
    k = xf.inv_tau * xf.scale
    if k != 1.0:
        buf.mul_(k)
    if dz is not None:
        buf.mul_(dz)
    if out is not buf:
        out.copy_(buf)
    return out


def _stats_twin_op(z, t, inv_tau, pre, cap, with_entropy):
    logp, lse, ent = _stats_torch(z, t, LogitTransform(inv_tau, pre, cap or None), with_entropy)
    return logp, lse, (ent if with_entropy else logp.new_empty(0))


def _grad_twin_op(z, t, lse, ent, c_l, c_h, inv_tau, pre, cap, col0, out) -> None:
    _grad_torch(z, t, lse, ent, c_l, c_h, LogitTransform(inv_tau, pre, cap or None), col0, out)


_native.register("row_stats", "CUDA", _stats_triton)
_native.register("row_grad_", "CUDA", _grad_triton)
_native.register("row_stats", "CPU", _stats_twin_op)
_native.register("row_grad_", "CPU", _grad_twin_op)


# ----------------------------------------------------------------------------------------------
# The GEMM side of a fused op
# ----------------------------------------------------------------------------------------------


def chunk_rows(V: int, H: int, zdt: torch.dtype, device: torch.device, accumulate_weight: bool) -> int:
    """Rows per logits tile. CUDA: with an fp32 grad-weight accumulator, tiles up to half its size (each tile's
    grad-weight GEMM reads and writes the [V, H] fp32 accumulator once, so fewer, larger tiles move fewer bytes,
    and a tile of half the accumulator adds nothing to the peak of the final fp32 -> weight-dtype cast);
    otherwise 256 MiB tiles (log-prob passes, frozen head: the tile is the peak). CPU: 64 MiB tiles."""
    row = V * zdt.itemsize
    if device.type != "cuda":
        budget, hi = 64 << 20, 4096
    elif accumulate_weight:
        budget, hi = max(512 << 20, V * H * 2), 4096
    else:
        budget, hi = 256 << 20, 4096
    c = 1 << max(0, int(budget // max(1, row)).bit_length() - 1)
    return int(min(hi, max(16, c)))


class Tiles:
    """Logits tiles of the rows of ``h`` [n, H] against ``weight`` [V, H] (+ ``bias`` [V]) in the GEMM dtype
    ``mdt`` (logits in ``zdt``), and the gradient GEMMs of a tile's gradient g:

        z = h[s:e] W^T (+ b)            [C, V]   (1 GEMM)
        grad_h[s:e] = g W               [C, H]   (1 GEMM, written once per row)
        grad_W += g^T h[s:e]            [V, H]   (1 GEMM, accumulated in fp32: one rounding at the end)
        grad_b += sum_rows g            [V]      (fp32)

    ``grad_hidden`` is NaN-filled until written (poison: an unwritten row fails loudly)."""

    def __init__(self, h, weight, mdt, zdt, need_h: bool, need_w: bool, hidden_dtype, bias=None, need_b=False):
        self.h, self.mdt, self.zdt = h, mdt, zdt
        self.w = weight.to(mdt)
        self.b = None if bias is None else bias.to(zdt)
        n, H = h.shape
        self.grad_h = torch.full((n, H), float("nan"), dtype=hidden_dtype, device=h.device) if need_h else None
        self.need_w, self._w_shape, self._w_acc = need_w, weight.shape, acc_dtype(weight)
        self.grad_w = None  # the first tile's product creates it (no zero-fill + read when GEMMs run in fp32)
        self.grad_b = torch.zeros(bias.shape, dtype=acc_dtype(bias), device=h.device) if (need_b and bias is not None) else None

    @property
    def any_grad(self) -> bool:
        return self.grad_h is not None or self.need_w or self.grad_b is not None

    def logits(self, s: int, e: int):
        """(h chunk in mdt, z [C, V] in zdt, g: the buffer the tile's gradient goes to (z itself when it can))."""
        hc = self.h[s:e].to(self.mdt)
        z = mm(hc, self.w.t(), out_dtype=self.zdt)
        if self.b is not None:
            z.add_(self.b)
        g = z if z.dtype == self.mdt else torch.empty(z.shape, dtype=self.mdt, device=z.device)
        return hc, z, g

    def backprop(self, g, s: int, e: int, hc) -> None:
        if self.grad_h is not None:
            self.grad_h[s:e] = mm(g, self.w).to(self.grad_h.dtype)
        if self.need_w:
            if self.grad_w is None and g.dtype == self._w_acc:
                self.grad_w = mm(g.t(), hc)
            else:
                if self.grad_w is None:
                    self.grad_w = torch.zeros(self._w_shape, dtype=self._w_acc, device=hc.device)
                addmm_fp32_(self.grad_w, g.t(), hc)
        if self.grad_b is not None:
            self.grad_b += g.sum(0, dtype=self.grad_b.dtype)

    def weight_grads(self, weight, bias):
        """(grad_weight in weight's dtype or None, grad_bias in bias's dtype or None)."""
        if self.need_w and self.grad_w is None:  # no tile (no active row): a zero gradient
            self.grad_w = torch.zeros(self._w_shape, dtype=self._w_acc, device=weight.device)
        gw = None if self.grad_w is None else self.grad_w.to(weight.dtype)
        gb = None if self.grad_b is None else self.grad_b.to(bias.dtype)
        return gw, gb
