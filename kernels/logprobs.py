"""Per-token log-probs (and entropy) straight from hidden states and the lm_head weight.

``fused_linear_logprobs`` never holds the [N, V] logits: it walks token chunks, computes one
[chunk, V] logits tile with a GEMM, reduces it with a Triton row kernel (online log-sum-exp in
fp32) and drops it. The backward recomputes each tile and turns it, in place, into the gradient
of the logits, which two GEMMs take to grad-hidden and grad-weight (fp32 accumulation).

This file also holds the row kernels (``_row_stats``, ``_row_grad``) that the GRPO loss reuses,
their torch twins (the CPU path), and ``logprobs_reference``, the plain-torch definition.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import (
    IGNORE_INDEX,
    acc_dtype,
    addmm_fp32_,
    auto_chunk,
    check_hidden_weight_targets,
    matmul_dtype,
    mm,
    resolve_backend,
    tile_budget,
)

# ----------------------------------------------------------------------------------------------
# Triton: row kernels over a [rows, V] logits tile
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_stats(z_ptr, V, target, inv_tau, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    # z' = z / tau (fp32).  Online over blocks of the row:
    #   m = max z',  s = sum exp(z' - m),  a = sum exp(z' - m) z'
    #   lse = m + log s,   l = z'[target] - lse,   H = lse - a / s   (= -sum p log p)
    m = float("-inf")
    s = 0.0
    a = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_tau
        m_new = tl.maximum(m, tl.max(z, 0))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * scale + tl.sum(e, 0)
        if WITH_ENTROPY:
            a = a * scale + tl.sum(e * tl.where(e > 0, z, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    zt = tl.load(z_ptr + target).to(tl.float32) * inv_tau
    ent = lse - a / s
    return lse, zt - lse, ent


@triton.jit
def _row_grad(z_ptr, g_ptr, V, col0, target, inv_tau, lse, ent, c_l, c_h,
              BLOCK_V: tl.constexpr, WITH_ENT_GRAD: tl.constexpr):
    # p_j = exp(z'_j - lse).  With upstream c_l on l and c_h on H:
    #   dJ/dz_j = (c_l (1[j = target] - p_j) - c_h p_j (log p_j + H)) / tau
    # Columns j = col0 + local index (col0 > 0 when the tile is a vocabulary slab). g may alias z.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        msk = cols < V
        zs = tl.load(z_ptr + cols, mask=msk, other=0.0).to(tl.float32) * inv_tau
        logp = zs - lse
        p = tl.exp(logp)
        g = c_l * (tl.where(cols + col0 == target, 1.0, 0.0) - p)
        if WITH_ENT_GRAD:
            g -= c_h * p * tl.where(p > 0, logp + ent, 0.0)
        tl.store(g_ptr + cols, (g * inv_tau).to(g_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _logprob_fwd_kernel(Z, stride_z, T, LOGP, LSE, ENT, V, inv_tau,
                        BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T + row)
    valid = t != -100
    lse, l, ent = _row_stats(Z + row * stride_z, V, tl.where(valid, t, 0), inv_tau, BLOCK_V, WITH_ENTROPY)
    tl.store(LOGP + row, tl.where(valid, l, 0.0))
    tl.store(LSE + row, lse)
    if WITH_ENTROPY:
        tl.store(ENT + row, ent)


@triton.jit
def _logprob_bwd_kernel(Z, stride_z, G, stride_g, T, LSE, ENT, GL, GH, V, col0, inv_tau,
                        BLOCK_V: tl.constexpr, WITH_ENT_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T + row)
    c_l = tl.where(t != -100, tl.load(GL + row), 0.0)
    c_h = 0.0
    ent = 0.0
    if WITH_ENT_GRAD:
        c_h = tl.load(GH + row)
        ent = tl.load(ENT + row)
    _row_grad(Z + row * stride_z, G + row * stride_g, V, col0, t, inv_tau, tl.load(LSE + row), ent,
              c_l, c_h, BLOCK_V, WITH_ENT_GRAD)


def _block_v(V: int) -> int:
    return int(min(8192, triton.next_power_of_2(V)))


def _num_warps(block_v: int) -> int:
    return 16 if block_v >= 8192 else (8 if block_v >= 2048 else 4)


# ----------------------------------------------------------------------------------------------
# Chunk-level operations, one per backend (triton: the kernels above; torch: the CPU twin)
# ----------------------------------------------------------------------------------------------


def chunk_stats(z: torch.Tensor, t: torch.Tensor, inv_tau: float, with_entropy: bool, backend: str):
    """Row statistics of a logits tile. z [C, V] any float dtype, t [C] int64 (-100 = no target).

    Returns (logp [C] fp32, 0 where t == -100; lse [C] fp32; entropy [C] fp32 or None).
    """
    C, V = z.shape
    if backend == "triton":
        logp = torch.full((C,), float("nan"), dtype=torch.float32, device=z.device)
        lse = torch.full((C,), float("nan"), dtype=torch.float32, device=z.device)
        ent = torch.full((C,), float("nan"), dtype=torch.float32, device=z.device) if with_entropy else lse
        bv = _block_v(V)
        _logprob_fwd_kernel[(C,)](z, z.stride(0), t, logp, lse, ent, V, inv_tau,
                                  BLOCK_V=bv, WITH_ENTROPY=with_entropy, num_warps=_num_warps(bv))
        return logp, lse, (ent if with_entropy else None)
    zs = z.float() * inv_tau
    lse = torch.logsumexp(zs, dim=-1)
    valid = t != IGNORE_INDEX
    zt = zs.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
    logp = torch.where(valid, zt - lse, 0.0)
    ent = None
    if with_entropy:
        p = torch.exp(zs - lse.unsqueeze(1))
        ent = lse - torch.where(p > 0, p * zs, 0.0).sum(-1)
    return logp, lse, ent


def chunk_grad_(z: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor | None,
                c_l: torch.Tensor, c_h: torch.Tensor | None, inv_tau: float, backend: str,
                col0: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of J with respect to the logits tile z [C, Vs] (columns col0 .. col0+Vs of the vocabulary).

    dJ/dz = (c_l (onehot(t) - p) - c_h p (log p + H)) / tau, p = softmax(z / tau) with the full-row lse [C].
    c_l [C] fp32 (ignored where t == -100), c_h [C] fp32 or None (no entropy gradient).
    Written into ``out`` (default: z itself, in place) and returned.
    """
    out = z if out is None else out
    C, V = z.shape
    with_h = c_h is not None
    if backend == "triton":
        bv = _block_v(V)
        _logprob_bwd_kernel[(C,)](z, z.stride(0), out, out.stride(0), t, lse, ent if with_h else lse, c_l,
                                  c_h if with_h else c_l, V, col0, inv_tau,
                                  BLOCK_V=bv, WITH_ENT_GRAD=with_h, num_warps=_num_warps(bv))
        return out
    # torch twin, in place on an fp32 buffer (the CPU path): a few passes over the tile
    buf = z if (out is z and z.dtype == torch.float32) else z.float()
    if inv_tau != 1.0:
        buf.mul_(inv_tau)
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
    if inv_tau != 1.0:
        buf.mul_(inv_tau)
    if out is not buf:
        out.copy_(buf)
    return out


# ----------------------------------------------------------------------------------------------
# autograd Function
# ----------------------------------------------------------------------------------------------


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_tau, with_entropy, chunk, fp32_logits, backend):
        N = hidden.shape[0]
        mdt = matmul_dtype(hidden)
        w = weight.to(mdt)
        zdt = torch.float32 if fp32_logits else mdt
        logp = torch.full((N,), float("nan"), dtype=torch.float32, device=hidden.device)
        lse = torch.full_like(logp, float("nan"))
        ent = torch.full_like(logp, float("nan")) if with_entropy else None
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            z = mm(hidden[s:e].to(mdt), w.t(), out_dtype=zdt)
            lp, ls, en = chunk_stats(z, targets[s:e], inv_tau, with_entropy, backend)
            logp[s:e], lse[s:e] = lp, ls
            if with_entropy:
                ent[s:e] = en
        ctx.save_for_backward(hidden, weight, targets, lse, ent if with_entropy else lse)
        ctx.cfg = (inv_tau, with_entropy, chunk, fp32_logits, backend)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        inv_tau, with_entropy, chunk, fp32_logits, backend = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, H = hidden.shape
        mdt = matmul_dtype(hidden)
        w = weight.to(mdt)
        zdt = torch.float32 if fp32_logits else mdt
        c_l = torch.zeros(N, dtype=torch.float32, device=hidden.device) if grad_logp is None else grad_logp.float()
        c_h = grad_ent.float() if (with_entropy and grad_ent is not None) else None
        gh = torch.full_like(hidden, float("nan")) if need_h else None
        gw = torch.zeros(weight.shape, dtype=acc_dtype(weight), device=weight.device) if need_w else None
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            hc = hidden[s:e].to(mdt)
            z = mm(hc, w.t(), out_dtype=zdt)
            g = z if z.dtype == mdt else torch.empty(z.shape, dtype=mdt, device=z.device)
            chunk_grad_(z, targets[s:e], lse[s:e], ent[s:e] if c_h is not None else None, c_l[s:e],
                        None if c_h is None else c_h[s:e], inv_tau, backend, out=g)
            if need_h:
                gh[s:e] = mm(g, w).to(hidden.dtype)
            if need_w:
                addmm_fp32_(gw, g.t(), hc)
        return gh, (gw.to(weight.dtype) if need_w else None), None, None, None, None, None, None


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          temperature: float = 1.0, return_entropy: bool = False, chunk_size: int | None = None,
                          fp32_logits: bool = False, backend: str = "auto"):
    """log softmax(hidden @ weight.T / temperature)[targets], without the [N, V] logits.

    Args:
        hidden: [N, H] bf16/fp16/fp32 (tokens flattened: padded or packed).
        weight: [V, H], same dtype and device as hidden (the lm_head).
        targets: [N] int64/int32, the next token of each position; -100 = no target (log-prob 0, no gradient).
        temperature: the sampling temperature tau (> 0); logits are divided by it before the softmax.
        return_entropy: also return the entropy of softmax(logits / tau) per row (differentiable).
        chunk_size: rows per logits tile; default keeps a tile near 512 MiB (CUDA) / 64 MiB (CPU).
        fp32_logits: compute the logits tile in fp32 (CUDA: fp32 GEMM output from bf16 operands).
        backend: "auto" (Triton on CUDA, chunked torch on the CPU), "triton" or "torch".

    Returns:
        logp [N] fp32, or (logp [N] fp32, entropy [N] fp32) if return_entropy. Differentiable with
        respect to hidden and weight (log-sum-exp and log-probs accumulate in fp32).
    """
    check_hidden_weight_targets(hidden, weight, targets)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    be = resolve_backend(backend, hidden.device)
    V = weight.shape[0]
    if chunk_size is None:
        chunk_size = auto_chunk(V, 4 if (fp32_logits or not hidden.is_cuda) else hidden.element_size(),
                                tile_budget(hidden.device), 16, 4096)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    logp, ent = _FusedLinearLogprobs.apply(hidden, weight, targets.long(), 1.0 / float(temperature),
                                           bool(return_entropy), int(chunk_size), bool(fp32_logits), be)
    return (logp, ent) if return_entropy else logp


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                       temperature: float = 1.0, return_entropy: bool = False, logits_dtype=None):
    """Plain torch: full [N, V] logits (in ``logits_dtype``, default hidden's), log-softmax in
    max(fp32, hidden dtype). Pass float64 tensors for a float64 ground truth."""
    z = hidden @ weight.t()
    if logits_dtype is not None:
        z = z.to(logits_dtype)
    z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
    lsm = torch.log_softmax(z, dim=-1)
    valid = targets != IGNORE_INDEX
    logp = torch.where(valid, lsm.gather(1, torch.where(valid, targets, 0).long().unsqueeze(1)).squeeze(1), 0.0)
    if not return_entropy:
        return logp
    ent = -(lsm.exp() * lsm).sum(-1)
    return logp, ent
