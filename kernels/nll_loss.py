"""Token-level negative log-likelihood (the SFT loss) straight from hidden states, in 3 vocabulary GEMMs.

loss = -(1 / D) sum_{t : target_t != -100} log softmax(z_t)[target_t],  z = soft_cap(scale (h W^T + b)) / tau,
D = num_global_tokens (default: the number of counted tokens of this call; reduction="sum": D = 1).

The loss is a scalar, so its upstream gradient is known up to one scale factor while the logits tile is
in memory: each [chunk, V] tile is reduced and turned, in place, into dloss/dz by one Triton row kernel,
and two GEMMs take it to grad-hidden and grad-weight (fp32 accumulator). The backward only multiplies the
stored gradients by the upstream scalar. GEMMs: 3 (2 for a frozen weight), against 4 for
``-fused_linear_logprobs(...).sum()`` (whose backward recomputes the tiles). Rows with target -100 are
dropped before any GEMM. Registered as ``exgrpo::nll`` (torch.library): no graph break under torch.compile.

``nll_loss_reference`` is the plain-torch definition.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _native
from ._rows import LogitTransform, Tiles, block_v, chunk_grad_, chunk_rows, chunk_stats, num_warps, row_grad, row_stats
from ._utils import (IGNORE_INDEX, check_head, check_hidden_weight_targets, dense_1d, gemm_dtype, resolve_backend,
                     scale_grads_)
from .logprobs import logprobs_reference

REDUCTIONS = ("mean", "sum")


@triton.jit
def _nll_kernel(Z, stride_z, T, C_L, LOGP, LSE, V, inv_tau, pre, cap, BLOCK_V: tl.constexpr, HAS_CAP: tl.constexpr):
    # l = log softmax(z')[t];  in place: x <- dJ/dx = c_l (onehot - p) dz'/dx   (NLL: c_l = -1 / denominator)
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T + row)
    zrow = Z + row * stride_z
    lse, l, ent = row_stats(zrow, V, t, inv_tau, pre, cap, BLOCK_V, False, HAS_CAP)
    tl.store(LOGP + row, l)
    tl.store(LSE + row, lse)
    row_grad(zrow, zrow, V, 0, t, inv_tau, pre, cap, lse, ent, tl.load(C_L + row), 0.0, BLOCK_V, False, HAS_CAP)


# exgrpo_native::row_stats_grad_ (schema: _native.SCHEMAS): per row of z [C, V] (every t a target), the log-prob and
# log-sum-exp, and z <- dJ/dz for J = sum_rows c_l l. -> (logp [C], lse [C]) fp32


def _stats_grad_triton(z, t, c_l, inv_tau: float, pre: float, cap: float):
    C, V = z.shape
    logp = torch.full((C,), float("nan"), dtype=torch.float32, device=z.device)
    lse = torch.full_like(logp, float("nan"))
    bv = block_v(V)
    _nll_kernel[(C,)](z, z.stride(0), t, c_l, logp, lse, V, inv_tau, pre, cap, BLOCK_V=bv, HAS_CAP=cap > 0,
                      num_warps=num_warps(bv))
    return logp, lse


def _stats_grad_twin(z, t, c_l, inv_tau: float, pre: float, cap: float):
    xf = LogitTransform(inv_tau, pre, cap or None)
    lp, lse, _ = chunk_stats(z, t, xf, False, "torch")
    chunk_grad_(z, t, lse, None, c_l, None, xf, "torch")
    return lp, lse


_native.register("row_stats_grad_", "CUDA", _stats_grad_triton)
_native.register("row_stats_grad_", "CPU", _stats_grad_twin)


@torch.library.custom_op("exgrpo::nll", mutates_args=())
def _nll_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
            inv_tau: float, scale: float, softcap: float, denom: float, chunk: int, mdt: torch.dtype, zdt: torch.dtype,
            backend: str, need_h: bool, need_w: bool,
            need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss 0-d fp32, grad_hidden [N, H] or [0], grad_weight or [0], grad_bias or [0]) for an upstream of 1.
    denom <= 0: divide by the number of counted tokens."""
    N, H = hidden.shape
    dev = hidden.device
    xf = LogitTransform(inv_tau, scale, softcap or None)
    idx = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    n = int(idx.numel())
    all_active = n == N
    h = hidden if all_active else hidden.index_select(0, idx)
    t = targets if all_active else targets.index_select(0, idx)
    nll = torch.full((n,), float("nan"), dtype=torch.float32, device=dev)
    k = 1.0 / (denom if denom > 0 else max(1, n))
    with torch.autocast(dev.type, enabled=False):
        tiles = Tiles(h, weight, mdt, zdt, need_h, need_w, hidden.dtype, bias=bias, need_b=need_b)
        grad = tiles.any_grad
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            hc, z, g = tiles.logits(s, e)
            c = torch.full((e - s,), -k, dtype=torch.float32, device=dev)
            if backend == "torch":
                lp, lse, _ = chunk_stats(z, t[s:e], xf, False, backend)
                if grad:
                    chunk_grad_(z, t[s:e], lse, None, c, None, xf, backend, out=g)
            elif grad:  # one pass per row: statistics, then the row's gradient while it is in cache
                fn = _stats_grad_triton if backend == "triton" else _native.ops.row_stats_grad_
                lp, _ = fn(z, t[s:e], c, *xf.args)
                if g is not z:
                    g.copy_(z)
            else:
                lp, _, _ = chunk_stats(z, t[s:e], xf, False, backend)
            nll[s:e] = -lp
            if grad:
                tiles.backprop(g, s, e, hc)
            del hc, z, g
    loss = nll.sum() * k if n else torch.zeros((), dtype=torch.float32, device=dev)
    gw, gb = tiles.weight_grads(weight, bias)
    gh = tiles.grad_h
    if gh is not None and not all_active:
        gh = torch.zeros((N, H), dtype=hidden.dtype, device=dev).index_copy_(0, idx, gh)
    empty = hidden.new_empty  # a fresh [0] tensor per output: outputs may not alias each other
    return loss, (gh if gh is not None else empty(0)), (gw if gw is not None else empty(0)), (gb if gb is not None else empty(0))


@_nll_op.register_fake
def _(hidden, weight, targets, bias, inv_tau, scale, softcap, denom, chunk, mdt, zdt, backend, need_h, need_w, need_b):
    e = hidden.new_empty
    return (hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden) if need_h else e(0),
            torch.empty_like(weight) if need_w else e(0), torch.empty_like(bias) if (need_b and bias is not None) else e(0))


def _setup(ctx, inputs, output):
    ctx.grads = tuple(g.detach() for g in output[1:])  # the same storage, outside the autograd graph
    ctx.has_bias = inputs[3] is not None


def _backward(ctx, grad_loss, *_):
    gh, gw, gb = (None if g.numel() == 0 and g.dim() == 1 else g for g in ctx.grads)
    del ctx.grads
    gh, gw, gb = scale_grads_(grad_loss, gh, gw, gb)
    need = ctx.needs_input_grad
    return (gh if need[0] else None, gw if need[1] else None, None,
            gb if (ctx.has_bias and need[3]) else None) + (None,) * 11


_nll_op.register_autograd(_backward, setup_context=_setup)


def fused_linear_nll_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, softcap: float | None = None,
                          logit_scale: float = 1.0, reduction: str = "mean", num_global_tokens=None,
                          chunk_size: int | None = None, fp32_logits: bool = False, backend: str = "auto"):
    """Mean (or sum) token NLL of softmax(soft_cap(logit_scale (hidden @ weight.T + bias)) / temperature), without
    the [N, V] logits.

    Args:
        hidden: [N, H] bf16/fp16/fp32/fp64 (tokens flattened: padded or packed; any strides).
        weight: [V, H] the lm_head, same device (same dtype unless under torch.autocast).
        targets: [N] int64/int32, the next token of each position; -100 = not counted (no loss, no gradient).
        bias, temperature, softcap, logit_scale: as ``fused_linear_logprobs``.
        reduction: "mean" (divide by num_global_tokens, default: the counted tokens of this call) or "sum".
        num_global_tokens: the divisor of "mean" across micro-batches and ranks (the loss then does not
            depend on how the global batch was split).
        chunk_size: rows per logits tile (default: ``_rows.chunk_rows``).
        fp32_logits: logits tiles in fp32.
        backend: "auto" | "triton" | "native" | "torch" (as fused_linear_logprobs).

    Mixed precision as fused_linear_logprobs: GEMMs in the autocast dtype under torch.autocast, gradients
    in the inputs' dtypes, log-sum-exp and the loss in fp32.

    Returns:
        loss: 0-d fp32 tensor, differentiable in hidden, weight and bias. GEMMs: 3 (2 when weight needs no grad).
    """
    check_hidden_weight_targets(hidden, weight, targets)
    check_head(weight, bias, temperature, softcap, logit_scale)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    t = dense_1d(targets, torch.int64)
    if reduction == "sum":
        if num_global_tokens is not None:
            raise ValueError("num_global_tokens is the divisor of reduction='mean'; got it with reduction='sum'")
        denom = 1.0
    elif num_global_tokens is not None:
        denom = float(num_global_tokens)
        if not denom > 0:
            raise ValueError(f"num_global_tokens must be > 0, got {num_global_tokens}")
    else:
        denom = -1.0  # the op counts the tokens itself (no host read here: torch.compile traces through)
    be = resolve_backend(backend, hidden.device)
    mdt = gemm_dtype(hidden, weight)
    zdt = torch.promote_types(mdt, torch.float32) if fp32_logits else mdt
    grad_on = torch.is_grad_enabled()
    if chunk_size is None:
        chunk_size = chunk_rows(weight.shape[0], weight.shape[1], zdt, hidden.device,
                                accumulate_weight=grad_on and weight.requires_grad)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    loss, _, _, _ = _nll_op(hidden, weight, t, bias, 1.0 / float(temperature), float(logit_scale), float(softcap or 0.0),
                            denom, int(chunk_size), mdt, zdt, be, grad_on and hidden.requires_grad,
                            grad_on and weight.requires_grad, grad_on and bias is not None and bias.requires_grad)
    return loss


def nll_loss_reference(hidden, weight, targets, *, bias=None, temperature: float = 1.0, softcap=None,
                       logit_scale: float = 1.0, reduction: str = "mean", num_global_tokens=None, logits_dtype=None):
    """Plain torch on full [N, V] logits. float64 inputs give the ground truth."""
    logp = logprobs_reference(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                              logit_scale=logit_scale, logits_dtype=logits_dtype)
    total = -logp.sum()
    if reduction == "sum":
        return total
    n = num_global_tokens if num_global_tokens is not None else max(1, int((targets != IGNORE_INDEX).sum()))
    return total / n
