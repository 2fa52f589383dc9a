"""verl: the fused forward of ``use_fused_kernels`` computed by exgrpo_kernels.

verl's actor, with ``use_fused_kernels``, replaces a causal LM's ``forward`` with one that returns per-token
``log_probs`` and ``entropy`` from the last hidden states (``CausalLMOutputForPPO``), through
``FusedLinearForPPO`` (torch) or its Triton ``linear_cross_entropy``. This module has both shapes:

    from exgrpo_kernels.integrations.verl import FusedLinearForPPO, patch_model
    log_probs, entropy = FusedLinearForPPO()(hidden_states [B, T, H] | [T, H], lm_head.weight, rolled_ids, temperature)
    patch_model(model)          # model(input_ids, ..., temperature=t) -> .log_probs, .entropy  ([B, T] each)

Labels are rolled as verl rolls them (the last position scores the first token of its row, as in verl; the actor
masks it). verl is not needed to import or use this module.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from ..logprobs import fused_linear_logprobs
from .hf import logit_options


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` interface: (hidden_states [B, T, H] or [T, H], vocab_weights [V, H],
    input_ids [B, T] or [T] (the rolled labels), temperature) -> (log_probs, entropy), fp32, input's leading shape.
    ``chunk_size`` and ``impl_backend`` are accepted for compatibility; tiles are sized by the kernel."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        self.chunk_size, self.impl_backend = chunk_size, impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0, bias=None, softcap=None,
                logit_scale: float = 1.0):
        lead = hidden_states.shape[:-1]
        h = hidden_states.reshape(-1, hidden_states.shape[-1])
        lp, ent = fused_linear_logprobs(h, vocab_weights, input_ids.reshape(-1).long(), bias=bias,
                                        temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                                        return_entropy=True)
        return lp.view(lead), ent.view(lead)


def _output_class():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclass
    class CausalLMOutputForPPO(CausalLMOutputWithPast):
        log_probs: torch.FloatTensor | None = None
        entropy: torch.FloatTensor | None = None

    return CausalLMOutputForPPO


def forward_with_exgrpo_backend(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                                output_hidden_states=None, return_dict=None, cache_position=None, logits_to_keep=0,
                                temperature: float = 1.0, shift_labels=None, **loss_kwargs):
    """verl's ``forward_with_torch_backend`` signature and output (``CausalLMOutputForPPO``), through
    exgrpo_kernels: the decoder, then log-probs and entropy of the rolled labels (``shift_labels`` taken as is)."""
    decoder = getattr(self, self.base_model_prefix)
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                      output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                      cache_position=cache_position)
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise RuntimeError("forward_with_exgrpo_backend: pass labels, shift_labels or input_ids")
    head = self.get_output_embeddings()
    softcap, scale = logit_options(self.config)
    log_probs, entropy = FusedLinearForPPO()(outputs[0], head.weight, rolled, temperature, bias=head.bias,
                                             softcap=softcap, logit_scale=scale)
    return _output_class()(log_probs=log_probs, entropy=entropy, past_key_values=outputs.past_key_values,
                           hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def patch_model(model) -> None:
    """Install ``forward_with_exgrpo_backend`` as ``model.forward`` (what verl's monkey patch does for its backends)."""
    model.forward = types.MethodType(forward_with_exgrpo_backend, model)
