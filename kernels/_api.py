"""The public names of exgrpo_kernels (re-exported by __init__)."""
from ._utils import KERNEL_BACKENDS, KernelBackend
from .advantages import grouped_advantages, grouped_advantages_reference
from .grpo_loss import GRPOLossConfig, fused_linear_grpo_loss, grpo_loss_reference
from .logprobs import fused_linear_logprobs, logprobs_reference
from .nll_loss import fused_linear_nll_loss, nll_loss_reference
from .packing import PackedBatch, pack_sequences, pack_sequences_reference, unpack

__all__ = [
    "KERNEL_BACKENDS",
    "KernelBackend",
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
