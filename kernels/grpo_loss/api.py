"""``fused_linear_grpo_loss``: the public function (input checks, then the ``exgrpo::grpo`` op) and its metrics."""
from __future__ import annotations

import torch

from .._utils import (FLOAT_DTYPES, INT_DTYPES, check_1d, check_head, check_hidden_weight_targets, gemm_dtype,
                      resolve_backend)
from .config import GRPOLossConfig
from .ops import GRPO_OUTPUTS, grpo_op


def grpo_metrics(active, logp, ratio, kl, ent, adv_tok, gen_diff, cfg: GRPOLossConfig, has_ref: bool) -> dict:
    """Micro-batch token means over the active tokens (``active`` [N] bool; the per-token inputs are [N] fp32, 0
    outside), detached 0-d fp32 tensors by name: kl (bias-corrected where the loss is), clip_frac_low (ratio below
    1 - eps_low where A < 0), clip_frac_high (above 1 + eps_high where A > 0; for cispo above eps_high; sapo and
    vespo clip nothing: 0), ratio_mean, num_tokens; entropy (ent given); gen_logp_abs_diff_mean / _max (|l - l_gen|
    given). All 0 when no token is active. No host sync."""
    m_f = active.float()
    n = m_f.sum()
    den = n.clamp(min=1.0)
    mean = lambda x: (x * m_f).sum() / den  # noqa: E731
    obj = cfg.objective
    if obj == "clip":
        low = mean(((ratio < 1 - cfg.eps_low) & (adv_tok < 0)).float())
        high = mean(((ratio > 1 + cfg.eps_high) & (adv_tok > 0)).float())
    elif obj == "cispo":
        low, high = n * 0, mean(((ratio > cfg.eps_high) & (adv_tok > 0)).float())
    else:
        low = high = n * 0
    out = {"kl": mean(kl) if has_ref else n * 0, "clip_frac_low": low, "clip_frac_high": high,
           "ratio_mean": mean(ratio), "num_tokens": n}
    if ent is not None:
        out["entropy"] = mean(ent)
    if gen_diff is not None:
        out["gen_logp_abs_diff_mean"] = mean(gen_diff)
        out["gen_logp_abs_diff_max"] = torch.where(active, gen_diff, 0.0).max() if gen_diff.numel() else n * 0
    return {k: v.detach() for k, v in out.items()}


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


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
        config: GRPOLossConfig (default GRPOLossConfig(): dapo, beta 0.04, k3, token level).
        old_logp, ref_logp, gen_logp: [N] float log-probs of the old policy, the reference policy and the
            generator (any layout: columns of a batch tensor are fine), or None. old None: ratio 1 (one update per
            batch). ref None needs config.beta == 0. gen needed by config.gen_correction != "off"; when given, the
            mismatch is reported (and it is the sampling policy of config.off_policy_mask_threshold).
        is_weights: external importance weights, [N] per token or [S] per sequence (TRL's ``vllm_is_ratio``), or
            None: they multiply the policy term (vespo: they enter its gamma weight), on top of config.gen_correction.
        bias: [V] lm_head bias or None. softcap, logit_scale: the logit transform (see fused_linear_logprobs).
        num_global_tokens: masked tokens of the whole global batch (all ranks and accumulation steps), for the
            "dapo" / "cispo" / "vespo" aggregation; None = this call's count.

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
        raise ValueError(f"advantages must be a non-empty 1-D [S] tensor, got {_shape(advantages)}")
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
    ext_per_seq = False
    if is_weights is not None:
        if not isinstance(is_weights, torch.Tensor) or is_weights.dim() != 1 or is_weights.shape[0] not in (N, S):
            raise ValueError(f"is_weights must be [N={N}] (per token) or [S={S}] (per sequence), got "
                             f"{_shape(is_weights)}")
        check_1d("is_weights", is_weights, is_weights.shape[0], FLOAT_DTYPES, dev)
        ext_per_seq = is_weights.shape[0] != N  # when S == N the weights are taken per token
    if cfg.beta != 0 and ref_logp is None:
        raise ValueError(f"ref_logp is None but config.beta = {cfg.beta}: pass ref_logp or set beta=0")
    if cfg.gen_correction != "off" and gen_logp is None:
        raise ValueError(f"gen_logp is None but config.gen_correction = {cfg.gen_correction!r}")
    if num_global_tokens is not None:
        num_global_tokens = float(num_global_tokens)
        if not num_global_tokens > 0:
            raise ValueError(f"num_global_tokens must be > 0, got {num_global_tokens}")
    grad_on = torch.is_grad_enabled()
    out = grpo_op(hidden=hidden, weight=weight, targets=targets, seq_ids=seq_ids, advantages=advantages,
                  loss_mask=loss_mask, old=old_logp, ref=ref_logp, gen=gen_logp, ext=is_weights, bias=bias,
                  cfg_key=cfg.key(), ext_per_seq=ext_per_seq,
                  num_global_tokens=-1.0 if num_global_tokens is None else num_global_tokens,
                  inv_tau=1.0 / float(cfg.temperature), scale=float(logit_scale), softcap=float(softcap or 0.0),
                  backend=resolve_backend(cfg.backend, dev), need_h=grad_on and hidden.requires_grad,
                  need_w=grad_on and weight.requires_grad, need_b=grad_on and bias is not None and bias.requires_grad,
                  mdt=gemm_dtype(hidden, weight))
    o = dict(zip(GRPO_OUTPUTS, out))
    metrics = grpo_metrics(o["active"], o["logp"], o["ratio"], o["kl"], o["entropy"] if cfg.compute_entropy else None,
                           o["adv_tok"], o["gen_diff"] if gen_logp is not None else None, cfg, ref_logp is not None)
    return o["loss"], metrics
