"""Token-level negative log-likelihood (the SFT loss) straight from hidden states, in 3 vocabulary GEMMs.

loss = -(1 / D) sum_{t : target_t != -100} log softmax(h_t W^T / tau)[target_t],
D = num_global_tokens (default: the number of counted tokens of this call; reduction="sum": D = 1).

The loss is a scalar, so its upstream gradient is known up to one scale factor while the logits tile is
in memory: each [chunk, V] tile is reduced and turned, in place, into dloss/dz = -(onehot - p) / (tau D)
by one Triton row kernel, and two GEMMs take it to grad-hidden and grad-weight (fp32 accumulator). The
backward only multiplies the stored gradients by the upstream scalar. GEMMs: 3 (2 for a frozen weight),
against 4 for ``-fused_linear_logprobs(...).sum()`` (whose backward recomputes the tiles).
Rows with target -100 are dropped before any GEMM.

``nll_loss_reference`` is the plain-torch definition.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rows import Tiles, block_v, chunk_grad_, chunk_rows, chunk_stats, num_warps, row_grad, row_stats
from ._utils import IGNORE_INDEX, check_hidden_weight_targets, dense_1d, gemm_dtype, resolve_backend
from .grpo_loss import _scaled_grads
from .logprobs import logprobs_reference

REDUCTIONS = ("mean", "sum")


@triton.jit
def _nll_kernel(Z, stride_z, T, NLL, V, inv_tau, scale, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # l = log softmax(z / tau)[t];  NLL_row = -l;  in place: z <- dJ/dz = -scale (onehot - p) / tau
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T + row)
    zrow = Z + row * stride_z
    lse, l, ent = row_stats(zrow, V, t, inv_tau, BLOCK_V, False)
    tl.store(NLL + row, -l)
    if COMPUTE_GRAD:
        row_grad(zrow, zrow, V, 0, t, inv_tau, lse, ent, -scale, 0.0, BLOCK_V, False)


class _FusedLinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_tau, denom, chunk, mdt, zdt, backend, need_h, need_w):
        N, H = hidden.shape
        dev = hidden.device
        active = targets != IGNORE_INDEX
        idx = active.nonzero().squeeze(1)
        n = int(idx.numel())
        all_active = n == N
        h = hidden if all_active else hidden.index_select(0, idx)
        t = targets if all_active else targets.index_select(0, idx)
        nll = torch.full((n,), float("nan"), dtype=torch.float32, device=dev)
        scale = 1.0 / denom
        with torch.autocast(dev.type, enabled=False):
            tiles = Tiles(h, weight, mdt, zdt, need_h, need_w, hidden.dtype)
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                hc, z, g = tiles.logits(s, e)
                if backend == "triton":
                    C, V = z.shape
                    bv = block_v(V)
                    _nll_kernel[(C,)](z, z.stride(0), t[s:e], nll[s:e], V, inv_tau, scale,
                                      COMPUTE_GRAD=need_h or need_w, BLOCK_V=bv, num_warps=num_warps(bv))
                    if (need_h or need_w) and g is not z:
                        g.copy_(z)
                else:
                    lp, lse, _ = chunk_stats(z, t[s:e], inv_tau, False, backend)
                    nll[s:e] = -lp
                    if need_h or need_w:
                        c = torch.full((e - s,), -scale, dtype=torch.float32, device=dev)
                        chunk_grad_(z, t[s:e], lse, None, c, None, inv_tau, backend, out=g)
                if need_h or need_w:
                    tiles.backprop(g, s, e, hc)
                del hc, z, g
        loss = nll.sum() * scale if n else torch.zeros((), dtype=torch.float32, device=dev)
        ctx.saved = (N, H, idx, all_active, hidden.dtype, tiles.grad_h,
                     None if tiles.grad_w is None else tiles.grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        N, H, idx, all_active, hdt, gh, gw = ctx.saved
        del ctx.saved
        gh_full, gw_out = _scaled_grads(grad_loss, gh, gw, ctx.needs_input_grad, N, H, idx, all_active, hdt)
        return gh_full, gw_out, None, None, None, None, None, None, None, None, None


def fused_linear_nll_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          temperature: float = 1.0, reduction: str = "mean", num_global_tokens=None,
                          chunk_size: int | None = None, fp32_logits: bool = False, backend: str = "auto"):
    """Mean (or sum) token NLL of softmax(hidden @ weight.T / temperature), without the [N, V] logits.

    Args:
        hidden: [N, H] bf16/fp16/fp32/fp64 (tokens flattened: padded or packed; any strides).
        weight: [V, H] the lm_head, same device (same dtype unless under torch.autocast).
        targets: [N] int64/int32, the next token of each position; -100 = not counted (no loss, no gradient).
        temperature: tau > 0. Default 1.0.
        reduction: "mean" (divide by num_global_tokens, default: the counted tokens of this call) or "sum".
        num_global_tokens: the divisor of "mean" across micro-batches and ranks (the loss then does not
            depend on how the global batch was split).
        chunk_size: rows per logits tile (default: a tile of about 512 MiB on CUDA, 64 MiB on the CPU).
        fp32_logits: logits tiles in fp32.
        backend: "auto" | "triton" | "torch" (as fused_linear_logprobs).

    Mixed precision as fused_linear_logprobs: GEMMs in the autocast dtype under torch.autocast, gradients
    in the inputs' dtypes, log-sum-exp and the loss in fp32.

    Returns:
        loss: 0-d fp32 tensor, differentiable in hidden and weight. GEMMs: 3 (2 when weight needs no grad).
    """
    check_hidden_weight_targets(hidden, weight, targets)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
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
        denom = float(max(1, int((t != IGNORE_INDEX).sum())))
    be = resolve_backend(backend, hidden.device)
    mdt = gemm_dtype(hidden, weight)
    zdt = torch.promote_types(mdt, torch.float32) if fp32_logits else mdt
    grad_on = torch.is_grad_enabled()
    if chunk_size is None:
        chunk_size = chunk_rows(weight.shape[0], weight.shape[1], zdt, hidden.device,
                                accumulate_weight=grad_on and weight.requires_grad)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _FusedLinearNLL.apply(hidden, weight, t, 1.0 / float(temperature), denom, int(chunk_size), mdt, zdt, be,
                                 grad_on and hidden.requires_grad, grad_on and weight.requires_grad)


def nll_loss_reference(hidden, weight, targets, *, temperature: float = 1.0, reduction: str = "mean",
                       num_global_tokens=None, logits_dtype=None):
    """Plain torch on full [N, V] logits. float64 inputs give the ground truth."""
    logp = logprobs_reference(hidden, weight, targets, temperature=temperature, logits_dtype=logits_dtype)
    total = -logp.sum()
    if reduction == "sum":
        return total
    n = num_global_tokens if num_global_tokens is not None else max(1, int((targets != IGNORE_INDEX).sum()))
    return total / n
