"""The GRPO loss in plain torch on full [N, V] logits, sequence by sequence, from the per-token functions of
``losses.py`` (values only: autograd takes the gradients). float64 inputs give the ground truth the kernels are tested
against; logits_dtype=torch.bfloat16 with bf16 inputs gives torch's own bf16 pipeline."""
from __future__ import annotations

import torch

from .._utils import IGNORE_INDEX
from ..logprobs import logprobs_reference
from .config import GRPOLossConfig
from .losses import (clamped_log, clip_objective, cispo_objective, kl_estimate, sapo_objective, vespo_objective,
                     vespo_weights)


def _generator_weight(old, gen, cfg: GRPOLossConfig):
    """One sequence's generator weights [n] (detached)."""
    diff = (old - gen).detach().nan_to_num(0.0)
    level, how = cfg.gen_correction.split("_")
    r = torch.exp(diff) if level == "token" else torch.exp(diff.sum()).expand(diff.shape[0])
    lo, hi = cfg.gen_correction_min, cfg.gen_correction_cap
    if how == "truncate":
        return torch.clamp(r, min=lo, max=hi)
    bad = (r > hi) | ((r < lo) if lo is not None else torch.zeros_like(r, dtype=torch.bool))
    return r.masked_fill(bad, 0.0)


def grpo_loss_reference(hidden, weight, targets, seq_ids, advantages, loss_mask, config=None, *, old_logp=None,
                        ref_logp=None, gen_logp=None, is_weights=None, bias=None, softcap=None, logit_scale=1.0,
                        num_global_tokens=None, logits_dtype=None):
    """Arguments and returns as ``fused_linear_grpo_loss`` (plus logits_dtype)."""
    cfg = config if config is not None else GRPOLossConfig()
    logp, ent = logprobs_reference(hidden, weight, targets, bias=bias, temperature=cfg.temperature, softcap=softcap,
                                   logit_scale=logit_scale, return_entropy=True, logits_dtype=logits_dtype)
    S = advantages.shape[0]
    per_seq_ext = is_weights is not None and is_weights.shape[0] == S and S != hidden.shape[0]
    m = loss_mask.bool() & (targets != IGNORE_INDEX)
    M = int(m.sum())
    emask = torch.ones_like(m)  # TRL's entropy masking: the quantile over every covered token of the call
    if cfg.top_entropy_quantile < 1 and M:
        emask = ent.detach() >= torch.quantile(ent.detach()[m].float(), 1 - cfg.top_entropy_quantile).to(ent.dtype)
    loss = logp.sum() * 0
    toks = {"kl": [], "ratio": [], "adv": [], "ent": [], "diff": [], "low": [], "high": []}
    for i in range(S):
        sel = (seq_ids == i) & m
        n = int(sel.sum())
        if n == 0:
            continue
        l = logp[sel]
        old = l.detach() if old_logp is None else old_logp[sel].to(l.dtype)
        a = advantages[i].to(l.dtype)
        log_ratio = l - old
        if cfg.importance_sampling == "sequence":
            log_ratio = (log_ratio.sum() / n).expand(n)
        rho = torch.exp(log_ratio)
        ext = None
        if is_weights is not None:
            ext = (is_weights[i].expand(n) if per_seq_ext else is_weights[sel]).to(l.dtype)
        isw = _generator_weight(old, gen_logp[sel].to(l.dtype), cfg) if cfg.gen_correction != "off" else None
        if cfg.objective == "clip":
            pg = clip_objective(rho, a, eps_low=cfg.eps_low, eps_high=cfg.eps_high, delta=cfg.delta)[0]
        elif cfg.objective == "cispo":
            pg = cispo_objective(rho, l, a, eps_high=cfg.eps_high)[0]
        elif cfg.objective == "sapo":
            pg = sapo_objective(rho, a.expand(n), tau_pos=cfg.sapo_temperature_pos,
                                tau_neg=cfg.sapo_temperature_neg)[0]
        else:
            log_is = torch.zeros((), dtype=l.dtype)
            if isw is not None:
                log_is = log_is + clamped_log(isw).sum()
            if ext is not None:
                log_is = log_is + (clamped_log(ext[:1]).sum() if per_seq_ext else clamped_log(ext).sum())
            phi = vespo_weights((l - old).detach(), seq_ids=torch.zeros(n, dtype=torch.long), num_seqs=1,
                                adv_seq=a.reshape(1), log_is_seq=log_is.reshape(1), cfg=cfg)
            pg = vespo_objective(l, a, phi)[0]
        if cfg.off_policy_mask_threshold is not None:
            sampling = old if gen_logp is None else gen_logp[sel].to(l.dtype)
            drift = (sampling - l.detach()).nan_to_num(0.0).mean()
            if not (a >= 0 or drift <= cfg.off_policy_mask_threshold):
                pg = pg * 0
        pg = pg * emask[sel].to(l.dtype)
        if cfg.objective != "vespo":
            pg = pg if isw is None else pg * isw
            pg = pg if ext is None else pg * ext
        kl = torch.zeros_like(l)
        if ref_logp is not None:
            kl = kl_estimate(l, ref_logp[sel].to(l.dtype), cfg.kl_estimator)[0]
            if cfg.use_bias_correction_kl:
                kl = kl * rho
        per_tok = pg + cfg.beta * kl - cfg.entropy_coef * emask[sel].to(l.dtype) * ent[sel]
        agg = cfg.aggregation
        if agg == "seq_mean":
            loss = loss + per_tok.sum() / n / S
        elif agg == "token_mean":
            loss = loss + per_tok.sum() / max(M, 1)
        elif agg == "constant":
            loss = loss + per_tok.sum() / (S * cfg.max_completion_length)
        elif agg == "seq_sum":
            loss = loss + per_tok.sum() / S
        else:
            loss = loss + per_tok.sum() / (num_global_tokens if num_global_tokens is not None else max(M, 1))
        r = rho.detach()
        if cfg.objective == "clip":
            low, high = (r < 1 - cfg.eps_low) & (a < 0), (r > 1 + cfg.eps_high) & (a > 0)
        elif cfg.objective == "cispo":
            low, high = torch.zeros_like(r, dtype=torch.bool), (r > cfg.eps_high) & (a > 0)
        else:
            low = high = torch.zeros_like(r, dtype=torch.bool)
        toks["kl"].append(kl.detach())
        toks["ratio"].append(r)
        toks["adv"].append(a.expand(n))
        toks["ent"].append(ent[sel].detach())
        toks["low"].append(low)
        toks["high"].append(high)
        if gen_logp is not None:
            toks["diff"].append((l - gen_logp[sel]).abs().detach())
    metrics = {"num_tokens": torch.tensor(float(M))}
    if M:
        cat = {k: torch.cat(v) for k, v in toks.items() if v}
        metrics.update(kl=cat["kl"].mean() if ref_logp is not None else torch.tensor(0.0),
                       clip_frac_low=cat["low"].double().mean(), clip_frac_high=cat["high"].double().mean(),
                       ratio_mean=cat["ratio"].mean(), entropy=cat["ent"].mean())
        if gen_logp is not None:
            metrics.update(gen_logp_abs_diff_mean=cat["diff"].mean(), gen_logp_abs_diff_max=cat["diff"].max())
    return loss, metrics
