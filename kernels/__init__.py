"""ExGRPO kernels: fused log-probs and GRPO loss from hidden states, group advantages, sequence packing.

Public API (stable; other GRPO projects import exactly these names):
    fused_linear_logprobs, fused_linear_grpo_loss, grouped_advantages, GRPOLossConfig,
    pack_sequences, unpack, PackedBatch
"""
from .advantages import grouped_advantages, grouped_advantages_reference
from .grpo_loss import GRPOLossConfig, fused_linear_grpo_loss, grpo_loss_reference
from .logprobs import fused_linear_logprobs, logprobs_reference
from .nll_loss import fused_linear_nll_loss, nll_loss_reference
from .packing import PackedBatch, pack_sequences, pack_sequences_reference, unpack

__all__ = [
    "GRPOLossConfig",
    "fused_linear_grpo_loss",
    "fused_linear_logprobs",
    "fused_linear_nll_loss",
    "nll_loss_reference",
    "grouped_advantages",
    "grpo_loss_reference",
    "grouped_advantages_reference",
    "logprobs_reference",
    "PackedBatch",
    "pack_sequences",
    "pack_sequences_reference",
    "unpack",
]
