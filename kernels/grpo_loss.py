"""The GRPO policy loss straight from hidden states: log-probs, importance ratio, clipping, KL to the
reference policy, group advantages gathered per token, aggregation, forward and backward, without the
[N, V] logits.

Matmul counts (one = [N, H] x [H, V]); see ``docs/kernels.md``:
  * fast mode, token-level ratio: 3. Each [chunk, V] logits tile is reduced and turned into its own
    gradient by ``_grpo_token_kernel`` while it is in memory (the per-token gradient is known in the
    forward: every aggregation weight follows from the mask), then grad-hidden and grad-weight GEMMs;
    grad-weight accumulates in an fp32 [V, H] buffer.
  * sequence-level ratio (or sequence-level generator correction without old log-probs): 4. A first
    pass gets every log-prob, the per-sequence statistic, then a second pass recomputes the tiles (3 when every
    active row fits one tile: the second pass takes the first pass's tile).
  * low_memory mode: 4. The forward reduces tiles to log-probs; the backward walks vocabulary slabs
    (grad-weight of a slab is one full-K GEMM, written once), so there is no fp32 [V, H] buffer.
  * a weight that does not require grad: 2 (3 with the sequence-level ratio).
Rows that the loss does not cover (loss_mask 0, or target -100) are dropped before any GEMM.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _native
from ._rows import LogitTransform, Tiles, block_v, chunk_grad_, chunk_rows, chunk_stats, num_warps, row_grad, row_stats
from ._utils import (
    FLOAT_DTYPES,
    IGNORE_INDEX,
    INT_DTYPES,
    KERNEL_BACKENDS,
    acc_dtype,
    addmm_fp32_,
    auto_chunk,
    check_1d,
    check_head,
    check_hidden_weight_targets,
    dense_1d,
    gemm_dtype,
    mm,
    resolve_backend,
    scale_grads_,
    tile_budget,
)
from .logprobs import logprobs_reference

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
GEN_CORRECTIONS = ("off", "token_truncate", "sequence_truncate")
MEMORY_MODES = ("fast", "low_memory")


@dataclass(frozen=True)
class GRPOLossConfig:
    """Everything that defines the GRPO policy loss (docs/kernels.md, "The GRPO loss per token").

    loss_type: aggregation, "grpo" (mean over sequences of the per-sequence token mean), "bnpo" (token
        mean over the micro-batch), "dr_grpo" (token sum / (S * max_completion_length)), "dapo" (token
        sum / num_global_tokens, the masked tokens of the whole global batch). Default "dapo".
    importance_sampling: "token" (rho per token) or "sequence" (rho_i = exp(mean_t (l - l_old))).
    eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high]. Defaults 0.2, 0.2.
    delta: optional upper cap of rho in the unclipped term (two-sided clipping); None = off.
    beta, kl_estimator: KL(pi || pi_ref) weight and estimator (k1, k2, k3), d = l_ref - l. Default 0.04, k3.
    temperature: sampling temperature tau; log-probs are of softmax(logits / tau).
    max_completion_length: the constant denominator of "dr_grpo" (required there).
    gen_correction: truncated importance sampling between trainer and generator (vLLM) log-probs:
        "off", "token_truncate" (w_t = min(exp(l_old - l_gen), cap)) or "sequence_truncate"
        (w_i = min(exp(sum_t (l_old - l_gen)), cap)); w multiplies the clipped policy term. l_old is
        old_logp, or the current log-probs (detached) when old_logp is None.
    gen_correction_cap: the truncation cap C. Default 2.0.
    memory_mode: "fast" (fp32 [V, H] grad-weight accumulator, fewest GEMMs) or "low_memory".
    compute_entropy: also report the mean entropy (a metric; costs no GEMM).
    fp32_logits: compute the logits tiles in fp32 (CUDA).
    chunk_size: rows per logits tile (None = automatic: ``_rows.chunk_rows``; on CUDA with the fp32 grad-weight
        accumulator up to half its size, else 256 MiB; 64 MiB on the CPU).
    backend: "auto" (Triton on CUDA; on the CPU the C++ kernels where built, else chunked torch), "triton",
        "native", "torch".
    """

    loss_type: str = "dapo"
    importance_sampling: str = "token"
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None
    beta: float = 0.04
    kl_estimator: str = "k3"
    temperature: float = 1.0
    max_completion_length: int | None = None
    gen_correction: str = "off"
    gen_correction_cap: float = 2.0
    memory_mode: str = "fast"
    compute_entropy: bool = False
    fp32_logits: bool = False
    chunk_size: int | None = None
    backend: str = "auto"

    def __post_init__(self):
        for name, allowed in (("loss_type", LOSS_TYPES), ("importance_sampling", IMPORTANCE_LEVELS),
                              ("kl_estimator", KL_ESTIMATORS), ("gen_correction", GEN_CORRECTIONS),
                              ("memory_mode", MEMORY_MODES), ("backend", KERNEL_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GRPOLossConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0 <= self.eps_low < 1:
            raise ValueError(f"GRPOLossConfig.eps_low must be in [0, 1), got {self.eps_low}")
        if not self.eps_high >= 0:
            raise ValueError(f"GRPOLossConfig.eps_high must be >= 0, got {self.eps_high}")
        if self.delta is not None and not self.delta > 1:
            raise ValueError(f"GRPOLossConfig.delta must be > 1 or None, got {self.delta}")
        if not self.beta >= 0:
            raise ValueError(f"GRPOLossConfig.beta must be >= 0, got {self.beta}")
        if not self.temperature > 0:
            raise ValueError(f"GRPOLossConfig.temperature must be > 0, got {self.temperature}")
        if self.loss_type == "dr_grpo" and not (self.max_completion_length and self.max_completion_length > 0):
            raise ValueError(f"GRPOLossConfig.max_completion_length must be a positive int for loss_type='dr_grpo', "
                             f"got {self.max_completion_length!r}")
        if not self.gen_correction_cap > 0:
            raise ValueError(f"GRPOLossConfig.gen_correction_cap must be > 0, got {self.gen_correction_cap}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"GRPOLossConfig.chunk_size must be >= 1 or None, got {self.chunk_size}")

    def replace(self, **kw) -> GRPOLossConfig:
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------------------------
# Triton: one row of the token-level loss, fused with its logits tile
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# torch: per-token terms on [n] vectors (CPU path, and the sequence-level / low-memory paths)
# ----------------------------------------------------------------------------------------------


def _seq_mean(x: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    cnt = torch.bincount(seq_ids, minlength=num_seqs).clamp(min=1).to(x.dtype)
    return torch.zeros(num_seqs, dtype=x.dtype, device=x.device).index_add(0, seq_ids, x) / cnt


def _seq_sum(x: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    return torch.zeros(num_seqs, dtype=x.dtype, device=x.device).index_add(0, seq_ids, x)


def sequence_is_weights(old: torch.Tensor, gen: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int,
                        cap: float) -> torch.Tensor:
    """Sequence-level truncated IS weights [S]: min(exp(sum_t (l_old - l_gen)), cap)."""
    return torch.exp(_seq_sum((old - gen).float(), seq_ids, num_seqs)).clamp(max=cap)


def policy_terms(l: torch.Tensor, *, old, ref, gen, adv, w, seq_ids, num_seqs: int, cfg: GRPOLossConfig,
                 seq_isw: torch.Tensor | None = None, ext: torch.Tensor | None = None, need_grad: bool = True):
    """Per-token GRPO terms of the active tokens and c = dJ/dl, in closed form (what the Triton token kernel
    computes; the twin of its math, on [n] vectors).

    l, old, ref, gen, adv, w, ext: [n] fp32 (old/ref/gen/ext may be None); adv and w already gathered per token;
    ext: external importance weights multiplying the clipped policy term (TRL's vllm_is_ratio);
    seq_ids [n] int64 in [0, num_seqs). seq_isw: [S] precomputed sequence-level IS weights (optional).
    Returns ({j (weighted loss, sum = loss), kl, ratio}: [n] tensors, c [n] or None).

    Derivatives, with r the log-ratio (per token, or the sequence mean of l - l_old):
      pg = -min(rho_u A, clip(rho) A);  dpg/dr = -A rho_u' where the unclipped term is the min, -A clip' where
      the clipped one is, the mean of both on ties (torch.minimum's convention); clip' = rho inside the closed
      clip range, else 0; rho_u' = rho (rho <= delta, or no delta), else 0.
      token level: dJ/dl_t = w_t isw_t dpg_t/dr_t + w_t beta dKL_t/dl_t
      sequence level: dJ/dl_t = (1 / n_i) sum_{t' in i} w_t' isw_t' dpg_t'/dr_i + w_t beta dKL_t/dl_t
      dKL/dl: k1 1, k2 -(l_ref - l), k3 1 - exp(l_ref - l).
    """
    old_ = l if old is None else old
    if cfg.importance_sampling == "token":
        log_ratio = l - old_
    else:
        log_ratio = _seq_mean(l - old_, seq_ids, num_seqs)[seq_ids]
    rho = torch.exp(log_ratio)
    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    rho_c = torch.clamp(rho, lo, hi)
    rho_u = rho if cfg.delta is None else torch.clamp(rho, max=cfg.delta)
    t1, t2 = rho_u * adv, rho_c * adv
    pg = -torch.minimum(t1, t2)
    isw = torch.ones_like(l)
    if cfg.gen_correction == "token_truncate":
        isw = torch.exp(old_ - gen).clamp(max=cfg.gen_correction_cap)
    elif cfg.gen_correction == "sequence_truncate":
        if seq_isw is None:
            seq_isw = sequence_is_weights(old_, gen, seq_ids, num_seqs, cfg.gen_correction_cap)
        isw = seq_isw[seq_ids]
    if ext is not None:
        isw = isw * ext
    kl, dkl = torch.zeros_like(l), torch.zeros_like(l)
    if ref is not None:
        d = ref - l
        if cfg.kl_estimator == "k1":
            kl, dkl = -d, torch.ones_like(l)
        elif cfg.kl_estimator == "k2":
            kl, dkl = 0.5 * d * d, -d
        else:
            ed = torch.exp(d)
            kl, dkl = ed - d - 1, 1 - ed
    terms = {"j": w * (isw * pg + cfg.beta * kl), "kl": kl, "ratio": rho}
    if not need_grad:
        return terms, None
    d_c = torch.where((rho >= lo) & (rho <= hi), rho, 0.0)
    d_u = rho if cfg.delta is None else torch.where(rho <= cfg.delta, rho, 0.0)
    dpg = torch.where(t1 < t2, -adv * d_u, torch.where(t2 < t1, -adv * d_c, -adv * 0.5 * (d_u + d_c)))
    g_pg = w * isw * dpg
    if cfg.importance_sampling == "sequence":
        cnt = torch.bincount(seq_ids, minlength=num_seqs).clamp(min=1).to(l.dtype)
        g_pg = (_seq_sum(g_pg, seq_ids, num_seqs) / cnt)[seq_ids]
    return terms, g_pg + w * cfg.beta * dkl


def _terms_with_grad(l: torch.Tensor, need_grad: bool, **kw):
    """policy_terms on detached [n] vectors (cheap: no GEMM)."""
    return policy_terms(l.detach(), need_grad=need_grad, **kw)


def seq_weights(seq_ids: torch.Tensor, num_seqs: int, num_active: int, cfg: GRPOLossConfig,
                num_global_tokens, device) -> torch.Tensor:
    """Aggregation weight of each masked token of sequence i, [S] fp32 (loss = sum_t w[seq_t] L_t)."""
    if cfg.loss_type == "grpo":
        n = torch.bincount(seq_ids, minlength=num_seqs).clamp(min=1).float()
        return 1.0 / (num_seqs * n)
    if cfg.loss_type == "bnpo":
        denom = max(num_active, 1)
    elif cfg.loss_type == "dr_grpo":
        denom = num_seqs * cfg.max_completion_length
    else:
        denom = float(num_global_tokens) if num_global_tokens is not None else max(num_active, 1)
    return torch.full((num_seqs,), 1.0 / denom, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------
# autograd Function: one-pass (token level) and two-pass (sequence statistic first) forwards
# ----------------------------------------------------------------------------------------------


@dataclass
class _Active:
    """The n tokens the loss covers (loss_mask and a target), compacted before any GEMM; [n] vectors dense."""

    idx: torch.Tensor  # [n] their rows in the [N] input
    h: torch.Tensor  # [n, H]
    t: torch.Tensor  # [n] int64
    sid: torch.Tensor  # [n] int64
    old: torch.Tensor | None  # [n] fp32
    ref: torch.Tensor | None
    gen: torch.Tensor | None
    ext: torch.Tensor | None  # [n] fp32 external importance weights
    adv: torch.Tensor  # [S] fp32
    w_seq: torch.Tensor  # [S] fp32 aggregation weight of each sequence's tokens

    @property
    def n(self) -> int:
        return int(self.idx.numel())


@dataclass
class _TokenOut:
    """Per active token, fp32 [n], NaN until written (poison)."""

    logp: torch.Tensor
    ratio: torch.Tensor
    kl: torch.Tensor
    jt: torch.Tensor  # the token's weighted loss term (sum = loss)
    ent: torch.Tensor | None

    @staticmethod
    def empty(n, device, with_entropy):
        f = lambda: torch.full((n,), float("nan"), dtype=torch.float32, device=device)  # noqa: E731
        return _TokenOut(f(), f(), f(), f(), f() if with_entropy else None)


def _one_pass(a: _Active, tiles: Tiles, cfg: GRPOLossConfig, xf: LogitTransform, backend: str, chunk: int) -> _TokenOut:
    """Token-level ratio: tile -> loss terms -> gradient of the tile, while it is in memory (3 GEMMs)."""
    n, S = a.n, a.adv.shape[0]
    need_grad = tiles.any_grad
    out = _TokenOut.empty(n, a.h.device, cfg.compute_entropy)
    seq_isw = None
    if cfg.gen_correction == "sequence_truncate":
        seq_isw = sequence_is_weights(a.old, a.gen, a.sid, S, cfg.gen_correction_cap)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hc, z, g = tiles.logits(s, e)
        sl = slice(s, e)
        part = lambda x: None if x is None else x[sl]  # noqa: E731
        if backend == "torch":
            lp, lse, en = chunk_stats(z, a.t[sl], xf, cfg.compute_entropy, backend)
            terms, c = _terms_with_grad(lp, need_grad, old=part(a.old), ref=part(a.ref), gen=part(a.gen),
                                        adv=a.adv[a.sid[sl]], w=a.w_seq[a.sid[sl]], seq_ids=a.sid[sl], num_seqs=S,
                                        cfg=cfg, seq_isw=seq_isw, ext=part(a.ext))
            out.logp[sl], out.ratio[sl], out.kl[sl], out.jt[sl] = lp, terms["ratio"], terms["kl"], terms["j"]
            if out.ent is not None:
                out.ent[sl] = en
            if need_grad:
                chunk_grad_(z, a.t[sl], lse, None, c, None, xf, backend, out=g)
        else:  # one pass per row: the Triton kernel, or exgrpo_native::grpo_token_rows_ (C++ on the CPU)
            fn = _token_rows_triton if backend == "triton" else _native.ops.grpo_token_rows_
            lp, rho, kl, en, jt = fn(z, a.t[sl], a.sid[sl], a.adv, a.w_seq, seq_isw, part(a.old), part(a.ref),
                                     part(a.gen), part(a.ext), *xf.args, *_policy_args(cfg), cfg.compute_entropy,
                                     need_grad)
            out.logp[sl], out.ratio[sl], out.kl[sl], out.jt[sl] = lp, rho, kl, jt
            if out.ent is not None:
                out.ent[sl] = en
            if need_grad and g is not z:
                g.copy_(z)
        if need_grad:
            tiles.backprop(g, s, e, hc)
        del hc, z, g  # the next tile's GEMM must not find this one still alive (peak memory: one tile)
    return out


def _two_pass(a: _Active, tiles: Tiles, cfg: GRPOLossConfig, xf: LogitTransform, backend: str, chunk: int,
              need_grad: bool, recompute: bool):
    """Pass 1: every log-prob (1 GEMM), then the loss terms over all tokens (sequence statistics need them
    all); pass 2 (``recompute``): each tile again, to the gradients (3 GEMMs). When every active row fits one tile,
    pass 2 takes pass 1's tile instead of recomputing it (3 GEMMs in all, the same one-tile peak).
    Returns (out, lse, c)."""
    n, S = a.n, a.adv.shape[0]
    out = _TokenOut.empty(n, a.h.device, cfg.compute_entropy)
    lse = torch.full_like(out.logp, float("nan"))
    keep = need_grad and recompute and n <= chunk
    kept = None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hc, z, g = tiles.logits(s, e)
        lp, ls, en = chunk_stats(z, a.t[s:e], xf, cfg.compute_entropy, backend)
        if keep:
            kept = (hc, z, g)
        del hc, z, g
        out.logp[s:e], lse[s:e] = lp, ls
        if out.ent is not None:
            out.ent[s:e] = en
    terms, c = _terms_with_grad(out.logp, need_grad, old=a.old, ref=a.ref, gen=a.gen, adv=a.adv[a.sid],
                                w=a.w_seq[a.sid], seq_ids=a.sid, num_seqs=S, cfg=cfg, ext=a.ext)
    out.ratio, out.kl, out.jt = terms["ratio"], terms["kl"], terms["j"]
    if need_grad and recompute:
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            hc, z, g = kept if kept is not None else tiles.logits(s, e)
            kept = None
            chunk_grad_(z, a.t[s:e], lse[s:e], None, c[s:e].contiguous(), None, xf, backend, out=g)
            tiles.backprop(g, s, e, hc)
            del hc, z, g
    return out, lse, c


def _opt(x: torch.Tensor | None) -> torch.Tensor | None:
    """A [0] placeholder output of the op back to None."""
    return None if x is None or (x.dim() == 1 and x.shape[0] == 0) else x


@torch.library.custom_op("exgrpo::grpo", mutates_args=())
def _grpo_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, seq_ids: torch.Tensor,
             advantages: torch.Tensor, loss_mask: torch.Tensor, old: Optional[torch.Tensor], ref: Optional[torch.Tensor],
             gen: Optional[torch.Tensor], ext: Optional[torch.Tensor], bias: Optional[torch.Tensor], cfg_json: str,
             num_global_tokens: float, inv_tau: float, scale: float, softcap: float, backend: str, need_h: bool,
             need_w: bool, need_b: bool, mdt: torch.dtype) -> list[torch.Tensor]:
    """The GRPO loss and its per-token values; gradients for an upstream of 1 (fast / two-pass modes), or what the
    low-memory backward needs. Outputs (per-token ones are [N], 0 outside the loss):
    [loss, active (bool), logp, ratio, kl, entropy or [0], adv_tok, |l - l_gen| or [0],
     grad_hidden or [0], grad_weight or [0], grad_bias or [0], lse or [0], c = dJ/dl or [0]]"""
    cfg = GRPOLossConfig(**json.loads(cfg_json))
    N, H = hidden.shape
    V, S = weight.shape[0], advantages.shape[0]
    dev = hidden.device
    active = loss_mask.bool() & (targets != IGNORE_INDEX)
    idx = active.nonzero().squeeze(1)
    all_active = int(idx.numel()) == N
    pick = (lambda x: x) if all_active else (lambda x: None if x is None else x.index_select(0, idx))
    sid = dense_1d(pick(seq_ids), torch.int64)
    a = _Active(idx=idx, h=pick(hidden), t=dense_1d(pick(targets), torch.int64), sid=sid,
                old=dense_1d(pick(old), torch.float32), ref=dense_1d(pick(ref), torch.float32),
                gen=dense_1d(pick(gen), torch.float32), ext=dense_1d(pick(ext), torch.float32),
                adv=dense_1d(advantages, torch.float32),
                w_seq=seq_weights(sid, S, int(idx.numel()), cfg, num_global_tokens if num_global_tokens > 0 else None, dev))
    xf = LogitTransform(inv_tau, scale, softcap or None)
    zdt = torch.promote_types(mdt, torch.float32) if cfg.fp32_logits else mdt
    need_grad = need_h or need_w or need_b
    seq_pass = cfg.importance_sampling == "sequence" or (cfg.gen_correction == "sequence_truncate" and a.old is None)
    low_mem = cfg.memory_mode == "low_memory" and need_w
    chunk = cfg.chunk_size or chunk_rows(V, H, zdt, dev, accumulate_weight=need_w and not low_mem)
    lse = c = None
    with torch.autocast(dev.type, enabled=False):
        g_on = not low_mem
        tiles = Tiles(a.h, weight, mdt, zdt, need_h and g_on, need_w and g_on, hidden.dtype, bias=bias,
                      need_b=need_b and g_on)
        if not seq_pass and not low_mem:
            out = _one_pass(a, tiles, cfg, xf, backend, chunk)
        else:
            out, lse, c = _two_pass(a, tiles, cfg, xf, backend, chunk, need_grad, recompute=not low_mem)
    loss = out.jt.sum() if a.n else torch.zeros((), dtype=torch.float32, device=dev)

    def full(x, dtype=torch.float32):  # [n] -> [N], 0 outside the loss
        if x is None:
            return hidden.new_empty(0, dtype=dtype)
        return x.to(dtype) if all_active else torch.zeros(N, dtype=dtype, device=dev).index_copy_(0, idx, x.to(dtype))

    gh = tiles.grad_h
    if gh is not None and not all_active:
        gh = torch.zeros((N, H), dtype=hidden.dtype, device=dev).index_copy_(0, idx, gh)
    gw, gb = tiles.weight_grads(weight, bias)
    e = hidden.new_empty
    return [loss, active, full(out.logp), full(out.ratio), full(out.kl), full(out.ent), full(a.adv[a.sid]),
            full(None if a.gen is None else (out.logp - a.gen).abs()),
            gh if gh is not None else e(0), gw if gw is not None else e(0), gb if gb is not None else e(0),
            full(lse if low_mem else None), full(c.detach() if (low_mem and c is not None) else None)]


@_grpo_op.register_fake
def _(hidden, weight, targets, seq_ids, advantages, loss_mask, old, ref, gen, ext, bias, cfg_json, num_global_tokens,
      inv_tau, scale, softcap, backend, need_h, need_w, need_b, mdt):
    cfg = GRPOLossConfig(**json.loads(cfg_json))
    N = hidden.shape[0]
    low_mem = cfg.memory_mode == "low_memory" and need_w
    f = lambda n: hidden.new_empty((n,), dtype=torch.float32)  # noqa: E731
    e = hidden.new_empty
    return [hidden.new_empty((), dtype=torch.float32), hidden.new_empty((N,), dtype=torch.bool), f(N), f(N), f(N),
            f(N if cfg.compute_entropy else 0), f(N), f(N if gen is not None else 0),
            torch.empty_like(hidden) if need_h else e(0), torch.empty_like(weight) if (need_w and not low_mem) else e(0),
            torch.empty_like(bias) if (need_b and bias is not None and not low_mem) else e(0),
            f(N if low_mem else 0), f(N if low_mem else 0)]


@torch.library.custom_op("exgrpo::grpo_low_memory_backward", mutates_args=())
def _low_memory_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            targets: torch.Tensor, active: torch.Tensor, lse: torch.Tensor, c: torch.Tensor,
                            inv_tau: float, scale: float, softcap: float, mdt: torch.dtype, zdt: torch.dtype,
                            backend: str, need_h: bool, need_w: bool,
                            need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Walk vocabulary slabs: z = h W_s^T [n, Vs] -> dJ/dz in place -> grad-weight of the slab (full-K GEMM,
    one rounding) and grad-hidden accumulated in fp32 [n, H] (4th GEMM: the tiles are recomputed)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    idx = active.nonzero().squeeze(1)
    n = int(idx.numel())
    xf = LogitTransform(inv_tau, scale, softcap or None)
    t = dense_1d(targets.index_select(0, idx), torch.int64)
    lse_a, c_a = lse.index_select(0, idx).contiguous(), c.index_select(0, idx).contiguous()
    with torch.autocast(dev.type, enabled=False):
        w_mat = weight.to(mdt)
        hm = hidden.index_select(0, idx).to(mdt)
        # half the default tile budget: the [n, slab] tile plus the fp32 [n, H] accumulator must stay under the
        # low-memory peak (<= 1.8 GiB at M=8192, H=4096, V=151936 with 1.3 GiB of returned grads)
        slab = auto_chunk(max(n, 1), zdt.itemsize, tile_budget(dev) // 2, 128, 1 << 20)
        gh = torch.zeros((n, H), dtype=acc_dtype(hidden), device=dev) if need_h else None
        gw = torch.full((V, H), float("nan"), dtype=weight.dtype, device=dev) if need_w else None
        gb = torch.zeros((V,), dtype=bias.dtype, device=dev) if (need_b and bias is not None) else None
        bz = None if bias is None else bias.to(zdt)
        for v0 in range(0, V, slab):
            v1 = min(V, v0 + slab)
            ws = w_mat[v0:v1]
            z = mm(hm, ws.t(), out_dtype=zdt)
            if bz is not None:
                z.add_(bz[v0:v1])
            g = z if z.dtype == mdt else torch.empty(z.shape, dtype=mdt, device=z.device)
            chunk_grad_(z, t, lse_a, None, c_a, None, xf, backend, col0=v0, out=g)
            if need_w:
                gw[v0:v1] = mm(g.t(), hm).to(weight.dtype)
            if gb is not None:
                gb[v0:v1] = g.sum(0, dtype=torch.float32).to(bias.dtype)
            if need_h:
                addmm_fp32_(gh, g, ws)
            del z, g
    e = hidden.new_empty
    gh_full = e(0)
    if need_h:
        gh_full = torch.zeros((N, H), dtype=hidden.dtype, device=dev).index_copy_(0, idx, gh.to(hidden.dtype))
    return gh_full, gw if gw is not None else e(0), gb if gb is not None else e(0)


@_low_memory_backward_op.register_fake
def _(hidden, weight, bias, targets, active, lse, c, inv_tau, scale, softcap, mdt, zdt, backend, need_h, need_w, need_b):
    e = hidden.new_empty
    return (torch.empty_like(hidden) if need_h else e(0), torch.empty_like(weight) if need_w else e(0),
            torch.empty_like(bias) if (need_b and bias is not None) else e(0))


def _grpo_setup(ctx, inputs, output):
    hidden, weight, targets = inputs[0], inputs[1], inputs[2]
    bias, cfg_json = inputs[10], inputs[11]
    inv_tau, scale, softcap, backend, need_h, need_w, need_b, mdt = inputs[13:21]
    ctx.grads = tuple(g.detach() for g in output[8:11])  # the same storage, outside the autograd graph
    ctx.has_bias = bias is not None
    cfg = GRPOLossConfig(**json.loads(cfg_json))
    ctx.low_mem = cfg.memory_mode == "low_memory" and need_w
    if ctx.low_mem:
        zdt = torch.promote_types(mdt, torch.float32) if cfg.fp32_logits else mdt
        ctx.save_for_backward(hidden, weight, bias, targets, output[1].detach(), output[11].detach(),
                              output[12].detach())
        ctx.lm_args = (inv_tau, scale, softcap, mdt, zdt, backend, need_h, need_w, need_b)


def _grpo_backward(ctx, grads):
    grad_loss = grads[0]  # the op returns a list: its gradients come as one list
    need = ctx.needs_input_grad
    if ctx.low_mem:
        hidden, weight, bias, targets, active, lse, c = ctx.saved_tensors
        gh, gw, gb = _low_memory_backward_op(hidden, weight, bias, targets, active, lse, c, *ctx.lm_args)
        gh, gw, gb = (_opt(x) for x in (gh, gw, gb))
    else:
        gh, gw, gb = (_opt(x) for x in ctx.grads)
    del ctx.grads
    gh, gw, gb = scale_grads_(grad_loss, gh, gw, gb)
    return (gh if need[0] else None, gw if need[1] else None) + (None,) * 8 + (
        gb if (ctx.has_bias and need[10]) else None,) + (None,) * 10


_grpo_op.register_autograd(_grpo_backward, setup_context=_grpo_setup)


def _policy_args(cfg: GRPOLossConfig):
    """The token kernel's scalars: (eps_low, eps_high, delta or 0, beta, is_cap, kl_est 1..3, is_mode 0..2)."""
    is_mode = {"off": 0, "token_truncate": 1, "sequence_truncate": 2}[cfg.gen_correction]
    return (float(cfg.eps_low), float(cfg.eps_high), float(cfg.delta or 0.0), float(cfg.beta),
            float(cfg.gen_correction_cap), int(cfg.kl_estimator[1]), is_mode)


# exgrpo_native::grpo_token_rows_ (schema: _native.SCHEMAS): the token-level rows of the loss on one logits tile z
# [C, V]: -> (logp, ratio, kl, entropy or [0], j) [C] fp32; with compute_grad, z becomes dJ/dz in place.


def _token_rows_triton(z, t, sid, adv, w_seq, seq_isw, old, ref, gen, ext, inv_tau: float, pre: float, cap: float,
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


def _token_rows_twin(z, t, sid, adv, w_seq, seq_isw, old, ref, gen, ext, inv_tau: float, pre: float, cap: float,
                     eps_low: float, eps_high: float, delta: float, beta: float, is_cap: float, kl_est: int,
                     is_mode: int, with_entropy: bool, compute_grad: bool):
    xf = LogitTransform(inv_tau, pre, cap or None)
    cfg = GRPOLossConfig(eps_low=eps_low, eps_high=eps_high, delta=delta or None, beta=beta, gen_correction_cap=is_cap,
                         kl_estimator=f"k{kl_est}", gen_correction=GEN_CORRECTIONS[is_mode])
    lp, lse, en = chunk_stats(z, t, xf, with_entropy, "torch")
    terms, c = policy_terms(lp, old=old, ref=ref, gen=gen, adv=adv[sid], w=w_seq[sid], seq_ids=sid,
                            num_seqs=adv.shape[0], cfg=cfg, seq_isw=seq_isw, ext=ext, need_grad=compute_grad)
    if compute_grad:
        chunk_grad_(z, t, lse, None, c, None, xf, "torch")
    return lp, terms["ratio"], terms["kl"], (en if with_entropy else lp.new_empty(0)), terms["j"]


_native.register("grpo_token_rows_", "CUDA", _token_rows_triton)
_native.register("grpo_token_rows_", "CPU", _token_rows_twin)


def grpo_metrics(active, logp, ratio, kl, ent, adv_tok, gen_diff, cfg: GRPOLossConfig, has_ref: bool) -> dict:
    """Micro-batch token means over the active tokens (``active`` [N] bool; the per-token inputs are [N] fp32, 0
    outside), detached 0-d fp32 tensors by name: kl, clip_frac_low (ratio below 1 - eps_low where A < 0),
    clip_frac_high (above 1 + eps_high where A > 0), ratio_mean, num_tokens; entropy (ent given);
    gen_logp_abs_diff_mean / _max (|l - l_gen| given). All 0 when no token is active. No host sync."""
    m_f = active.float()
    n = m_f.sum()
    den = n.clamp(min=1.0)
    mean = lambda x: (x * m_f).sum() / den  # noqa: E731
    out = {"kl": mean(kl) if has_ref else n * 0,
           "clip_frac_low": mean(((ratio < 1 - cfg.eps_low) & (adv_tok < 0)).float()),
           "clip_frac_high": mean(((ratio > 1 + cfg.eps_high) & (adv_tok > 0)).float()),
           "ratio_mean": mean(ratio), "num_tokens": n}
    if ent is not None:
        out["entropy"] = mean(ent)
    if gen_diff is not None:
        out["gen_logp_abs_diff_mean"] = mean(gen_diff)
        out["gen_logp_abs_diff_max"] = torch.where(active, gen_diff, 0.0).max() if gen_diff.numel() else n * 0
    return {k: v.detach() for k, v in out.items()}


def _config_json(cfg: GRPOLossConfig) -> str:
    """The config as the op's string argument: a JSON object built from the fields' reprs (plain string work that
    torch.compile folds into a constant, also for a config constructed inside the compiled function)."""
    def val(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v + '"'
        return repr(v)
    return "{" + ", ".join('"' + f + '": ' + val(getattr(cfg, f)) for f in _config_fields()) + "}"


def _config_fields():
    return ("loss_type", "importance_sampling", "eps_low", "eps_high", "delta", "beta", "kl_estimator", "temperature",
            "max_completion_length", "gen_correction", "gen_correction_cap", "memory_mode", "compute_entropy",
            "fp32_logits", "chunk_size", "backend")


def fused_linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, seq_ids: torch.Tensor,
                           advantages: torch.Tensor, loss_mask: torch.Tensor, config: GRPOLossConfig | None = None, *,
                           old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                           gen_logp: torch.Tensor | None = None, is_weights: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None, softcap: float | None = None, logit_scale: float = 1.0,
                           num_global_tokens=None):
    """GRPO policy loss from hidden states, forward and backward, never holding [N, V] logits.

    Args:
        hidden: [N, H] bf16/fp16/fp32, tokens flattened (padded or packed); any strides (a slice of a batch).
        weight: [V, H] lm_head, same device; same dtype unless under torch.autocast (then the GEMMs run in the
            autocast dtype with fp32 accumulation, and the gradients come back in the inputs' dtypes).
        targets: [N] int64/int32, next token per position; -100 = no target (no loss, no gradient).
        seq_ids: [N] int64/int32 in [0, S): the sequence each token belongs to.
        advantages: [S] float, one per sequence (gathered per token inside the kernel).
        loss_mask: [N] bool (or 0/1 int/float): tokens the policy loss covers.
        config: GRPOLossConfig (default GRPOLossConfig()).
        old_logp, ref_logp, gen_logp: [N] float log-probs of the old policy, the reference policy and the
            generator (any layout: columns of a batch tensor are fine), or None. old None: ratio 1 (one update per
            batch). ref None needs config.beta == 0. gen needed by config.gen_correction != "off"; when given, the
            mismatch is reported.
        is_weights: external importance weights multiplying the clipped policy term, [N] per token or [S] per
            sequence (TRL's ``vllm_is_ratio``), or None. Applied on top of config.gen_correction.
        bias: [V] lm_head bias or None. softcap, logit_scale: the logit transform (see fused_linear_logprobs).
        num_global_tokens: masked tokens of the whole global batch (all ranks and accumulation steps), for
            "dapo"; None = this call's count.

    Returns:
        (loss, metrics): loss a 0-d fp32 tensor differentiable in hidden, weight and bias; metrics a dict of
        detached 0-d fp32 tensors: kl, clip_frac_low, clip_frac_high, ratio_mean, num_tokens, plus entropy
        (config.compute_entropy) and gen_logp_abs_diff_mean / _max (gen_logp given).
    """
    cfg = config if config is not None else GRPOLossConfig()
    if not isinstance(cfg, GRPOLossConfig):
        raise ValueError(f"config must be a GRPOLossConfig, got {type(cfg).__name__}")
    check_hidden_weight_targets(hidden, weight, targets)
    check_head(weight, bias, cfg.temperature, softcap, logit_scale)
    N, dev = hidden.shape[0], hidden.device
    check_1d("seq_ids", seq_ids, N, INT_DTYPES, dev)
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 1 or advantages.numel() == 0:
        raise ValueError(f"advantages must be a non-empty 1-D [S] tensor, got "
                         f"{tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__}")
    check_1d("advantages", advantages, advantages.shape[0], FLOAT_DTYPES, dev)
    S = advantages.shape[0]
    check_1d("loss_mask", loss_mask, N, (torch.bool,) + INT_DTYPES + FLOAT_DTYPES, dev)
    eager = not torch.compiler.is_compiling()  # value checks read the device: eager only
    if eager and loss_mask.dtype != torch.bool and bool(((loss_mask != 0) & (loss_mask != 1)).any()):
        raise ValueError("loss_mask must hold only 0 and 1 (or be bool)")
    if eager and (int(seq_ids.min()) < 0 or int(seq_ids.max()) >= S):
        bad = int(((seq_ids < 0) | (seq_ids >= S)).nonzero()[0, 0])
        raise ValueError(f"seq_ids[{bad}] = {int(seq_ids[bad])} is outside [0, S={S}) (S = advantages.shape[0])")
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("gen_logp", gen_logp)):
        if x is not None:
            check_1d(name, x, N, FLOAT_DTYPES, dev)
    if is_weights is not None:
        if not isinstance(is_weights, torch.Tensor) or is_weights.dim() != 1 or is_weights.shape[0] not in (N, S):
            raise ValueError(f"is_weights must be [N={N}] (per token) or [S={S}] (per sequence), got "
                             f"{tuple(is_weights.shape) if isinstance(is_weights, torch.Tensor) else type(is_weights).__name__}")
        check_1d("is_weights", is_weights, is_weights.shape[0], FLOAT_DTYPES, dev)
        if is_weights.shape[0] != N:  # per sequence -> per token (when S == N the weights are taken per token)
            is_weights = is_weights[seq_ids.long()]
    if cfg.beta != 0 and ref_logp is None:
        raise ValueError(f"ref_logp is None but config.beta = {cfg.beta}: pass ref_logp or set beta=0")
    if cfg.gen_correction != "off" and gen_logp is None:
        raise ValueError(f"gen_logp is None but config.gen_correction = {cfg.gen_correction!r}")
    if num_global_tokens is not None:
        num_global_tokens = float(num_global_tokens)
        if not num_global_tokens > 0:
            raise ValueError(f"num_global_tokens must be > 0, got {num_global_tokens}")
    backend = resolve_backend(cfg.backend, dev)
    grad_on = torch.is_grad_enabled()
    out = _grpo_op(hidden, weight, targets, seq_ids, advantages, loss_mask, old_logp, ref_logp, gen_logp, is_weights,
                   bias, _config_json(cfg), -1.0 if num_global_tokens is None else num_global_tokens,
                   1.0 / float(cfg.temperature), float(logit_scale), float(softcap or 0.0), backend,
                   grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                   grad_on and bias is not None and bias.requires_grad, gemm_dtype(hidden, weight))
    loss, active, logp, ratio, kl, ent, adv_tok, gen_diff = out[:8]
    metrics = grpo_metrics(active, logp, ratio, kl, ent if cfg.compute_entropy else None, adv_tok,
                           gen_diff if gen_logp is not None else None, cfg, ref_logp is not None)
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def grpo_loss_reference(hidden, weight, targets, seq_ids, advantages, loss_mask, config=None, *, old_logp=None,
                        ref_logp=None, gen_logp=None, is_weights=None, bias=None, softcap=None, logit_scale=1.0,
                        num_global_tokens=None, logits_dtype=None):
    """Plain torch, sequence by sequence, on full [N, V] logits (the formulas of docs/kernels.md). float64 inputs give
    the ground truth; logits_dtype=torch.bfloat16 with bf16 inputs gives torch's own bf16 pipeline.
    Returns (loss, metrics) like fused_linear_grpo_loss."""
    cfg = config if config is not None else GRPOLossConfig()
    logp, ent = logprobs_reference(hidden, weight, targets, bias=bias, temperature=cfg.temperature, softcap=softcap,
                                   logit_scale=logit_scale, return_entropy=True, logits_dtype=logits_dtype)
    S = advantages.shape[0]
    if is_weights is not None and is_weights.shape[0] == S and S != hidden.shape[0]:
        is_weights = is_weights[seq_ids.long()]
    m = loss_mask.bool() & (targets != IGNORE_INDEX)
    M = int(m.sum())
    eps_lo, eps_hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    loss = logp.sum() * 0
    toks = {"kl": [], "ratio": [], "adv": [], "ent": [], "diff": []}
    for i in range(S):
        sel = (seq_ids == i) & m
        n = int(sel.sum())
        if n == 0:
            continue
        l = logp[sel]
        old = l.detach() if old_logp is None else old_logp[sel].to(l.dtype)
        a = advantages[i].to(l.dtype)
        if cfg.importance_sampling == "token":
            rho = torch.exp(l - old)
        else:
            rho = torch.exp((l - old).sum() / n).expand(n)
        unclipped = rho if cfg.delta is None else torch.clamp(rho, max=cfg.delta)
        per_tok = -torch.minimum(unclipped * a, torch.clamp(rho, eps_lo, eps_hi) * a)
        if cfg.gen_correction != "off":
            lr = old.detach() - gen_logp[sel].to(l.dtype)
            w = torch.exp(lr) if cfg.gen_correction == "token_truncate" else torch.exp(lr.sum()).expand(n)
            per_tok = per_tok * torch.clamp(w, max=cfg.gen_correction_cap)
        if is_weights is not None:
            per_tok = per_tok * is_weights[sel].to(l.dtype)
        kl = torch.zeros_like(l)
        if ref_logp is not None:
            d = ref_logp[sel].to(l.dtype) - l
            kl = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[cfg.kl_estimator]
        per_tok = per_tok + cfg.beta * kl
        if cfg.loss_type == "grpo":
            loss = loss + per_tok.sum() / n / S
        elif cfg.loss_type == "bnpo":
            loss = loss + per_tok.sum() / max(M, 1)
        elif cfg.loss_type == "dr_grpo":
            loss = loss + per_tok.sum() / (S * cfg.max_completion_length)
        else:
            loss = loss + per_tok.sum() / (num_global_tokens if num_global_tokens is not None else max(M, 1))
        toks["kl"].append(kl.detach())
        toks["ratio"].append(rho.detach())
        toks["adv"].append(a.expand(n))
        toks["ent"].append(ent[sel].detach())
        if gen_logp is not None:
            toks["diff"].append((l - gen_logp[sel]).abs().detach())
    metrics = {"num_tokens": torch.tensor(float(M))}
    if M:
        cat = {k: torch.cat(v) for k, v in toks.items() if v}
        r, a = cat["ratio"], cat["adv"]
        metrics.update(kl=cat["kl"].mean() if ref_logp is not None else torch.tensor(0.0),
                       clip_frac_low=((r < eps_lo) & (a < 0)).double().mean(),
                       clip_frac_high=((r > eps_hi) & (a > 0)).double().mean(), ratio_mean=r.mean(),
                       entropy=cat["ent"].mean())
        if gen_logp is not None:
            metrics.update(gen_logp_abs_diff_mean=cat["diff"].mean(), gen_logp_abs_diff_max=cat["diff"].max())
    return loss, metrics
