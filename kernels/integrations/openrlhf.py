"""OpenRLHF: an actor whose ``forward`` returns per-token log-probs through exgrpo_kernels.

OpenRLHF's ``Actor.forward`` runs the model, materialises fp32 [B, T, V] logits, divides them by the temperature
and takes log-probs of the rolled sequence. ``FusedActor`` has the same ``forward`` signature and return for the
unpacked path, computing only the action positions' log-probs (and, when asked, every position's entropy)
straight from the last hidden states:

    from exgrpo_kernels.integrations.openrlhf import FusedActor
    actor = FusedActor(hf_causal_lm, temperature=1.0)
    action_log_probs = actor(sequences [B, T], action_mask [B, A], attention_mask [B, T])   # [B, A]

Sample packing with ring attention (``packed_seq_lens`` / ``ring_attn_group``) raises NotImplementedError.
OpenRLHF is not needed to import or use this module.
"""
from __future__ import annotations

import torch

from ..logprobs import fused_linear_logprobs
from .hf import logit_options


class FusedActor(torch.nn.Module):
    def __init__(self, model, temperature: float = 1.0, packing_samples: bool = False):
        super().__init__()
        if packing_samples:
            raise NotImplementedError("FusedActor: packing_samples (ring-attention packing) is not supported")
        self.model, self.temperature, self.packing_samples = model, float(temperature), False

    def forward(self, sequences, action_mask=None, attention_mask=None, return_output=False, allgather_logits=False,
                return_logprobs=False, ring_attn_group=None, packed_seq_lens=None, return_entropy=False, **mm_inputs):
        """sequences [B, T], action_mask [B, A] (the last A tokens are actions), attention_mask [B, T].
        Returns action log-probs [B, A] (x action_mask); with ``return_logprobs`` and no action_mask, log-probs
        [B, T-1]; ``return_output`` adds a dict with ``last_hidden_state`` (and ``entropy`` [B, T-1] when asked)."""
        if ring_attn_group is not None or packed_seq_lens is not None:
            raise NotImplementedError("FusedActor: ring-attention packing is not supported")
        if mm_inputs:
            raise NotImplementedError("FusedActor: multimodal inputs are not supported")
        if not (return_logprobs or action_mask is not None or return_output):
            raise ValueError("FusedActor: pass action_mask, return_logprobs=True or return_output=True")
        B, T = sequences.shape
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        decoder = getattr(self.model, self.model.base_model_prefix)
        h = decoder(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        head = self.model.get_output_embeddings()
        softcap, scale = logit_options(self.model.config)
        kw = dict(bias=head.bias, temperature=self.temperature, softcap=softcap, logit_scale=scale)
        output = {"last_hidden_state": h}
        # positions 0 .. T-2 predict tokens 1 .. T-1 (OpenRLHF: log_probs of the rolled sequence, last one dropped)
        start = 0 if (return_logprobs and action_mask is None) or return_entropy else T - 1 - action_mask.shape[1]
        hs = h[:, start:T - 1].reshape(-1, h.shape[-1])
        tg = sequences[:, start + 1:].reshape(-1)
        res = fused_linear_logprobs(hs, head.weight, tg, return_entropy=return_entropy, **kw)
        lp, ent = res if return_entropy else (res, None)
        lp = lp.view(B, T - 1 - start)
        if ent is not None:
            output["entropy"] = ent.view(B, T - 1 - start)
        if action_mask is None:
            return (lp, output) if return_output else lp
        action_log_probs = lp[:, -action_mask.shape[1]:] * action_mask.float()
        return (action_log_probs, output) if return_output else action_log_probs
