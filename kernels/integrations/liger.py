"""``FusedLinearGRPOLoss``: a drop-in for Liger-Kernel 0.8.5's ``LigerFusedLinearGRPOLoss`` (same constructor, same
``forward`` arguments, same return), computed by this project's fused GRPO kernel (3 vocabulary GEMMs, no
[B, T, V] logits, no chunk loop in Python).

    from exgrpo_kernels.integrations import FusedLinearGRPOLoss   # instead of liger_kernel.chunked_loss's
    loss_fn = FusedLinearGRPOLoss(beta=0.04, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28)
    loss, (kl, clip_ratio) = loss_fn(last_hidden [B, T, H], lm_head.weight, completion_ids [B, T],
                                     completion_mask [B, T], advantages [B], bias=lm_head.bias,
                                     ref_per_token_logps=ref [B, T], old_per_token_logps=old [B, T],
                                     vllm_is_ratio=is_ratio [B, T] | [B, 1] | [B])

Semantics follow Liger's ``ppo_loss_fn`` for every loss type it has (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo,
vespo) at token or sequence level, with ``delta``, ``use_bias_correction_kl``, the sapo temperatures and the vespo
gamma parameters: the dapo / cispo / vespo normaliser is ``num_items_in_batch / world`` or the all-reduced mask sum
/ world, as Liger's; metrics are ``(kl, clip_ratio)`` with beta != 0 and ``(clip_ratio,)`` without; its argument
checks and warnings are Liger's. One difference, on purpose: where Liger's luspo loss is per token (token level, a
KL term or per-token IS ratios) it sums the unmasked [B, T] terms, padded positions included; here, as in TRL
1.16, padded positions are not in the loss (the two agree where nothing is padded). Liger does not need to be
installed.
"""
from __future__ import annotations

import warnings

import torch

from ..grpo_loss import GRPOLossConfig, fused_linear_grpo_loss
from ..logprobs import fused_linear_logprobs

TOKEN_ONLY = ("cispo", "sapo", "vespo")


class FusedLinearGRPOLoss(torch.nn.Module):
    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True, chunk_size: int = 1,
                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "dapo",
                 max_completion_length: int | None = None, importance_sampling_level: str = "token",
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta: float | None = None, use_bias_correction_kl: bool = False, vespo_k_pos: float = 2.0,
                 vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
                 memory_mode: str = "fast"):
        """Liger's arguments; ``compiled`` and ``chunk_size`` are accepted and have no effect (nothing here is
        chunked in Python or compiled). ``memory_mode`` ("fast" | "low_memory") is this kernel's own."""
        super().__init__()
        # Liger's own checks, with its messages (constructor, then its forward's)
        if sapo_temperature_pos <= 0:
            raise ValueError(f"sapo_temperature_pos must be positive, got {sapo_temperature_pos}")
        if sapo_temperature_neg <= 0:
            raise ValueError(f"sapo_temperature_neg must be positive, got {sapo_temperature_neg}")
        if delta is not None and delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        if importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"Unknown importance sampling level: {importance_sampling_level}. Possible values are "
                             f"'token' and 'sequence'.")
        if importance_sampling_level == "sequence" and loss_type in TOKEN_ONLY:
            raise ValueError(f"Sequence-level importance sampling is not supported for loss_type='{loss_type}'. "
                             f"Use importance_sampling_level='token' instead.")
        self.beta, self.use_ref_model, self.temperature = float(beta), use_ref_model, float(temperature)
        self.config = GRPOLossConfig(loss_type=loss_type, importance_sampling=importance_sampling_level,
                                     eps_low=float(epsilon_low), eps_high=float(epsilon_high), delta=delta,
                                     beta=float(beta), kl_estimator="k3", use_bias_correction_kl=use_bias_correction_kl,
                                     sapo_temperature_pos=float(sapo_temperature_pos),
                                     sapo_temperature_neg=float(sapo_temperature_neg), vespo_k_pos=float(vespo_k_pos),
                                     vespo_lambda_pos=float(vespo_lambda_pos), vespo_k_neg=float(vespo_k_neg),
                                     vespo_lambda_neg=float(vespo_lambda_neg), temperature=float(temperature),
                                     max_completion_length=max_completion_length, memory_mode=memory_mode)

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
                vllm_is_ratio=None, num_items_in_batch=None):
        """_input [B, T, H], lin_weight [V, H], selected_token_ids [B, T], attention_mask [B, T], advantages [B],
        bias [V] | None, ref/old per-token log-probs [B, T] | None, ref_input [B, T, H] / ref_weight / ref_bias (the
        reference's hidden states and head, when its log-probs are not given), vllm_is_ratio [B, T] | [B, 1] | [B],
        num_items_in_batch: active tokens of the whole generation batch (all micro-batches and processes).
        Returns (loss, (kl, clip_ratio)) when beta != 0, else (loss, (clip_ratio,))."""
        if _input.dim() != 3:
            raise ValueError(f"_input must be [B, T, H], got {tuple(_input.shape)}")
        B, T, H = _input.shape
        dev = _input.device
        mask = attention_mask.reshape(-1).bool()
        targets = selected_token_ids.reshape(-1).long()
        seq_ids = torch.arange(B, device=dev).repeat_interleave(T)
        flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731
        cfg = self.config
        ref = None
        if self.use_ref_model and ref_per_token_logps is not None and ref_input is not None:
            warnings.warn("Both ref_per_token_logps and ref_input are provided. Using ref_per_token_logps.", stacklevel=2)
        if self.beta != 0.0:
            if ref_per_token_logps is not None:
                ref = flat(ref_per_token_logps)
            elif ref_input is not None:
                with torch.no_grad():
                    ref = fused_linear_logprobs(ref_input.reshape(B * T, H), ref_weight, targets, bias=ref_bias,
                                                temperature=self.temperature)
            elif self.use_ref_model:
                raise ValueError("use_ref_model is True: pass ref_per_token_logps or ref_input")
            else:  # Liger: no reference -> the current log-probs (detached): KL 0, no gradient from it
                cfg = cfg.replace(beta=0.0)
        isw = None
        if vllm_is_ratio is not None:
            r = vllm_is_ratio
            if r.dim() == 2 and r.shape[1] == T and T != 1:
                isw = r.reshape(-1)
            else:
                isw = r.reshape(B)  # per sequence ([B, 1] or [B])
        num_global = None
        if cfg.aggregation == "global_tokens":  # dapo, cispo, vespo
            num_global = _dapo_normalizer(attention_mask, num_items_in_batch)
        loss, m = fused_linear_grpo_loss(_input.reshape(B * T, H), lin_weight, targets, seq_ids, advantages, mask,
                                         cfg, old_logp=flat(old_per_token_logps), ref_logp=ref, is_weights=isw,
                                         bias=bias, num_global_tokens=num_global)
        clip_ratio = m["clip_frac_low"] + m["clip_frac_high"]
        if self.beta != 0.0:
            return loss, (m["kl"], clip_ratio)
        return loss, (clip_ratio,)


def _dapo_normalizer(attention_mask, num_items_in_batch):
    """Liger's / TRL's per-process normaliser: total active tokens of the batch over all processes / world."""
    world = torch.distributed.get_world_size() if (torch.distributed.is_available()
                                                   and torch.distributed.is_initialized()) else 1
    if num_items_in_batch is not None:
        total = float(num_items_in_batch)
    else:
        t = attention_mask.float().sum()
        if world > 1:
            t = t.clone()
            torch.distributed.all_reduce(t)
        total = float(t)
    return max(total / world, 1.0)
