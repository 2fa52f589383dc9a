"""The GRPO policy loss straight from hidden states: log-probs, importance ratio, clipping, KL to the
reference policy, group advantages gathered per token, aggregation, forward and backward, without the
[N, V] logits.

Matmul counts (one = [N, H] x [H, V]); see ``docs/kernels.md``:
  * fast mode, token-level ratio: 3. Each [chunk, V] logits tile is reduced and turned into its own
    gradient by ``_grpo_token_kernel`` while it is in memory (the per-token gradient is known in the
    forward: every aggregation weight follows from the mask), then grad-hidden and grad-weight GEMMs;
    grad-weight accumulates in an fp32 [V, H] buffer.
  * sequence-level ratio (or sequence-level generator correction without old log-probs): 4. A first
    pass gets every log-prob, the per-sequence statistic, then a second pass recomputes the tiles.
  * low_memory mode: 4. The forward reduces tiles to log-probs; the backward walks vocabulary slabs
    (grad-weight of a slab is one full-K GEMM, written once), so there is no fp32 [V, H] buffer.
  * a weight that does not require grad: 2 (3 with the sequence-level ratio).
Rows that the loss does not cover (loss_mask 0, or target -100) are dropped before any GEMM.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._rows import Tiles, block_v, chunk_grad_, chunk_rows, chunk_stats, num_warps, row_grad, row_stats
from ._utils import (
    FLOAT_DTYPES,
    IGNORE_INDEX,
    INT_DTYPES,
    acc_dtype,
    addmm_fp32_,
    auto_chunk,
    check_1d,
    check_hidden_weight_targets,
    dense_1d,
    gemm_dtype,
    mm,
    resolve_backend,
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
    """Everything that defines the GRPO policy loss (TARGETS.md, "GRPO loss variants").

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
    chunk_size: rows per logits tile (None = automatic, about 512 MiB a tile on CUDA).
    backend: "auto" (Triton on CUDA, chunked torch on the CPU), "triton", "torch".
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
                              ("memory_mode", MEMORY_MODES), ("backend", ("auto", "triton", "torch"))):
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

    def replace(self, **kw) -> "GRPOLossConfig":
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------------------------
# Triton: one row of the token-level loss, fused with its logits tile
# ----------------------------------------------------------------------------------------------


@triton.jit
def _grpo_token_kernel(Z, stride_z, T, SEQ, ADV, SEQ_W, SEQ_ISW, OLD, REF, GEN,
                       LOGP, RATIO, KL, ENT, J, V, inv_tau, eps_low, eps_high, delta, beta, is_cap,
                       HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr,
                       KL_EST: tl.constexpr, IS_MODE: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                       COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # l = log softmax(z / tau)[t];  rho = exp(l - l_old);  A = ADV[seq];  w = SEQ_W[seq] (aggregation)
    # pg = -min(rho_u A, clip(rho, 1 - eps_low, 1 + eps_high) A),  rho_u = min(rho, delta) if delta
    # J_t = w (isw pg + beta KL),  c = dJ_t / dl  (min: ties split the gradient; clamps pass it inclusively)
    # then, in place: dJ/dz = c (onehot - p) / tau
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T + row)
    s = tl.load(SEQ + row)
    zrow = Z + row * stride_z
    lse, l, ent = row_stats(zrow, V, t, inv_tau, BLOCK_V, WITH_ENTROPY)
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
        row_grad(zrow, zrow, V, 0, t, inv_tau, lse, ent, c, 0.0, BLOCK_V, False)


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
                 seq_isw: torch.Tensor | None = None) -> dict:
    """Per-token GRPO terms of the active tokens, differentiable in l.

    l, old, ref, gen, adv, w: [n] fp32 (old/ref/gen may be None); adv and w already gathered per token;
    seq_ids [n] int64 in [0, num_seqs). seq_isw: [S] precomputed sequence-level IS weights (optional).
    Returns dict of [n] tensors: j (weighted loss, sum = loss), kl, ratio.
    """
    old_ = l.detach() if old is None else old
    if cfg.importance_sampling == "token":
        log_ratio = l - old_
    else:
        log_ratio = _seq_mean(l - old_, seq_ids, num_seqs)[seq_ids]
    rho = torch.exp(log_ratio)
    rho_c = torch.clamp(rho, 1 - cfg.eps_low, 1 + cfg.eps_high)
    rho_u = rho if cfg.delta is None else torch.clamp(rho, max=cfg.delta)
    pg = -torch.minimum(rho_u * adv, rho_c * adv)
    if cfg.gen_correction == "token_truncate":
        pg = pg * torch.exp(old_.detach() - gen).clamp(max=cfg.gen_correction_cap)
    elif cfg.gen_correction == "sequence_truncate":
        if seq_isw is None:
            seq_isw = sequence_is_weights(old_.detach(), gen, seq_ids, num_seqs, cfg.gen_correction_cap)
        pg = pg * seq_isw[seq_ids]
    if ref is not None:
        d = ref - l
        kl = {"k1": lambda: -d, "k2": lambda: 0.5 * d * d, "k3": lambda: torch.exp(d) - d - 1}[cfg.kl_estimator]()
    else:
        kl = torch.zeros_like(l)
    return {"j": w * (pg + cfg.beta * kl), "kl": kl, "ratio": rho}


def _terms_with_grad(l: torch.Tensor, need_grad: bool, **kw):
    """policy_terms with c = dJ/dl by autograd on the [n] vector (cheap: no GEMM)."""
    with torch.enable_grad():
        lv = l.detach().requires_grad_(need_grad)
        terms = policy_terms(lv, **kw)
        c = torch.autograd.grad(terms["j"].sum(), lv)[0] if need_grad else None
    return {k: v.detach() for k, v in terms.items()}, c


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


def _one_pass(a: _Active, tiles: Tiles, cfg: GRPOLossConfig, backend: str, need_grad: bool, chunk: int) -> _TokenOut:
    """Token-level ratio: tile -> loss terms -> gradient of the tile, while it is in memory (3 GEMMs)."""
    n, S = a.n, a.adv.shape[0]
    out = _TokenOut.empty(n, a.h.device, cfg.compute_entropy)
    inv_tau = 1.0 / cfg.temperature
    seq_isw = None
    if cfg.gen_correction == "sequence_truncate":
        seq_isw = sequence_is_weights(a.old, a.gen, a.sid, S, cfg.gen_correction_cap)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hc, z, g = tiles.logits(s, e)
        sl = slice(s, e)
        part = lambda x: None if x is None else x[sl]  # noqa: E731
        if backend == "triton":
            _launch_token_kernel(z, a.t[sl], a.sid[sl], a.adv, a.w_seq, seq_isw, part(a.old), part(a.ref), part(a.gen),
                                 out.logp[sl], out.ratio[sl], out.kl[sl], part(out.ent), out.jt[sl], cfg, inv_tau,
                                 need_grad)
            if need_grad and g is not z:
                g.copy_(z)
        else:
            lp, lse, en = chunk_stats(z, a.t[sl], inv_tau, cfg.compute_entropy, backend)
            terms, c = _terms_with_grad(lp, need_grad, old=part(a.old), ref=part(a.ref), gen=part(a.gen),
                                        adv=a.adv[a.sid[sl]], w=a.w_seq[a.sid[sl]], seq_ids=a.sid[sl], num_seqs=S,
                                        cfg=cfg, seq_isw=seq_isw)
            out.logp[sl], out.ratio[sl], out.kl[sl], out.jt[sl] = lp, terms["ratio"], terms["kl"], terms["j"]
            if out.ent is not None:
                out.ent[sl] = en
            if need_grad:
                chunk_grad_(z, a.t[sl], lse, None, c, None, inv_tau, backend, out=g)
        if need_grad:
            tiles.backprop(g, s, e, hc)
        del hc, z, g  # the next tile's GEMM must not find this one still alive (peak memory: one tile)
    return out


def _two_pass(a: _Active, tiles: Tiles, cfg: GRPOLossConfig, backend: str, need_grad: bool, chunk: int,
              recompute: bool):
    """Pass 1: every log-prob (1 GEMM), then the loss terms over all tokens (sequence statistics need them
    all); pass 2 (``recompute``): each tile again, to the gradients (3 GEMMs). Returns (out, lse, c)."""
    n, S = a.n, a.adv.shape[0]
    out = _TokenOut.empty(n, a.h.device, cfg.compute_entropy)
    inv_tau = 1.0 / cfg.temperature
    lse = torch.full_like(out.logp, float("nan"))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        _, z, _ = tiles.logits(s, e)
        lp, ls, en = chunk_stats(z, a.t[s:e], inv_tau, cfg.compute_entropy, backend)
        del z
        out.logp[s:e], lse[s:e] = lp, ls
        if out.ent is not None:
            out.ent[s:e] = en
    terms, c = _terms_with_grad(out.logp, need_grad, old=a.old, ref=a.ref, gen=a.gen, adv=a.adv[a.sid],
                                w=a.w_seq[a.sid], seq_ids=a.sid, num_seqs=S, cfg=cfg)
    out.ratio, out.kl, out.jt = terms["ratio"], terms["kl"], terms["j"]
    if need_grad and recompute:
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            hc, z, g = tiles.logits(s, e)
            chunk_grad_(z, a.t[s:e], lse[s:e], None, c[s:e].contiguous(), None, inv_tau, backend, out=g)
            tiles.backprop(g, s, e, hc)
            del hc, z, g
    return out, lse, c


class _FusedLinearGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, seq_ids, advantages, loss_mask, old, ref, gen,
                num_global_tokens, cfg, backend, need_h, need_w, mdt):
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
                    gen=dense_1d(pick(gen), torch.float32), adv=dense_1d(advantages, torch.float32),
                    w_seq=seq_weights(sid, S, int(idx.numel()), cfg, num_global_tokens, dev))
        zdt = torch.promote_types(mdt, torch.float32) if cfg.fp32_logits else mdt
        need_grad = need_h or need_w
        seq_pass = cfg.importance_sampling == "sequence" or (cfg.gen_correction == "sequence_truncate" and a.old is None)
        low_mem = cfg.memory_mode == "low_memory" and need_w
        chunk = cfg.chunk_size or chunk_rows(V, H, zdt, dev, accumulate_weight=need_w and not low_mem)
        ctx.low_mem = None
        with torch.autocast(dev.type, enabled=False):
            tiles = Tiles(a.h, weight, mdt, zdt, need_h and not low_mem, need_w and not low_mem, hidden.dtype)
            if not seq_pass and not low_mem:
                out = _one_pass(a, tiles, cfg, backend, need_grad, chunk)
            else:
                out, lse, c = _two_pass(a, tiles, cfg, backend, need_grad, chunk, recompute=not low_mem)
                if low_mem:
                    ctx.low_mem = (a.h, tiles.w, a.t, lse, c.contiguous(), 1.0 / cfg.temperature, zdt, backend, need_h,
                                   need_w)
        loss = out.jt.sum() if a.n else torch.zeros((), dtype=torch.float32, device=dev)
        ctx.shapes = (N, H, idx, all_active, hidden.dtype, weight.dtype)
        ctx.grads = (tiles.grad_h, None if tiles.grad_w is None else tiles.grad_w.to(weight.dtype))
        none = out.logp.new_zeros(0)
        per_token = (out.logp, out.ratio, out.kl, out.ent if out.ent is not None else none, a.adv[a.sid],
                     (out.logp - a.gen).abs() if a.gen is not None else none)
        ctx.mark_non_differentiable(*per_token)
        return (loss,) + per_token

    @staticmethod
    def backward(ctx, grad_loss, *_grad_per_token):
        N, H, idx, all_active, hdt, wdt = ctx.shapes
        gh, gw = ctx.grads
        del ctx.grads
        if ctx.low_mem is not None:
            with torch.autocast(grad_loss.device.type, enabled=False):
                gh, gw = _low_memory_backward(*ctx.low_mem, wdt)
            ctx.low_mem = None
        return _scaled_grads(grad_loss, gh, gw, ctx.needs_input_grad, N, H, idx, all_active, hdt) + (None,) * 13


def _scaled_grads(grad_loss, gh, gw, needs, N, H, idx, all_active, hdt):
    """The stored gradients of a scalar loss times its upstream gradient, in place (no second [V, H] copy; one
    host sync to skip the multiply when the upstream is 1, as it is for loss.backward())."""
    scale = float(grad_loss)
    gh_full = gw_out = None
    if needs[0]:
        if gh is None:
            gh_full = torch.zeros((N, H), dtype=hdt, device=grad_loss.device)
        else:
            if scale != 1.0:
                gh.mul_(scale)
            gh_full = gh if all_active else torch.zeros((N, H), dtype=hdt, device=gh.device).index_copy_(0, idx, gh)
    if needs[1] and gw is not None:
        if scale != 1.0:
            gw.mul_(scale)
        gw_out = gw
    return gh_full, gw_out


def _low_memory_backward(h, w_mat, t, lse, c, inv_tau, zdt, backend, need_h, need_w, wdt):
    """Walk vocabulary slabs: z = h W_s^T [n, Vs] -> dJ/dz in place -> grad-weight of the slab (full-K GEMM,
    one rounding) and grad-hidden accumulated in fp32 [n, H]."""
    n, H = h.shape
    V = w_mat.shape[0]
    mdt = w_mat.dtype
    # half the forward's tile budget: the [n, slab] tile plus the fp32 [n, H] accumulator must stay under the
    # low-memory peak (<= 1.8 GiB at M=8192, H=4096, V=151936 with 1.3 GiB of returned grads)
    slab = auto_chunk(max(n, 1), zdt.itemsize, tile_budget(h.device) // 2, 128, 1 << 20)
    hm = h.to(mdt)
    gh = torch.zeros((n, H), dtype=acc_dtype(h), device=h.device) if need_h else None
    gw = torch.full((V, H), float("nan"), dtype=wdt, device=h.device) if need_w else None
    for v0 in range(0, V, slab):
        v1 = min(V, v0 + slab)
        ws = w_mat[v0:v1]
        z = mm(hm, ws.t(), out_dtype=zdt)
        g = z if z.dtype == mdt else torch.empty(z.shape, dtype=mdt, device=z.device)
        chunk_grad_(z, t, lse, None, c, None, inv_tau, backend, col0=v0, out=g)
        if need_w:
            gw[v0:v1] = mm(g.t(), hm).to(wdt)
        if need_h:
            addmm_fp32_(gh, g, ws)
        del z, g
    return (None if gh is None else gh.to(h.dtype)), gw


def _launch_token_kernel(z, t, sid, adv, w_seq, seq_isw, old, ref, gen, logp, ratio, kl, ent, jt, cfg, inv_tau,
                         compute_grad):
    C, V = z.shape
    bv = block_v(V)
    is_mode = {"off": 0, "token_truncate": 1, "sequence_truncate": 2}[cfg.gen_correction]
    dummy = logp
    _grpo_token_kernel[(C,)](
        z, z.stride(0), t, sid, adv, w_seq, dummy if seq_isw is None else seq_isw,
        dummy if old is None else old, dummy if ref is None else ref, dummy if gen is None else gen,
        logp, ratio, kl, dummy if ent is None else ent, jt, V, inv_tau,
        float(cfg.eps_low), float(cfg.eps_high), float(cfg.delta or 0.0), float(cfg.beta), float(cfg.gen_correction_cap),
        HAS_OLD=old is not None, HAS_REF=ref is not None, HAS_DELTA=cfg.delta is not None,
        KL_EST=int(cfg.kl_estimator[1]), IS_MODE=is_mode, WITH_ENTROPY=ent is not None,
        COMPUTE_GRAD=compute_grad, BLOCK_V=bv, num_warps=num_warps(bv))


def grpo_metrics(logp, ratio, kl, ent, adv_tok, gen_diff, cfg: GRPOLossConfig, has_ref: bool) -> dict:
    """Micro-batch token means over the n active tokens ([n] fp32 inputs), detached 0-d fp32 tensors by name:
    kl, clip_frac_low (ratio below 1 - eps_low where A < 0), clip_frac_high (above 1 + eps_high where A > 0),
    ratio_mean, num_tokens; entropy (ent given); gen_logp_abs_diff_mean / _max (|l - l_gen| given). All 0
    when n = 0."""
    n = logp.numel()
    z = logp.new_zeros(())
    m = {"kl": kl.mean() if (n and has_ref) else z,
         "clip_frac_low": ((ratio < 1 - cfg.eps_low) & (adv_tok < 0)).float().mean() if n else z,
         "clip_frac_high": ((ratio > 1 + cfg.eps_high) & (adv_tok > 0)).float().mean() if n else z,
         "ratio_mean": ratio.mean() if n else z,
         "num_tokens": torch.tensor(float(n), device=logp.device)}
    if ent is not None:
        m["entropy"] = ent.mean() if n else z
    if gen_diff is not None:
        m["gen_logp_abs_diff_mean"] = gen_diff.mean() if n else z
        m["gen_logp_abs_diff_max"] = gen_diff.max() if n else z
    return m


def fused_linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, seq_ids: torch.Tensor,
                           advantages: torch.Tensor, loss_mask: torch.Tensor, config: GRPOLossConfig | None = None, *,
                           old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                           gen_logp: torch.Tensor | None = None, num_global_tokens=None):
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
            generator (any layout: columns of a batch tensor are fine), or None. old None: ratio 1 (one update per batch). ref None needs config.beta == 0.
            gen needed by config.gen_correction != "off"; when given, the mismatch is reported.
        num_global_tokens: masked tokens of the whole global batch (all ranks and accumulation steps), for
            "dapo"; None = this call's count.

    Returns:
        (loss, metrics): loss a 0-d fp32 tensor differentiable in hidden and weight; metrics a dict of
        detached 0-d fp32 tensors: kl, clip_frac_low, clip_frac_high, ratio_mean, num_tokens, plus entropy
        (config.compute_entropy) and gen_logp_abs_diff_mean / _max (gen_logp given).
    """
    cfg = config if config is not None else GRPOLossConfig()
    if not isinstance(cfg, GRPOLossConfig):
        raise ValueError(f"config must be a GRPOLossConfig, got {type(cfg).__name__}")
    check_hidden_weight_targets(hidden, weight, targets)
    N, dev = hidden.shape[0], hidden.device
    check_1d("seq_ids", seq_ids, N, INT_DTYPES, dev)
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 1 or advantages.numel() == 0:
        raise ValueError(f"advantages must be a non-empty 1-D [S] tensor, got "
                         f"{tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__}")
    check_1d("advantages", advantages, advantages.shape[0], FLOAT_DTYPES, dev)
    S = advantages.shape[0]
    check_1d("loss_mask", loss_mask, N, (torch.bool,) + INT_DTYPES + FLOAT_DTYPES, dev)
    if loss_mask.dtype != torch.bool and bool(((loss_mask != 0) & (loss_mask != 1)).any()):
        raise ValueError("loss_mask must hold only 0 and 1 (or be bool)")
    if int(seq_ids.min()) < 0 or int(seq_ids.max()) >= S:
        bad = int(((seq_ids < 0) | (seq_ids >= S)).nonzero()[0, 0])
        raise ValueError(f"seq_ids[{bad}] = {int(seq_ids[bad])} is outside [0, S={S}) (S = advantages.shape[0])")
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("gen_logp", gen_logp)):
        if x is not None:
            check_1d(name, x, N, FLOAT_DTYPES, dev)
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
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    loss, logp, ratio, kl, ent, adv_tok, gen_diff = _FusedLinearGRPOLoss.apply(
        hidden, weight, targets, seq_ids, advantages, loss_mask, old_logp, ref_logp, gen_logp, num_global_tokens, cfg,
        backend, need_h, need_w, gemm_dtype(hidden, weight))
    metrics = grpo_metrics(logp, ratio, kl, ent if cfg.compute_entropy else None, adv_tok,
                           gen_diff if gen_logp is not None else None, cfg, ref_logp is not None)
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def grpo_loss_reference(hidden, weight, targets, seq_ids, advantages, loss_mask, config=None, *, old_logp=None,
                        ref_logp=None, gen_logp=None, num_global_tokens=None, logits_dtype=None):
    """Plain torch, sequence by sequence, on full [N, V] logits (TARGETS.md formulas). float64 inputs give
    the ground truth; logits_dtype=torch.bfloat16 with bf16 inputs gives torch's own bf16 pipeline.
    Returns (loss, metrics) like fused_linear_grpo_loss."""
    cfg = config if config is not None else GRPOLossConfig()
    logp, ent = logprobs_reference(hidden, weight, targets, temperature=cfg.temperature, return_entropy=True,
                                   logits_dtype=logits_dtype)
    S = advantages.shape[0]
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
