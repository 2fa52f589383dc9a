"""The custom ops of the GRPO loss (``exgrpo::grpo`` and its low-memory backward), their fake (meta) versions for
torch.compile, and the autograd glue. Arguments are read by name (``GRPO_ARGS``, ``GRPO_OUTPUTS``), never by slice.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from .._rows import LogitTransform, Tiles, chunk_grad_, chunk_rows
from .._utils import IGNORE_INDEX, acc_dtype, addmm_fp32_, auto_chunk, dense_1d, mm, scale_grads_, tile_budget
from .config import GRPOLossConfig
from .losses import generator_weights, seq_weights
from .passes import Active, one_pass, two_pass

# the op's outputs; per-token ones are [N] fp32, 0 outside the loss, [0] when not computed
GRPO_OUTPUTS = ("loss", "active", "logp", "ratio", "kl", "entropy", "adv_tok", "gen_diff", "grad_hidden",
                "grad_weight", "grad_bias", "lse", "c", "c_h")


def _grpo(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, seq_ids: torch.Tensor,
          advantages: torch.Tensor, loss_mask: torch.Tensor, old: Optional[torch.Tensor], ref: Optional[torch.Tensor],
          gen: Optional[torch.Tensor], ext: Optional[torch.Tensor], bias: Optional[torch.Tensor], cfg_key: str,
          ext_per_seq: bool, num_global_tokens: float, inv_tau: float, scale: float, softcap: float, backend: str,
          need_h: bool, need_w: bool, need_b: bool, mdt: torch.dtype) -> list[torch.Tensor]:
    """The GRPO loss and its per-token values (``GRPO_OUTPUTS``); gradients for an upstream of 1 (fast / two-pass
    modes), or what the low-memory backward needs (lse, c, and entropy with c_h = dJ/dH). ext: [N] per token, or [S] per sequence
    (``ext_per_seq``)."""
    cfg = GRPOLossConfig.from_key(cfg_key)
    N, H = hidden.shape
    V, S = weight.shape[0], advantages.shape[0]
    dev = hidden.device
    active = loss_mask.bool() & (targets != IGNORE_INDEX)
    idx = active.nonzero().squeeze(1)
    n = int(idx.numel())
    all_active = n == N
    pick = (lambda x: x) if all_active else (lambda x: None if x is None else x.index_select(0, idx))
    sid = dense_1d(pick(seq_ids), torch.int64)
    old_a, gen_a = dense_1d(pick(old), torch.float32), dense_1d(pick(gen), torch.float32)
    ext_seq = dense_1d(ext, torch.float32) if (ext is not None and ext_per_seq) else None
    ext_a = ext_seq[sid] if ext_seq is not None else dense_1d(pick(ext), torch.float32)
    isw = None
    if cfg.gen_correction != "off" and old_a is not None:  # fixed by the inputs: computed once
        isw = generator_weights(old_a, gen_a, seq_ids=sid, num_seqs=S, cfg=cfg)
    a = Active(idx=idx, h=pick(hidden), t=dense_1d(pick(targets), torch.int64), sid=sid, old=old_a,
               ref=dense_1d(pick(ref), torch.float32), gen=gen_a, ext=ext_a, ext_seq=ext_seq, isw=isw,
               adv=dense_1d(advantages, torch.float32),
               w_seq=seq_weights(sid, S, n, cfg, num_global_tokens if num_global_tokens > 0 else None, dev))
    xf = LogitTransform(inv_tau, scale, softcap or None)
    zdt = torch.promote_types(mdt, torch.float32) if cfg.fp32_logits else mdt
    need_grad = need_h or need_w or need_b
    low_mem = cfg.memory_mode == "low_memory" and need_w
    chunk = cfg.chunk_size or chunk_rows(V, H, zdt, dev, accumulate_weight=need_w and not low_mem)
    lse = c = c_h = None
    with torch.autocast(dev.type, enabled=False):
        g_on = not low_mem
        tiles = Tiles(a.h, weight, mdt, zdt, need_h and g_on, need_w and g_on, hidden.dtype, bias=bias,
                      need_b=need_b and g_on)
        if not cfg.needs_sequence_pass(has_old=old is not None) and not low_mem:
            out = one_pass(a, tiles, cfg=cfg, xf=xf, backend=backend, chunk=chunk)
        else:
            out, lse, c, c_h = two_pass(a, tiles, cfg=cfg, xf=xf, backend=backend, chunk=chunk, need_grad=need_grad,
                                   recompute=not low_mem)
    loss = out.jt.sum() if n else torch.zeros((), dtype=torch.float32, device=dev)

    def full(x, dtype=torch.float32):  # [n] -> [N], 0 outside the loss
        if x is None:
            return hidden.new_empty(0, dtype=dtype)
        return x.to(dtype) if all_active else torch.zeros(N, dtype=dtype, device=dev).index_copy_(0, idx, x.to(dtype))

    gh = tiles.grad_h
    if gh is not None and not all_active:
        gh = torch.zeros((N, H), dtype=hidden.dtype, device=dev).index_copy_(0, idx, gh)
    gw, gb = tiles.weight_grads(weight, bias)
    e = hidden.new_empty
    outs = dict(loss=loss, active=active, logp=full(out.logp), ratio=full(out.ratio), kl=full(out.kl),
                entropy=full(out.ent), adv_tok=full(a.adv[a.sid]),
                gen_diff=full(None if a.gen is None else (out.logp - a.gen).abs()),
                grad_hidden=gh if gh is not None else e(0), grad_weight=gw if gw is not None else e(0),
                grad_bias=gb if gb is not None else e(0), lse=full(lse if low_mem else None),
                c=full(c.detach() if (low_mem and c is not None) else None),
                c_h=full(c_h.detach() if (low_mem and c_h is not None) else None))
    return [outs[k] for k in GRPO_OUTPUTS]


GRPO_ARGS = tuple(inspect.signature(_grpo).parameters)
grpo_op = torch.library.custom_op("exgrpo::grpo", mutates_args=())(_grpo)


@grpo_op.register_fake
def _(hidden, weight, targets, seq_ids, advantages, loss_mask, old, ref, gen, ext, bias, cfg_key, ext_per_seq,
      num_global_tokens, inv_tau, scale, softcap, backend, need_h, need_w, need_b, mdt):
    cfg = GRPOLossConfig.from_key(cfg_key)
    N = hidden.shape[0]
    low_mem = cfg.memory_mode == "low_memory" and need_w
    f = lambda n: hidden.new_empty((n,), dtype=torch.float32)  # noqa: E731
    e = hidden.new_empty
    outs = dict(loss=hidden.new_empty((), dtype=torch.float32), active=hidden.new_empty((N,), dtype=torch.bool),
                logp=f(N), ratio=f(N), kl=f(N), entropy=f(N if cfg.needs_entropy else 0), adv_tok=f(N),
                gen_diff=f(N if gen is not None else 0), grad_hidden=torch.empty_like(hidden) if need_h else e(0),
                grad_weight=torch.empty_like(weight) if (need_w and not low_mem) else e(0),
                grad_bias=torch.empty_like(bias) if (need_b and bias is not None and not low_mem) else e(0),
                lse=f(N if low_mem else 0), c=f(N if low_mem else 0),
                c_h=f(N if (low_mem and cfg.entropy_coef != 0) else 0))
    return [outs[k] for k in GRPO_OUTPUTS]


@torch.library.custom_op("exgrpo::grpo_low_memory_backward", mutates_args=())
def low_memory_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           targets: torch.Tensor, active: torch.Tensor, lse: torch.Tensor, c: torch.Tensor,
                           ent: Optional[torch.Tensor], c_h: Optional[torch.Tensor], inv_tau: float, scale: float,
                           softcap: float, mdt: torch.dtype, zdt: torch.dtype, backend: str, need_h: bool,
                           need_w: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Walk vocabulary slabs: z = h W_s^T [n, Vs] -> dJ/dz in place -> grad-weight of the slab (full-K GEMM,
    one rounding) and grad-hidden accumulated in fp32 [n, H] (4th GEMM: the tiles are recomputed)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    idx = active.nonzero().squeeze(1)
    n = int(idx.numel())
    xf = LogitTransform(inv_tau, scale, softcap or None)
    t = dense_1d(targets.index_select(0, idx), torch.int64)
    lse_a, c_a = lse.index_select(0, idx).contiguous(), c.index_select(0, idx).contiguous()
    ent_a = None if c_h is None else ent.index_select(0, idx).contiguous()
    ch_a = None if c_h is None else c_h.index_select(0, idx).contiguous()
    with torch.autocast(dev.type, enabled=False):
        w_mat = weight.to(mdt)
        hm = hidden.index_select(0, idx).to(mdt)
        # half the default tile budget: the [n, slab] tile plus the fp32 [n, H] accumulator must stay under the
        # low-memory peak (<= 1.8 GiB at M=8192, H=4096, V=151936 with 1.3 GiB of returned grads)
        slab = auto_chunk(max(n, 1), zdt.itemsize, tile_budget(dev) // 2, 128, 1 << 20)
        gh = torch.zeros((n, H), dtype=acc_dtype(hidden), device=dev) if need_h else None
        gw = torch.full((V, H), float("nan"), dtype=weight.dtype, device=dev) if need_w else None
        gb = torch.zeros((V,), dtype=bias.dtype, device=dev) if (need_b and bias is not None) else None
        bz = None if bias is None else bias.to(zdt)
        for v0 in range(0, V, slab):
            v1 = min(V, v0 + slab)
            ws = w_mat[v0:v1]
            z = mm(hm, ws.t(), out_dtype=zdt)
            if bz is not None:
                z.add_(bz[v0:v1])
            g = z if z.dtype == mdt else torch.empty(z.shape, dtype=mdt, device=z.device)
            chunk_grad_(z, t, lse_a, ent_a, c_a, ch_a, xf, backend, col0=v0, out=g)
            if need_w:
                gw[v0:v1] = mm(g.t(), hm).to(weight.dtype)
            if gb is not None:
                gb[v0:v1] = g.sum(0, dtype=torch.float32).to(bias.dtype)
            if need_h:
                addmm_fp32_(gh, g, ws)
            del z, g
    e = hidden.new_empty
    gh_full = e(0)
    if need_h:
        gh_full = torch.zeros((N, H), dtype=hidden.dtype, device=dev).index_copy_(0, idx, gh.to(hidden.dtype))
    return gh_full, gw if gw is not None else e(0), gb if gb is not None else e(0)


@low_memory_backward_op.register_fake
def _(hidden, weight, bias, targets, active, lse, c, ent, c_h, inv_tau, scale, softcap, mdt, zdt, backend, need_h,
      need_w, need_b):
    e = hidden.new_empty
    return (torch.empty_like(hidden) if need_h else e(0), torch.empty_like(weight) if need_w else e(0),
            torch.empty_like(bias) if (need_b and bias is not None) else e(0))


def _opt(x: torch.Tensor | None) -> torch.Tensor | None:
    """A [0] placeholder output of the op back to None."""
    return None if x is None or (x.dim() == 1 and x.shape[0] == 0) else x


def _setup(ctx, inputs, output):
    x = dict(zip(GRPO_ARGS, inputs))
    o = dict(zip(GRPO_OUTPUTS, output))
    ctx.grads = tuple(o[k].detach() for k in ("grad_hidden", "grad_weight", "grad_bias"))  # outside the graph
    ctx.has_bias = x["bias"] is not None
    cfg = GRPOLossConfig.from_key(x["cfg_key"])
    ctx.low_mem = cfg.memory_mode == "low_memory" and x["need_w"]
    if ctx.low_mem:
        mdt = x["mdt"]
        with_h = cfg.entropy_coef != 0
        ctx.save_for_backward(x["hidden"], x["weight"], x["bias"], x["targets"], o["active"].detach(),
                              o["lse"].detach(), o["c"].detach(), o["entropy"].detach() if with_h else None,
                              o["c_h"].detach() if with_h else None)
        ctx.lm_args = dict(inv_tau=x["inv_tau"], scale=x["scale"], softcap=x["softcap"], mdt=mdt,
                           zdt=torch.promote_types(mdt, torch.float32) if cfg.fp32_logits else mdt,
                           backend=x["backend"], need_h=x["need_h"], need_w=x["need_w"], need_b=x["need_b"])


def _backward(ctx, grads):
    grad_loss = grads[0]  # the op returns a list: its gradients come as one list
    need = dict(zip(GRPO_ARGS, ctx.needs_input_grad))
    if ctx.low_mem:
        hidden, weight, bias, targets, active, lse, c, ent, c_h = ctx.saved_tensors
        gh, gw, gb = low_memory_backward_op(hidden=hidden, weight=weight, bias=bias, targets=targets, active=active,
                                            lse=lse, c=c, ent=ent, c_h=c_h, **ctx.lm_args)
        gh, gw, gb = (_opt(x) for x in (gh, gw, gb))
    else:
        gh, gw, gb = (_opt(x) for x in ctx.grads)
    del ctx.grads
    gh, gw, gb = scale_grads_(grad_loss, gh, gw, gb)
    out = {"hidden": gh if need["hidden"] else None, "weight": gw if need["weight"] else None,
           "bias": gb if (ctx.has_bias and need["bias"]) else None}
    return tuple(out.get(k) for k in GRPO_ARGS)


grpo_op.register_autograd(_backward, setup_context=_setup)
