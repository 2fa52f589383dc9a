"""The one-row token kernel of the clip objective: one program per row of a [C, V] logits tile reduces the row to its
log-prob, forms the row's loss terms and, while the row is in memory, overwrites it with dJ/dz. The op is
``exgrpo_native::grpo_token_rows_`` (schema: ``_native.SCHEMAS``): Triton on CUDA (here), C++ on the CPU
(``csrc/rows_ops.h``), and the torch twin below where the C++ library is not built.

    grpo_token_rows_(z [C, V], t [C], sid [C], adv [S], w_seq [S], seq_isw [S]?, old [C]?, ref [C]?, gen [C]?,
                     ext [C]?, inv_tau, pre, cap, eps_low, eps_high, delta (0 = none), beta, is_cap, kl_est (1..3),
                     is_mode (0 off, 1 token_truncate, 2 precomputed seq_isw), with_entropy, compute_grad)
        -> (logp, ratio, kl, entropy or [0], j): [C] fp32
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _native
from .._rows import LogitTransform, block_v, chunk_grad_, chunk_stats, num_warps, row_grad, row_stats
from .config import GRPOLossConfig
from .losses import policy_terms

IS_MODES = ("off", "token_truncate", "sequence_truncate")  # the kernels' is_mode 0, 1, 2


@triton.jit
def _grpo_token_kernel(Z, stride_z, T, SEQ, ADV, SEQ_W, SEQ_ISW, OLD, REF, GEN, EXT,
                       LOGP, RATIO, KL, ENT, J, V, inv_tau, pre, cap, eps_low, eps_high, delta, beta, is_cap,
                       HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_EXT: tl.constexpr,
                       KL_EST: tl.constexpr, IS_MODE: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                       COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, HAS_CAP: tl.constexpr):
    # l = log softmax(z')[t], z' = soft_cap(pre x) / tau;  rho = exp(l - l_old);  A = ADV[seq];  w = SEQ_W[seq]
    # pg = -min(rho_u A, clip(rho, 1 - eps_low, 1 + eps_high) A),  rho_u = min(rho, delta) if delta
    # J_t = w (isw ext pg + beta KL),  c = dJ_t / dl  (min: ties split the gradient; clamps pass it inclusively)
    # then, in place: dJ/dx = c (onehot - p) dz'/dx
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T + row)
    s = tl.load(SEQ + row)
    zrow = Z + row * stride_z
    lse, l, ent = row_stats(zrow, V, t, inv_tau, pre, cap, BLOCK_V, WITH_ENTROPY, HAS_CAP)
    adv = tl.load(ADV + s).to(tl.float32)
    w = tl.load(SEQ_W + s)
    if HAS_OLD:
        old = tl.load(OLD + row).to(tl.float32)
    else:
        old = l
    rho = tl.exp(l - old)
    rho_c = tl.minimum(tl.maximum(rho, 1.0 - eps_low), 1.0 + eps_high)
    d_c = tl.where((rho >= 1.0 - eps_low) & (rho <= 1.0 + eps_high), rho, 0.0)
    if HAS_DELTA:
        rho_u = tl.minimum(rho, delta)
        d_u = tl.where(rho <= delta, rho, 0.0)
    else:
        rho_u = rho
        d_u = rho
    t1 = rho_u * adv
    t2 = rho_c * adv
    pg = -tl.minimum(t1, t2)
    dpg = tl.where(t1 < t2, -adv * d_u, tl.where(t2 < t1, -adv * d_c, -adv * 0.5 * (d_u + d_c)))
    isw = 1.0
    if IS_MODE == 1:
        isw = tl.minimum(tl.exp(old - tl.load(GEN + row).to(tl.float32)), is_cap)
    if IS_MODE == 2:
        isw = tl.load(SEQ_ISW + s)
    if HAS_EXT:
        isw = isw * tl.load(EXT + row).to(tl.float32)
    kl = 0.0
    dkl = 0.0
    if HAS_REF:
        d = tl.load(REF + row).to(tl.float32) - l
        if KL_EST == 1:
            kl = -d
            dkl = 1.0
        if KL_EST == 2:
            kl = 0.5 * d * d
            dkl = -d
        if KL_EST == 3:
            ed = tl.exp(d)
            kl = ed - d - 1.0
            dkl = 1.0 - ed
    tl.store(LOGP + row, l)
    tl.store(RATIO + row, rho)
    tl.store(KL + row, kl)
    tl.store(J + row, w * (isw * pg + beta * kl))
    if WITH_ENTROPY:
        tl.store(ENT + row, ent)
    if COMPUTE_GRAD:
        c = w * (isw * dpg + beta * dkl)
        row_grad(zrow, zrow, V, 0, t, inv_tau, pre, cap, lse, ent, c, 0.0, BLOCK_V, False, HAS_CAP)


def policy_args(cfg: GRPOLossConfig, is_mode: int) -> dict:
    """The token kernel's policy scalars for a clip-objective config, by the op's argument names."""
    return dict(eps_low=float(cfg.eps_low), eps_high=float(cfg.eps_high), delta=float(cfg.delta or 0.0),
                beta=float(cfg.beta), is_cap=float(cfg.gen_correction_cap), kl_est=int(cfg.kl_estimator[1]),
                is_mode=is_mode)


def token_rows_triton(z, t, sid, adv, w_seq, seq_isw, old, ref, gen, ext, inv_tau: float, pre: float, cap: float,
                      eps_low: float, eps_high: float, delta: float, beta: float, is_cap: float, kl_est: int,
                      is_mode: int, with_entropy: bool, compute_grad: bool):
    C, V = z.shape
    f = lambda n: torch.full((n,), float("nan"), dtype=torch.float32, device=z.device)  # noqa: E731
    logp, ratio, kl, jt, ent = f(C), f(C), f(C), f(C), f(C if with_entropy else 0)
    bv = block_v(V)
    dummy = logp
    _grpo_token_kernel[(C,)](
        z, z.stride(0), t, sid, adv, w_seq, dummy if seq_isw is None else seq_isw,
        dummy if old is None else old, dummy if ref is None else ref, dummy if gen is None else gen,
        dummy if ext is None else ext, logp, ratio, kl, ent if with_entropy else dummy, jt, V, inv_tau, pre, cap,
        eps_low, eps_high, delta, beta, is_cap,
        HAS_OLD=old is not None, HAS_REF=ref is not None, HAS_DELTA=delta > 0, HAS_EXT=ext is not None,
        KL_EST=kl_est, IS_MODE=is_mode, WITH_ENTROPY=with_entropy,
        COMPUTE_GRAD=compute_grad, BLOCK_V=bv, HAS_CAP=cap > 0, num_warps=num_warps(bv))
    return logp, ratio, kl, ent, jt


def token_rows_twin(z, t, sid, adv, w_seq, seq_isw, old, ref, gen, ext, inv_tau: float, pre: float, cap: float,
                    eps_low: float, eps_high: float, delta: float, beta: float, is_cap: float, kl_est: int,
                    is_mode: int, with_entropy: bool, compute_grad: bool):
    """The op in torch: the row kernels' statistics, ``losses.policy_terms``, the row kernels' gradient."""
    xf = LogitTransform(inv_tau, pre, cap or None)
    cfg = GRPOLossConfig(eps_low=eps_low, eps_high=eps_high, delta=delta or None, beta=beta, gen_correction_cap=is_cap,
                         kl_estimator=f"k{kl_est}", gen_correction=IS_MODES[is_mode])
    lp, lse, en = chunk_stats(z, t, xf, with_entropy, "torch")
    terms, c, _ = policy_terms(lp, old=old, ref=ref, gen=gen, ext=ext, ext_seq=None, adv_seq=adv, w_seq=w_seq,
                            seq_ids=sid, cfg=cfg, isw=None if is_mode != 2 else seq_isw[sid], need_grad=compute_grad)
    if compute_grad:
        chunk_grad_(z, t, lse, None, c, None, xf, "torch")
    return lp, terms["ratio"], terms["kl"], (en if with_entropy else lp.new_empty(0)), terms["j"]


_native.register("grpo_token_rows_", "CUDA", token_rows_triton)
_native.register("grpo_token_rows_", "CPU", token_rows_twin)
