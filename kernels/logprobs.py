"""Per-token log-probs (and entropy) straight from hidden states and the lm_head weight.

``fused_linear_logprobs`` never holds the [N, V] logits: it walks token chunks, computes one
[chunk, V] logits tile with a GEMM, reduces it with a Triton row kernel (online log-sum-exp in
fp32) and drops it. The backward recomputes each tile and turns it, in place, into the gradient
of the logits, which two GEMMs take to grad-hidden and grad-weight (fp32 accumulation): 1 GEMM
forward, 3 backward. For a scalar loss of the log-probs (SFT) use ``fused_linear_nll_loss``: 3 in all.

The op is registered with ``torch.library`` (``exgrpo::logprobs`` and its backward), so ``torch.compile`` of a
caller keeps it as one node (no graph break). ``logprobs_reference`` is the plain-torch definition.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._rows import LogitTransform, Tiles, chunk_grad_, chunk_rows, chunk_stats
from ._utils import IGNORE_INDEX, check_head, check_hidden_weight_targets, dense_1d, gemm_dtype, resolve_backend

# ----------------------------------------------------------------------------------------------
# the op: forward and backward as torch.library custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("exgrpo::logprobs", mutates_args=())
def _logprobs_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
                 inv_tau: float, scale: float, softcap: float, with_entropy: bool, chunk: int, mdt: torch.dtype,
                 zdt: torch.dtype, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logp [N] fp32, entropy [N] fp32 or [0], lse [N] fp32)."""
    N = hidden.shape[0]
    xf = LogitTransform(inv_tau, scale, softcap or None)
    logp = torch.full((N,), float("nan"), dtype=torch.float32, device=hidden.device)
    lse = torch.full_like(logp, float("nan"))
    ent = torch.full_like(logp, float("nan")) if with_entropy else logp.new_empty(0)
    with torch.autocast(hidden.device.type, enabled=False):
        tiles = Tiles(hidden, weight, mdt, zdt, False, False, hidden.dtype, bias=bias)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            _, z, _ = tiles.logits(s, e)
            lp, ls, en = chunk_stats(z, targets[s:e], xf, with_entropy, backend)
            del z
            logp[s:e], lse[s:e] = lp, ls
            if with_entropy:
                ent[s:e] = en
    return logp, ent, lse


@_logprobs_op.register_fake
def _(hidden, weight, targets, bias, inv_tau, scale, softcap, with_entropy, chunk, mdt, zdt, backend):
    N = hidden.shape[0]
    f = lambda n: hidden.new_empty((n,), dtype=torch.float32)  # noqa: E731
    return f(N), f(N if with_entropy else 0), f(N)


@torch.library.custom_op("exgrpo::logprobs_backward", mutates_args=())
def _logprobs_backward_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: Optional[torch.Tensor], lse: torch.Tensor, ent: torch.Tensor, grad_logp: torch.Tensor,
                          grad_ent: Optional[torch.Tensor], inv_tau: float, scale: float, softcap: float, chunk: int,
                          mdt: torch.dtype, zdt: torch.dtype, backend: str, need_h: bool, need_w: bool,
                          need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_hidden, grad_weight, grad_bias), each [0] when not needed."""
    N = hidden.shape[0]
    xf = LogitTransform(inv_tau, scale, softcap or None)
    # upstream gradients come in any layout (.sum() gives a stride-0 vector): dense fp32 before the kernels
    c_l = dense_1d(grad_logp, torch.float32)
    c_h = dense_1d(grad_ent, torch.float32) if grad_ent is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        tiles = Tiles(hidden, weight, mdt, zdt, need_h, need_w, hidden.dtype, bias=bias, need_b=need_b)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            hc, z, g = tiles.logits(s, e)
            chunk_grad_(z, targets[s:e], lse[s:e], ent[s:e] if c_h is not None else None, c_l[s:e],
                        None if c_h is None else c_h[s:e], xf, backend, out=g)
            tiles.backprop(g, s, e, hc)
            del hc, z, g
    gw, gb = tiles.weight_grads(weight, bias)
    empty = hidden.new_empty  # a fresh [0] tensor per output: outputs may not alias each other
    return (tiles.grad_h if need_h else empty(0)), (gw if need_w else empty(0)), (gb if gb is not None else empty(0))


@_logprobs_backward_op.register_fake
def _(hidden, weight, targets, bias, lse, ent, grad_logp, grad_ent, inv_tau, scale, softcap, chunk, mdt, zdt, backend,
      need_h, need_w, need_b):
    e = hidden.new_empty
    return (torch.empty_like(hidden) if need_h else e(0), torch.empty_like(weight) if need_w else e(0),
            torch.empty_like(bias) if (need_b and bias is not None) else e(0))


def _setup(ctx, inputs, output):
    hidden, weight, targets, bias, inv_tau, scale, softcap, with_entropy, chunk, mdt, zdt, backend = inputs
    logp, ent, lse = output
    ctx.save_for_backward(hidden, weight, targets, bias, lse, ent)
    ctx.cfg = (inv_tau, scale, softcap, with_entropy, chunk, mdt, zdt, backend)


def _backward(ctx, grad_logp, grad_ent, _grad_lse):
    hidden, weight, targets, bias, lse, ent = ctx.saved_tensors
    inv_tau, scale, softcap, with_entropy, chunk, mdt, zdt, backend = ctx.cfg
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = bias is not None and ctx.needs_input_grad[3]
    if grad_logp is None:
        grad_logp = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    gh, gw, gb = _logprobs_backward_op(hidden, weight, targets, bias, lse, ent, grad_logp,
                                       grad_ent if with_entropy else None, inv_tau, scale, softcap, chunk, mdt, zdt,
                                       backend, need_h, need_w, need_b)
    return (gh if need_h else None, gw if need_w else None, None, gb if need_b else None) + (None,) * 8


_logprobs_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, softcap: float | None = None,
                          logit_scale: float = 1.0, return_entropy: bool = False, chunk_size: int | None = None,
                          fp32_logits: bool = False, backend: str = "auto"):
    """log softmax(z / temperature)[targets] with z = soft_cap(logit_scale (hidden @ weight.T + bias)), without
    the [N, V] logits.

    Args:
        hidden: [N, H] bf16/fp16/fp32/fp64 (tokens flattened: padded or packed; any strides).
        weight: [V, H] the lm_head, same device (same dtype unless under torch.autocast).
        targets: [N] int64/int32, the next token of each position; -100 = no target (log-prob 0, no gradient).
        bias: [V] lm_head bias or None.
        temperature: the sampling temperature tau (> 0); logits are divided by it before the softmax.
        softcap: final logit soft-capping (Gemma-2/3 ``final_logit_softcapping``): z <- softcap tanh(z / softcap),
            applied before the temperature. None = off.
        logit_scale: multiplies the logits before the soft-cap (Cohere's ``logit_scale``). Default 1.
        return_entropy: also return the entropy of the distribution per row (differentiable).
        chunk_size: rows per logits tile; default: see ``_rows.chunk_rows``.
        fp32_logits: compute the logits tile in fp32 (CUDA: fp32 GEMM output from bf16 operands).
        backend: "auto" (Triton on CUDA; on the CPU the native C++ kernels where built, else the chunked torch
            twins; ``$EXGRPO_KERNEL_BACKEND`` overrides), "triton", "native" or "torch".

    Mixed precision: under ``torch.autocast`` the GEMMs run in the autocast dtype (fp32 parameters and
    hidden states are cast as ``torch.nn.functional.linear`` would); gradients come back in hidden's,
    weight's and bias's own dtypes. Without autocast hidden and weight must share a dtype.

    Returns:
        logp [N] fp32, or (logp [N] fp32, entropy [N] fp32) if return_entropy. Differentiable with
        respect to hidden, weight and bias (log-sum-exp and log-probs accumulate in fp32).
    """
    check_hidden_weight_targets(hidden, weight, targets)
    check_head(weight, bias, temperature, softcap, logit_scale)
    be = resolve_backend(backend, hidden.device)
    mdt = gemm_dtype(hidden, weight)
    zdt = torch.promote_types(mdt, torch.float32) if fp32_logits else mdt
    if chunk_size is None:
        chunk_size = chunk_rows(weight.shape[0], weight.shape[1], zdt, hidden.device,
                                accumulate_weight=torch.is_grad_enabled() and weight.requires_grad)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    logp, ent, _ = _logprobs_op(hidden, weight, dense_1d(targets, torch.int64), bias, 1.0 / float(temperature),
                                float(logit_scale), float(softcap or 0.0), bool(return_entropy), int(chunk_size), mdt,
                                zdt, be)
    return (logp, ent) if return_entropy else logp


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def reference_logits(hidden, weight, bias=None, *, temperature=1.0, softcap=None, logit_scale=1.0, logits_dtype=None):
    """Plain torch: the full [N, V] logits the softmax sees, in max(fp32, hidden's dtype) (or via
    ``logits_dtype`` first: torch's own low-precision pipeline)."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    if logits_dtype is not None:
        z = z.to(logits_dtype)
    z = z.to(torch.promote_types(z.dtype, torch.float32)) * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias=None,
                       temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                       return_entropy: bool = False, logits_dtype=None):
    """Plain torch: full [N, V] logits (in ``logits_dtype``, default hidden's), log-softmax in
    max(fp32, hidden dtype). Pass float64 tensors for a float64 ground truth."""
    z = reference_logits(hidden, weight, bias, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                         logits_dtype=logits_dtype)
    lsm = torch.log_softmax(z, dim=-1)
    valid = targets != IGNORE_INDEX
    logp = torch.where(valid, lsm.gather(1, torch.where(valid, targets, 0).long().unsqueeze(1)).squeeze(1), 0.0)
    if not return_entropy:
        return logp
    ent = -(lsm.exp() * lsm).sum(-1)
    return logp, ent
