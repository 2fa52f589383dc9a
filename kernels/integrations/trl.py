"""TRL: the fused LM head of ``GRPOTrainer`` computed by exgrpo_kernels.

TRL (>= 1.x) computes per-token log-probs and entropies in its own chunked kernel behind
``model(..., labels=labels, fused_lm_head=True)``, installed by ``trl.trainer.utils.add_fused_lm_head``. This module
provides the same contract backed by ``fused_linear_logprobs`` (lm_head bias, Gemma-2/3 soft-capping and logit
scales read from the config, autocast, FSDP2 DTensor heads), and a ``GRPOTrainer`` that installs it:

    from exgrpo_kernels.integrations.trl import GRPOTrainer     # instead of: from trl import GRPOTrainer
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

or, for a model you patch yourself, ``add_fused_lm_head(model, temperature=..., outputs=("log_probs", "entropy"))``.
The loss math stays TRL's (every loss type, every option). TRL is imported only when these are used.
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch

from ..logprobs import fused_linear_logprobs
from .hf import logit_options

SUPPORTED_OUTPUTS = ("log_probs", "entropy")


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """TRL's ``add_fused_lm_head`` contract: ``model(..., labels=labels, fused_lm_head=True)`` returns
    ``FusedCausalLMOutput(loss, log_probs [B, T-1], entropy [B, T-1] or None, label_mask)`` (``shift_labels``: no
    shift) without the [B, T, V] logits; without ``fused_lm_head`` the model's own forward runs (generation is
    unchanged). Computed by ``exgrpo_kernels.fused_linear_logprobs``; outputs other than log_probs / entropy, and
    MoE router losses, raise NotImplementedError."""
    unknown = [o for o in outputs if o not in SUPPORTED_OUTPUTS]
    if unknown:
        raise NotImplementedError(f"exgrpo_kernels' fused LM head computes {SUPPORTED_OUTPUTS}; not {unknown}")
    from trl.trainer.utils import FusedCausalLMOutput
    original_forward = model.forward
    softcap, logit_scale = logit_options(model.config)
    with_entropy = "entropy" in outputs

    @functools.wraps(type(model).forward)
    def _fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                       **kwargs):
        if not fused_lm_head:
            for k, v in (("labels", labels), ("shift_labels", shift_labels), ("num_items_in_batch", num_items_in_batch)):
                if v is not None:
                    kwargs[k] = v
            return original_forward(*args, **kwargs)
        if kwargs.get("output_router_logits"):
            raise NotImplementedError("exgrpo_kernels' fused LM head does not compute MoE router losses")
        kwargs["use_cache"] = False
        out = self.base_model(*args, **kwargs)
        if shift_labels is None:
            hidden, labels = out.last_hidden_state[:, :-1], labels[:, 1:]
        else:
            hidden, labels = out.last_hidden_state, shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        ctx = contextlib.nullcontext()
        if cast_lm_head_to_fp32:
            hidden = hidden.float()
            ctx = torch.autocast(hidden.device.type, enabled=False)
        with ctx:
            res = fused_linear_logprobs(hidden[mask], weight, labels[mask], bias=bias, temperature=temperature,
                                        softcap=softcap, logit_scale=logit_scale, return_entropy=with_entropy)
        lp, ent = res if with_entropy else (res, None)
        log_probs = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
        entropy = None if ent is None else ent.new_zeros(mask.shape).masked_scatter(mask, ent)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask)

    model.forward = types.MethodType(_fused_forward, model)


@contextlib.contextmanager
def use_exgrpo_lm_head():
    """While active, TRL's GRPOTrainer installs exgrpo_kernels' fused LM head instead of its own."""
    import trl.trainer.grpo_trainer as grpo_mod
    original = grpo_mod.add_fused_lm_head
    grpo_mod.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        grpo_mod.add_fused_lm_head = original


def __getattr__(name):
    if name == "GRPOTrainer":  # built on first use, so that importing this module does not need TRL
        import trl

        class GRPOTrainer(trl.GRPOTrainer):
            """trl.GRPOTrainer whose policy and reference log-probs and entropies come from exgrpo_kernels."""

            def __init__(self, *args, **kwargs):
                with use_exgrpo_lm_head():
                    super().__init__(*args, **kwargs)

        globals()["GRPOTrainer"] = GRPOTrainer
        return GRPOTrainer
    raise AttributeError(name)
