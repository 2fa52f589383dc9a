"""The per-token terms of the GRPO loss family, one small function each, on [n] vectors of the tokens the loss
covers (seq_ids [n] int64 in [0, S); per-sequence values [S]). Each policy objective returns its value and its
closed-form derivative; the float64 reference (``naive.py``) differentiates the values with autograd on full
logits, the drivers' torch path (``policy_terms``) uses the closed forms, and the one-row kernels (``rows.py``,
``csrc/rows_ops.h``) restate the clip objective's in their math comments.

Notation: l the token's log-prob under the current policy, r = l - l_old (or its sequence mean at sequence level),
rho = exp(r), A the sequence's advantage, w its aggregation weight, d = l_ref - l.
"""
from __future__ import annotations

import math

import torch

from .config import GRPOLossConfig

LOG_MIN_IS = math.log(1e-8)  # vespo's clamps of log-ratios (TRL's get_gamma_weights)


def seq_sum(x: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """[n] -> [S]: the sum over each sequence's tokens."""
    return torch.zeros(num_seqs, dtype=x.dtype, device=x.device).index_add(0, seq_ids, x)


def seq_count(seq_ids: torch.Tensor, num_seqs: int, dtype) -> torch.Tensor:
    """[S]: tokens per sequence, at least 1."""
    return torch.bincount(seq_ids, minlength=num_seqs).clamp(min=1).to(dtype)


def seq_mean(x: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """[n] -> [S]: the mean over each sequence's tokens (0 for a sequence without any)."""
    return seq_sum(x, seq_ids, num_seqs) / seq_count(seq_ids, num_seqs, x.dtype)


# ---------------------------------------------------------------------------------------------- policy objectives


def clip_objective(rho, adv, *, eps_low: float, eps_high: float, delta: float | None):
    """PPO's clipped term: pg = -min(rho_u A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho_u = min(rho, delta).
    Returns (pg, dpg/dr): -A rho_u' where the unclipped term is the min, -A clip' where the clipped one is, their
    mean on ties (torch.minimum's convention); clip' = rho inside the closed range, else 0; rho_u' = rho where
    rho <= delta (or no delta), else 0."""
    lo, hi = 1 - eps_low, 1 + eps_high
    rho_u = rho if delta is None else torch.clamp(rho, max=delta)
    t1, t2 = rho_u * adv, torch.clamp(rho, lo, hi) * adv
    d_c = torch.where((rho >= lo) & (rho <= hi), rho, 0.0)
    d_u = rho if delta is None else torch.where(rho <= delta, rho, 0.0)
    grad = torch.where(t1 < t2, -adv * d_u, torch.where(t2 < t1, -adv * d_c, -adv * 0.5 * (d_u + d_c)))
    return -torch.minimum(t1, t2), grad


def cispo_objective(rho, l, adv, *, eps_high: float):
    """CISPO (MiniMax-M1): pg = -sg(min(rho, eps_high)) A l. Returns (pg, dpg/dl = -min(rho, eps_high) A)."""
    coef = torch.clamp(rho, max=eps_high).detach()
    return -coef * adv * l, -coef * adv


def sapo_objective(rho, adv, *, tau_pos: float, tau_neg: float):
    """SAPO: a sigmoid gate instead of the clip, pg = -(4 / tau) sigmoid(tau (rho - 1)) A, tau = tau_pos where
    A > 0, else tau_neg. Returns (pg, dpg/dr = -4 s (1 - s) rho A), s = sigmoid(tau (rho - 1))."""
    tau = torch.where(adv > 0, tau_pos, tau_neg).to(rho.dtype)
    s = torch.sigmoid(tau * (rho - 1))
    return -s * 4 / tau * adv, -4 * s * (1 - s) * rho * adv


def vespo_objective(l, adv, phi):
    """VESPO: pg = -phi A l with phi the sequence's detached gamma weight (``vespo_weights``, gathered per token).
    Returns (pg, dpg/dl = -phi A)."""
    return -phi * adv * l, -phi * adv


@torch.no_grad()
def vespo_weights(log_ratio, *, seq_ids, num_seqs: int, adv_seq, log_is_seq, cfg: GRPOLossConfig):
    """VESPO's gamma weight per sequence [S], detached: phi(w) = exp(lambda + k log w - lambda w) (phi(1) = 1),
    log w = clamp(sum_t clamp(r_t, -20, 20) + log_is_seq, log 1e-8, 20); (k, lambda) = (k_pos, lambda_pos) where
    A >= 0, else the negative pair. log_is_seq [S]: the summed clamped log generator weights, or None."""
    s = seq_sum(log_ratio.clamp(-20.0, 20.0), seq_ids, num_seqs)
    if log_is_seq is not None:
        s = s + log_is_seq
    log_w = s.clamp(LOG_MIN_IS, 20.0)
    pos = adv_seq >= 0
    k = torch.where(pos, cfg.vespo_k_pos, cfg.vespo_k_neg).to(log_w.dtype)
    lam = torch.where(pos, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).to(log_w.dtype).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def clamped_log(x):
    """log of importance weights as vespo sums them: clamp(log x, log 1e-8, 20)."""
    return torch.log(x).clamp(LOG_MIN_IS, 20.0)


# ---------------------------------------------------------------------------------------------- KL, weights, masks


def kl_estimate(l, ref, estimator: str):
    """KL(pi || pi_ref) per token from d = l_ref - l: k1 = -d, k2 = d^2 / 2, k3 = e^d - d - 1.
    Returns (kl, dkl/dl): k1 1, k2 -d, k3 1 - e^d."""
    d = ref - l
    if estimator == "k1":
        return -d, torch.ones_like(l)
    if estimator == "k2":
        return 0.5 * d * d, -d
    ed = torch.exp(d)
    return ed - d - 1, 1 - ed


@torch.no_grad()
def generator_weights(old, gen, *, seq_ids, num_seqs: int, cfg: GRPOLossConfig):
    """Trainer/generator importance weights per token [n], detached (TRL's vLLM importance sampling): r =
    exp(l_old - l_gen) per token, or exp(sum_t (l_old - l_gen)) per sequence; truncate clamps r to [min, cap],
    mask zeroes it outside. A NaN l_gen (a token the generator could not score) counts as no difference."""
    diff = (old - gen).nan_to_num(0.0)
    level, how = cfg.gen_correction.split("_")
    r = torch.exp(diff) if level == "token" else torch.exp(seq_sum(diff, seq_ids, num_seqs))[seq_ids]
    lo, hi = cfg.gen_correction_min, cfg.gen_correction_cap
    if how == "truncate":
        return torch.clamp(r, min=lo, max=hi)
    keep = r <= hi if lo is None else (r >= lo) & (r <= hi)
    return torch.where(keep, r, 0.0)


@torch.no_grad()
def off_policy_keep(l, sampling, *, seq_ids, num_seqs: int, adv_seq, threshold: float):
    """DeepSeek-V3.2's off-policy sequence mask [S] (1 keep, 0 drop): keep where A >= 0 or the sequence's mean
    (l_sampling - l) <= threshold (NaN differences count 0)."""
    avg = seq_mean((sampling - l).nan_to_num(0.0), seq_ids, num_seqs)
    return ((adv_seq >= 0) | (avg <= threshold)).to(l.dtype)


def seq_weights(seq_ids: torch.Tensor, num_seqs: int, num_active: int, cfg: GRPOLossConfig,
                num_global_tokens, device) -> torch.Tensor:
    """Aggregation weight of each covered token of sequence i, [S] fp32 (loss = sum_t w[seq_t] J_t)."""
    agg = cfg.aggregation
    if agg == "seq_mean":
        return 1.0 / (num_seqs * seq_count(seq_ids, num_seqs, torch.float32))
    if agg == "token_mean":
        denom = max(num_active, 1)
    elif agg == "constant":
        denom = num_seqs * cfg.max_completion_length
    elif agg == "seq_sum":
        denom = num_seqs
    else:
        denom = float(num_global_tokens) if num_global_tokens is not None else max(num_active, 1)
    return torch.full((num_seqs,), 1.0 / denom, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------- composition


def entropy_mask(ent, quantile: float):
    """TRL's entropy masking [n] bool: the tokens whose entropy is in the top ``quantile`` fraction of these tokens,
    H_t >= torch.quantile(H, 1 - quantile)."""
    if quantile >= 1 or ent.numel() == 0:
        return torch.ones_like(ent, dtype=torch.bool)
    return ent >= torch.quantile(ent.float(), 1 - quantile).to(ent.dtype)


def policy_terms(l: torch.Tensor, *, old, ref, gen, ext, ext_seq, adv_seq, w_seq, seq_ids, cfg: GRPOLossConfig,
                 isw: torch.Tensor | None = None, ent: torch.Tensor | None = None, need_grad: bool = True):
    """Per-token loss terms of the active tokens and c = dJ/dl in closed form (the torch path of the drivers, and the
    twin of the one-row kernels' math).

    l, old, ref, gen, ext: [n] fp32 (old / ref / gen / ext may be None; ext: external importance weights per token,
    TRL's vllm_is_ratio); ext_seq: [S] the same weights when they came per sequence (vespo sums them once per
    sequence), else None; adv_seq, w_seq: [S] fp32 each sequence's advantage and aggregation weight; seq_ids [n];
    isw: [n] generator weights already computed (when they do not depend on l), else None; ent: [n] entropies
    (needed by entropy_coef and top_entropy_quantile).
    Returns ({j (weighted loss, sum = loss), kl, ratio}: [n], c = dJ/dl [n] or None, c_h = dJ/dH [n] or None).

    J_t = w_t (g_t pg_t + beta rho_kl kl_t - coef e_t H_t), g = keep_i e_t isw_t ext_t (vespo: keep_i e_t), e_t the
    entropy mask, rho_kl = rho where use_bias_correction_kl, else 1. With pg's derivatives (pg_r in r, pg_l in l
    directly):
      token level:    dJ/dl_t = w_t g_t (pg_r + pg_l) + w_t beta (rho_kl' kl_t + rho_kl dkl_t/dl_t)
      sequence level: dJ/dl_t = (1 / n_i) sum_{t' in i} w_t' (g_t' pg_r,t' + beta rho_i kl_t' [bias-corrected])
                                + w_t beta rho_kl dkl_t/dl_t
    """
    num_seqs = adv_seq.shape[0]
    adv, w = adv_seq[seq_ids], w_seq[seq_ids]
    old_ = l if old is None else old
    log_ratio = l - old_
    if cfg.importance_sampling == "sequence":
        log_ratio = seq_mean(log_ratio, seq_ids, num_seqs)[seq_ids]
    rho = torch.exp(log_ratio)
    if isw is None and cfg.gen_correction != "off":
        isw = generator_weights(old_, gen, seq_ids=seq_ids, num_seqs=num_seqs, cfg=cfg)
    obj = cfg.objective
    pg_l = None
    if obj == "clip":
        pg, pg_r = clip_objective(rho, adv, eps_low=cfg.eps_low, eps_high=cfg.eps_high, delta=cfg.delta)
    elif obj == "sapo":
        pg, pg_r = sapo_objective(rho, adv, tau_pos=cfg.sapo_temperature_pos, tau_neg=cfg.sapo_temperature_neg)
    elif obj == "cispo":
        pg, pg_l = cispo_objective(rho, l, adv, eps_high=cfg.eps_high)
        pg_r = None
    else:
        log_is = None
        if isw is not None:
            log_is = seq_sum(clamped_log(isw), seq_ids, num_seqs)
        if ext_seq is not None:
            log_is = clamped_log(ext_seq) if log_is is None else log_is + clamped_log(ext_seq)
        elif ext is not None:
            log_is = (0 if log_is is None else log_is) + seq_sum(clamped_log(ext), seq_ids, num_seqs)
        phi = vespo_weights(l - old_, seq_ids=seq_ids, num_seqs=num_seqs, adv_seq=adv_seq, log_is_seq=log_is,
                            cfg=cfg)[seq_ids]
        pg, pg_l = vespo_objective(l, adv, phi)
        pg_r = None
    g = torch.ones_like(l)
    e = None
    if cfg.top_entropy_quantile < 1:
        e = entropy_mask(ent, cfg.top_entropy_quantile).to(l.dtype)
        g = g * e
    if cfg.off_policy_mask_threshold is not None:
        sampling = gen if gen is not None else old_
        g = g * off_policy_keep(l, sampling, seq_ids=seq_ids, num_seqs=num_seqs, adv_seq=adv_seq,
                                threshold=cfg.off_policy_mask_threshold)[seq_ids]
    if obj != "vespo":
        if isw is not None:
            g = g * isw
        if ext is not None:
            g = g * ext
    kl = dkl = None
    if ref is not None:
        kl, dkl = kl_estimate(l, ref, cfg.kl_estimator)
        if cfg.use_bias_correction_kl:
            kl_raw, kl, dkl = kl, rho * kl, rho * dkl
    zeros = torch.zeros_like(l)
    c_h = None
    if cfg.entropy_coef != 0:
        c_h = -cfg.entropy_coef * w * (e if e is not None else 1.0)  # dJ/dH
    j = w * (g * pg + cfg.beta * (zeros if kl is None else kl))
    if c_h is not None:
        j = j + c_h * ent
    terms = {"j": j, "kl": zeros if kl is None else kl, "ratio": rho}
    if not need_grad:
        return terms, None, None
    through_r = zeros if pg_r is None else w * g * pg_r  # what reaches l through r (the ratio)
    if kl is not None and cfg.use_bias_correction_kl:
        through_r = through_r + w * cfg.beta * rho * kl_raw  # d(rho kl)/dr = rho kl
    if cfg.importance_sampling == "sequence":
        through_r = seq_mean(through_r, seq_ids, num_seqs)[seq_ids]
    c = through_r
    if pg_l is not None:
        c = c + w * g * pg_l
    if dkl is not None:
        c = c + w * cfg.beta * dkl
    return terms, c, (None if c_h is None else c_h + zeros)
