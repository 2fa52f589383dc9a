"""Per-token log-probs (and entropy) straight from hidden states and the lm_head weight.

``fused_linear_logprobs`` never holds the [N, V] logits: it walks token chunks, computes one
[chunk, V] logits tile with a GEMM, reduces it with a Triton row kernel (online log-sum-exp in
fp32) and drops it. The backward recomputes each tile and turns it, in place, into the gradient
of the logits, which two GEMMs take to grad-hidden and grad-weight (fp32 accumulation): 1 GEMM
forward, 3 backward. For a scalar loss of the log-probs (SFT) use ``fused_linear_nll_loss``: 3 in all.

``logprobs_reference`` is the plain-torch definition.
"""
from __future__ import annotations

import torch

from ._rows import Tiles, chunk_grad_, chunk_rows, chunk_stats
from ._utils import IGNORE_INDEX, check_hidden_weight_targets, dense_1d, gemm_dtype, resolve_backend

# ----------------------------------------------------------------------------------------------
# autograd Function
# ----------------------------------------------------------------------------------------------


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_tau, with_entropy, chunk, mdt, zdt, backend):
        N = hidden.shape[0]
        logp = torch.full((N,), float("nan"), dtype=torch.float32, device=hidden.device)
        lse = torch.full_like(logp, float("nan"))
        ent = torch.full_like(logp, float("nan")) if with_entropy else None
        with torch.autocast(hidden.device.type, enabled=False):
            tiles = Tiles(hidden, weight, mdt, zdt, False, False, hidden.dtype)
            for s in range(0, N, chunk):
                e = min(N, s + chunk)
                _, z, _ = tiles.logits(s, e)
                lp, ls, en = chunk_stats(z, targets[s:e], inv_tau, with_entropy, backend)
                del z
                logp[s:e], lse[s:e] = lp, ls
                if with_entropy:
                    ent[s:e] = en
        ctx.save_for_backward(hidden, weight, targets, lse, ent if with_entropy else lse)
        ctx.cfg = (inv_tau, with_entropy, chunk, mdt, zdt, backend)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        inv_tau, with_entropy, chunk, mdt, zdt, backend = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = hidden.shape[0]
        # upstream gradients come in any layout (.sum() gives a stride-0 vector): dense fp32 before the kernels
        c_l = torch.zeros(N, dtype=torch.float32, device=hidden.device) if grad_logp is None else dense_1d(grad_logp, torch.float32)
        c_h = dense_1d(grad_ent, torch.float32) if (with_entropy and grad_ent is not None) else None
        with torch.autocast(hidden.device.type, enabled=False):
            tiles = Tiles(hidden, weight, mdt, zdt, need_h, need_w, hidden.dtype)
            for s in range(0, N, chunk):
                e = min(N, s + chunk)
                hc, z, g = tiles.logits(s, e)
                chunk_grad_(z, targets[s:e], lse[s:e], ent[s:e] if c_h is not None else None, c_l[s:e],
                            None if c_h is None else c_h[s:e], inv_tau, backend, out=g)
                tiles.backprop(g, s, e, hc)
                del hc, z, g
        gw = tiles.grad_w.to(weight.dtype) if need_w else None
        return tiles.grad_h, gw, None, None, None, None, None, None, None


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          temperature: float = 1.0, return_entropy: bool = False, chunk_size: int | None = None,
                          fp32_logits: bool = False, backend: str = "auto"):
    """log softmax(hidden @ weight.T / temperature)[targets], without the [N, V] logits.

    Args:
        hidden: [N, H] bf16/fp16/fp32 (tokens flattened: padded or packed).
        weight: [V, H], same dtype and device as hidden (the lm_head).
        targets: [N] int64/int32, the next token of each position; -100 = no target (log-prob 0, no gradient).
        temperature: the sampling temperature tau (> 0); logits are divided by it before the softmax.
        return_entropy: also return the entropy of softmax(logits / tau) per row (differentiable).
        chunk_size: rows per logits tile; default keeps a tile near 512 MiB (CUDA) / 64 MiB (CPU).
        fp32_logits: compute the logits tile in fp32 (CUDA: fp32 GEMM output from bf16 operands).
        backend: "auto" (Triton on CUDA, chunked torch on the CPU; ``$EXGRPO_KERNEL_BACKEND`` overrides),
            "triton" or "torch".

    Mixed precision: under ``torch.autocast`` the GEMMs run in the autocast dtype (fp32 parameters and
    hidden states are cast as ``torch.nn.functional.linear`` would); gradients come back in hidden's and
    weight's own dtypes. Without autocast hidden and weight must share a dtype.

    Returns:
        logp [N] fp32, or (logp [N] fp32, entropy [N] fp32) if return_entropy. Differentiable with
        respect to hidden and weight (log-sum-exp and log-probs accumulate in fp32).
    """
    check_hidden_weight_targets(hidden, weight, targets)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    be = resolve_backend(backend, hidden.device)
    mdt = gemm_dtype(hidden, weight)
    zdt = torch.promote_types(mdt, torch.float32) if fp32_logits else mdt
    if chunk_size is None:
        chunk_size = chunk_rows(weight.shape[0], weight.shape[1], zdt, hidden.device,
                                accumulate_weight=torch.is_grad_enabled() and weight.requires_grad)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    logp, ent = _FusedLinearLogprobs.apply(hidden, weight, dense_1d(targets, torch.int64), 1.0 / float(temperature),
                                           bool(return_entropy), int(chunk_size), mdt, zdt, be)
    return (logp, ent) if return_entropy else logp


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                       temperature: float = 1.0, return_entropy: bool = False, logits_dtype=None):
    """Plain torch: full [N, V] logits (in ``logits_dtype``, default hidden's), log-softmax in
    max(fp32, hidden dtype). Pass float64 tensors for a float64 ground truth."""
    z = hidden @ weight.t()
    if logits_dtype is not None:
        z = z.to(logits_dtype)
    z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
    lsm = torch.log_softmax(z, dim=-1)
    valid = targets != IGNORE_INDEX
    logp = torch.where(valid, lsm.gather(1, torch.where(valid, targets, 0).long().unsqueeze(1)).squeeze(1), 0.0)
    if not return_entropy:
        return logp
    ent = -(lsm.exp() * lsm).sum(-1)
    return logp, ent
