"""Drop-ins of exgrpo_kernels for other GRPO trainers. Each peer is imported only when its drop-in is used.

- ``FusedLinearGRPOLoss``: Liger-Kernel 0.8.5's ``LigerFusedLinearGRPOLoss`` interface (``.liger``).
- ``exgrpo_kernels.integrations.trl``: TRL's fused LM head (``add_fused_lm_head``) and a ``GRPOTrainer`` using it.
- ``exgrpo_kernels.integrations.verl``: verl's ``FusedLinearForPPO`` and fused ``forward`` (``use_fused_kernels``).
- ``exgrpo_kernels.integrations.openrlhf``: ``FusedActor``, OpenRLHF's ``Actor.forward`` through the fused kernel.
- ``logit_options(config)``: the logit transform (soft-cap, scale) a Hugging Face config applies after its lm_head.
"""
from .hf import logit_options
from .liger import FusedLinearGRPOLoss

__all__ = ["FusedLinearGRPOLoss", "logit_options"]
