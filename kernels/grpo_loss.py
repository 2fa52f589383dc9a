"""The GRPO policy loss straight from hidden states: log-probs, importance ratio, clipping, KL to the
reference policy, group advantages gathered per token, aggregation, forward and backward, without the
[N, V] logits.

Matmul counts (one = [N, H] x [H, V]); see ``../shared/docs/TARGETS.md``:
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

from kernels._utils import (
    FLOAT_DTYPES,
    IGNORE_INDEX,
    INT_DTYPES,
    acc_dtype,
    addmm_fp32_,
    auto_chunk,
    check_1d,
    check_hidden_weight_targets,
    matmul_dtype,
    mm,
    resolve_backend,
    tile_budget,
)
from kernels.logprobs import _block_v, _num_warps, _row_grad, _row_stats, chunk_grad_, chunk_stats, logprobs_reference

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
GEN_CORRECTIONS = ("off", "token_truncate", "sequence_truncate")
MEMORY_MODES = ("fast", "low_memory")
METRIC_NAMES = ("kl", "clip_frac_low", "clip_frac_high", "ratio_mean", "entropy", "num_tokens",
                "gen_logp_abs_diff_mean", "gen_logp_abs_diff_max")


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
    lse, l, ent = _row_stats(zrow, V, t, inv_tau, BLOCK_V, WITH_ENTROPY)
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
        _row_grad(zrow, zrow, V, 0, t, inv_tau, lse, ent, c, 0.0, BLOCK_V, False)


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
# autograd Function
# ----------------------------------------------------------------------------------------------


class _FusedLinearGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, seq_ids, advantages, loss_mask, old, ref, gen,
                num_global_tokens, cfg, backend, need_h, need_w):
        N, H = hidden.shape
        V = weight.shape[0]
        S = advantages.shape[0]
        dev = hidden.device
        active = loss_mask.bool() & (targets != IGNORE_INDEX)
        idx = active.nonzero().squeeze(1)
        na = int(idx.numel())
        all_active = na == N
        pick = (lambda x: x) if all_active else (lambda x: None if x is None else x.index_select(0, idx))
        h, t, sid = pick(hidden), pick(targets).long(), pick(seq_ids).long()
        old, ref, gen = (None if x is None else pick(x).float() for x in (old, ref, gen))
        adv = advantages.float()
        w_seq = seq_weights(sid, S, na, cfg, num_global_tokens, dev)
        mdt = matmul_dtype(hidden)
        w_mat = weight.to(mdt)
        zdt = torch.float32 if cfg.fp32_logits else mdt
        inv_tau = 1.0 / cfg.temperature
        need_grad = need_h or need_w
        seq_pass = cfg.importance_sampling == "sequence" or (cfg.gen_correction == "sequence_truncate" and old is None)
        low_mem = cfg.memory_mode == "low_memory" and need_w
        chunk = cfg.chunk_size or auto_chunk(V, torch.empty((), dtype=zdt).element_size(), tile_budget(dev), 16, 4096)

        nan = float("nan")  # poison: an element no kernel wrote stays NaN and fails the loss and the tests
        logp = torch.full((na,), nan, dtype=torch.float32, device=dev)
        ratio, kl, jt = (torch.full_like(logp, nan) for _ in range(3))
        ent = torch.full_like(logp, nan) if cfg.compute_entropy else None
        gh = torch.full((na, H), nan, dtype=hidden.dtype, device=dev) if need_h and not low_mem else None
        gw = torch.zeros((V, H), dtype=acc_dtype(weight), device=dev) if need_w and not low_mem else None
        term_kw = dict(old=None, ref=None, gen=None, adv=None, w=None, seq_ids=None, num_seqs=S, cfg=cfg)

        def grad_gemms(g, s, e, hc):
            if gh is not None:
                gh[s:e] = mm(g, w_mat).to(hidden.dtype)
            if gw is not None:
                addmm_fp32_(gw, g.t(), hc)

        def tile(s, e):
            hc = h[s:e].to(mdt)
            z = mm(hc, w_mat.t(), out_dtype=zdt)
            g = z if z.dtype == mdt else torch.empty(z.shape, dtype=mdt, device=dev)
            return hc, z, g

        if not seq_pass and not low_mem:
            # one pass: tile -> loss terms -> gradient of the tile, while it is in memory
            seq_isw = None
            if cfg.gen_correction == "sequence_truncate":
                seq_isw = sequence_is_weights(old, gen, sid, S, cfg.gen_correction_cap)
            for s in range(0, na, chunk):
                e = min(na, s + chunk)
                hc, z, g = tile(s, e)
                sl = slice(s, e)
                if backend == "triton":
                    _launch_token_kernel(z, t[sl], sid[sl], adv, w_seq, seq_isw, *(None if x is None else x[sl] for x in (old, ref, gen)),
                                         logp[sl], ratio[sl], kl[sl], None if ent is None else ent[sl], jt[sl], cfg, inv_tau, need_grad)
                    if g is not z:
                        g.copy_(z)
                else:
                    lp, lse, en = chunk_stats(z, t[sl], inv_tau, cfg.compute_entropy, backend)
                    kw = dict(term_kw, old=None if old is None else old[sl], ref=None if ref is None else ref[sl],
                              gen=None if gen is None else gen[sl], adv=adv[sid[sl]], w=w_seq[sid[sl]], seq_ids=sid[sl],
                              seq_isw=seq_isw)
                    terms, c = _terms_with_grad(lp, need_grad, **kw)
                    logp[sl], ratio[sl], kl[sl], jt[sl] = lp, terms["ratio"], terms["kl"], terms["j"]
                    if ent is not None:
                        ent[sl] = en
                    if need_grad:
                        chunk_grad_(z, t[sl], lse, None, c, None, inv_tau, backend, out=g)
                if need_grad:
                    grad_gemms(g, s, e, hc)
        else:
            # pass 1: log-probs of every active token; then the loss terms over all of them
            lse = torch.full_like(logp, nan)
            for s in range(0, na, chunk):
                e = min(na, s + chunk)
                _, z, _ = tile(s, e)
                lp, ls, en = chunk_stats(z, t[s:e], inv_tau, cfg.compute_entropy, backend)
                logp[s:e], lse[s:e] = lp, ls
                if ent is not None:
                    ent[s:e] = en
            terms, c = _terms_with_grad(logp, need_grad, **dict(term_kw, old=old, ref=ref, gen=gen, adv=adv[sid],
                                                                   w=w_seq[sid], seq_ids=sid))
            ratio, kl, jt = terms["ratio"], terms["kl"], terms["j"]
            if need_grad and not low_mem:
                # pass 2: recompute each tile and take it to the gradients
                for s in range(0, na, chunk):
                    e = min(na, s + chunk)
                    hc, z, g = tile(s, e)
                    chunk_grad_(z, t[s:e], lse[s:e], None, c[s:e], None, inv_tau, backend, out=g)
                    grad_gemms(g, s, e, hc)
            if low_mem:
                ctx.low_mem = (h, w_mat, t, lse, c, inv_tau, zdt, backend, need_h, need_w)

        loss = jt.sum() if na else torch.zeros((), dtype=torch.float32, device=dev)
        metrics = _metrics(ratio, kl, ent, old, gen, logp, adv[sid], cfg, ref is not None, na)
        ctx.shapes = (N, H, idx, all_active, hidden.dtype, weight.dtype)
        ctx.grads = (gh, None if gw is None else gw.to(weight.dtype))
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        N, H, idx, all_active, hdt, wdt = ctx.shapes
        gh, gw = ctx.grads
        if getattr(ctx, "low_mem", None) is not None:
            gh, gw = _low_memory_backward(*ctx.low_mem, wdt)
        gh_full = gw_out = None
        if ctx.needs_input_grad[0]:
            gh_full = torch.zeros((N, H), dtype=hdt, device=grad_loss.device)
            if gh is not None:
                gh = gh * grad_loss.to(gh.dtype)
                gh_full = gh if all_active else gh_full.index_copy_(0, idx, gh)
        if ctx.needs_input_grad[1]:
            gw_out = gw * grad_loss.to(gw.dtype) if gw is not None else None
        return (gh_full, gw_out) + (None,) * 12


def _low_memory_backward(h, w_mat, t, lse, c, inv_tau, zdt, backend, need_h, need_w, wdt):
    """Walk vocabulary slabs: z = h W_s^T [n, Vs] -> dJ/dz in place -> grad-weight of the slab (full-K GEMM,
    one rounding) and grad-hidden accumulated in fp32 [n, H]."""
    n, H = h.shape
    V = w_mat.shape[0]
    mdt = w_mat.dtype
    # half the forward's tile budget: the [n, slab] tile plus the fp32 [n, H] accumulator must stay under the
    # low-memory peak (TARGETS.md: <= 1.8 GiB at M=8192, H=4096, V=151936 with 1.3 GiB of returned grads)
    slab = auto_chunk(max(n, 1), torch.empty((), dtype=zdt).element_size(), tile_budget(h.device) // 2, 128, 1 << 20)
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
    return (None if gh is None else gh.to(h.dtype)), gw


def _launch_token_kernel(z, t, sid, adv, w_seq, seq_isw, old, ref, gen, logp, ratio, kl, ent, jt, cfg, inv_tau,
                         compute_grad):
    C, V = z.shape
    bv = _block_v(V)
    is_mode = {"off": 0, "token_truncate": 1, "sequence_truncate": 2}[cfg.gen_correction]
    dummy = logp
    _grpo_token_kernel[(C,)](
        z, z.stride(0), t, sid, adv, w_seq, dummy if seq_isw is None else seq_isw,
        dummy if old is None else old, dummy if ref is None else ref, dummy if gen is None else gen,
        logp, ratio, kl, dummy if ent is None else ent, jt, V, inv_tau,
        float(cfg.eps_low), float(cfg.eps_high), float(cfg.delta or 0.0), float(cfg.beta), float(cfg.gen_correction_cap),
        HAS_OLD=old is not None, HAS_REF=ref is not None, HAS_DELTA=cfg.delta is not None,
        KL_EST=int(cfg.kl_estimator[1]), IS_MODE=is_mode, WITH_ENTROPY=ent is not None,
        COMPUTE_GRAD=compute_grad, BLOCK_V=bv, num_warps=_num_warps(bv))


def _metrics(ratio, kl, ent, old, gen, logp, adv_tok, cfg, has_ref, na) -> torch.Tensor:
    """[len(METRIC_NAMES)] fp32 vector of micro-batch token means (0 when no token is active)."""
    dev = ratio.device
    out = torch.zeros(len(METRIC_NAMES), dtype=torch.float32, device=dev)
    out[5] = na
    if na == 0:
        return out
    out[0] = kl.mean() if has_ref else 0.0
    out[1] = ((ratio < 1 - cfg.eps_low) & (adv_tok < 0)).float().mean()
    out[2] = ((ratio > 1 + cfg.eps_high) & (adv_tok > 0)).float().mean()
    out[3] = ratio.mean()
    if ent is not None:
        out[4] = ent.mean()
    if gen is not None:
        diff = (logp - gen).abs()
        out[6], out[7] = diff.mean(), diff.max()
    return out


def fused_linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, seq_ids: torch.Tensor,
                           advantages: torch.Tensor, loss_mask: torch.Tensor, config: GRPOLossConfig | None = None, *,
                           old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                           gen_logp: torch.Tensor | None = None, num_global_tokens=None):
    """GRPO policy loss from hidden states, forward and backward, never holding [N, V] logits.

    Args:
        hidden: [N, H] bf16/fp16/fp32, tokens flattened (padded or packed).
        weight: [V, H] lm_head, same dtype and device.
        targets: [N] int64/int32, next token per position; -100 = no target (no loss, no gradient).
        seq_ids: [N] int64/int32 in [0, S): the sequence each token belongs to.
        advantages: [S] float, one per sequence (gathered per token inside the kernel).
        loss_mask: [N] bool (or 0/1 int/float): tokens the policy loss covers.
        config: GRPOLossConfig (default GRPOLossConfig()).
        old_logp, ref_logp, gen_logp: [N] float log-probs of the old policy, the reference policy and the
            generator, or None. old None: ratio 1 (one update per batch). ref None needs config.beta == 0.
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
    loss, mvec = _FusedLinearGRPOLoss.apply(hidden, weight, targets, seq_ids, advantages, loss_mask, old_logp, ref_logp,
                                            gen_logp, num_global_tokens, cfg, backend, need_h, need_w)
    keep = {"kl", "clip_frac_low", "clip_frac_high", "ratio_mean", "num_tokens"}
    if cfg.compute_entropy:
        keep.add("entropy")
    if gen_logp is not None:
        keep |= {"gen_logp_abs_diff_mean", "gen_logp_abs_diff_max"}
    return loss, {k: mvec[i] for i, k in enumerate(METRIC_NAMES) if k in keep}


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
