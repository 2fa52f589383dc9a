"""ExGRPO kernels: fused log-probs, token NLL and GRPO loss from hidden states, group advantages, sequence packing.

Import name: ``exgrpo_kernels`` (the folder ``kernels/`` of the repository, mapped by setup.py). PyPI's ``kernels``
(Hugging Face hub kernels) is probed and imported by transformers; this folder refuses to be imported under that
name, so a checkout on ``sys.path`` never stands in for it (and the custom ops are never registered twice).

Public API (stable; other GRPO projects import exactly these names):
    fused_linear_logprobs, fused_linear_grpo_loss, fused_linear_nll_loss, grouped_advantages, GRPOLossConfig,
    pack_sequences, unpack, PackedBatch; drop-ins for TRL, verl and OpenRLHF in exgrpo_kernels.integrations
"""
if __name__ != "exgrpo_kernels":
    # Imported as `kernels` (a checkout's root on sys.path; transformers probes that name): stay inert. No version,
    # no ops, no submodules: transformers then reports hub kernels unavailable, and nothing is registered twice.
    __all__ = []
else:
    from ._api import *  # noqa: F401,F403
    from ._api import __all__  # noqa: F401
