"""What a Hugging Face config says about the logits after the lm_head."""
from __future__ import annotations


def logit_options(config) -> tuple[float | None, float]:
    """(softcap, logit_scale) of a transformers config (its text config for multimodal models): Gemma-2/3
    ``final_logit_softcapping``; Cohere's ``logit_scale``, ``output_multiplier``, Falcon-H1's
    ``lm_head_multiplier``, Granite / MiniCPM3's ``logits_scaling`` (a divisor; HyperCLOVA X: a multiplier)."""
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(tc, "final_logit_softcapping", None) or None
    scale = getattr(tc, "logit_scale", None)
    if scale is None:
        scale = getattr(tc, "output_multiplier", None)
    if scale is None:
        scale = getattr(tc, "lm_head_multiplier", None)
    if scale is None and getattr(tc, "logits_scaling", None):
        scale = tc.logits_scaling if tc.model_type == "hyperclovax" else 1.0 / tc.logits_scaling
    return softcap, 1.0 if scale is None else float(scale)
