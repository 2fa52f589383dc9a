"""The drivers: walk the [n, V] logits one [chunk, V] tile at a time and turn each into its gradient.

* ``one_pass``: the loss terms of a token depend on that token alone (token-level ratio, no sequence statistic of
  the current log-probs): each tile is reduced, its terms formed and its gradient written while it is in memory
  (3 GEMMs with grad-weight: logits, grad-hidden, grad-weight). The clip objective runs the one-row kernel
  (``rows.py``); the other objectives run the row kernels' statistics, ``losses.policy_terms`` on the [chunk]
  vectors, then the row kernels' gradient.
* ``two_pass``: pass 1 every log-prob (1 GEMM), the terms over all tokens (sequence statistics need them all), pass
  2 (``recompute``) each tile again to its gradient (3 GEMMs); when every active row fits one tile, pass 2 takes pass
  1's tile (3 GEMMs in all, the same one-tile peak).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _native
from .._rows import LogitTransform, Tiles, chunk_grad_, chunk_stats
from .config import GRPOLossConfig
from .losses import policy_terms
from .rows import policy_args, token_rows_triton


@dataclass
class Active:
    """The n tokens the loss covers (loss_mask and a target), compacted before any GEMM; [n] vectors dense."""

    idx: torch.Tensor  # [n] their rows in the [N] input
    h: torch.Tensor  # [n, H]
    t: torch.Tensor  # [n] int64
    sid: torch.Tensor  # [n] int64
    old: torch.Tensor | None  # [n] fp32
    ref: torch.Tensor | None  # [n] fp32
    gen: torch.Tensor | None  # [n] fp32
    ext: torch.Tensor | None  # [n] fp32 external importance weights, per token
    ext_seq: torch.Tensor | None  # [S] fp32 the same when they came per sequence, else None
    isw: torch.Tensor | None  # [n] fp32 generator weights, when they do not depend on l (old given), else None
    adv: torch.Tensor  # [S] fp32
    w_seq: torch.Tensor  # [S] fp32 aggregation weight of each sequence's tokens

    @property
    def n(self) -> int:
        return int(self.idx.numel())

    def part(self, sl: slice) -> dict:
        """The per-token inputs of ``policy_terms`` for the tokens ``sl``."""
        return dict(old=_cut(self.old, sl), ref=_cut(self.ref, sl), gen=_cut(self.gen, sl), ext=_cut(self.ext, sl),
                    ext_seq=self.ext_seq, adv_seq=self.adv, w_seq=self.w_seq, seq_ids=self.sid[sl],
                    isw=_cut(self.isw, sl))


@dataclass
class TokenOut:
    """Per active token, fp32 [n], NaN until written (poison)."""

    logp: torch.Tensor
    ratio: torch.Tensor
    kl: torch.Tensor
    jt: torch.Tensor  # the token's weighted loss term (sum = loss)
    ent: torch.Tensor | None

    @staticmethod
    def empty(n, device, with_entropy):
        f = lambda: torch.full((n,), float("nan"), dtype=torch.float32, device=device)  # noqa: E731
        return TokenOut(f(), f(), f(), f(), f() if with_entropy else None)

    def write(self, sl: slice, *, logp, ratio, kl, jt, ent) -> None:
        self.logp[sl], self.ratio[sl], self.kl[sl], self.jt[sl] = logp, ratio, kl, jt
        if self.ent is not None:
            self.ent[sl] = ent


def _mul(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else (a if b is None else a * b)


def one_pass(a: Active, tiles: Tiles, *, cfg: GRPOLossConfig, xf: LogitTransform, backend: str,
             chunk: int) -> TokenOut:
    """Token-level terms: tile -> loss terms -> gradient of the tile, while it is in memory (3 GEMMs)."""
    need_grad = tiles.any_grad
    out = TokenOut.empty(a.n, a.h.device, cfg.needs_entropy)
    fused = backend != "torch" and cfg.fused_rows(has_old=a.old is not None)
    # the one-row kernel takes precomputed generator weights through ext; without old_logp it forms token_truncate
    is_mode = 1 if (fused and a.isw is None and cfg.gen_correction != "off") else 0
    rows = token_rows_triton if backend == "triton" else _native.ops.grpo_token_rows_
    for s in range(0, a.n, chunk):
        e = min(a.n, s + chunk)
        sl = slice(s, e)
        hc, z, g = tiles.logits(s, e)
        if fused:
            ext = _mul(_cut(a.ext, sl), _cut(a.isw, sl))
            lp, rho, kl, en, jt = rows(z, a.t[sl], a.sid[sl], a.adv, a.w_seq, None, _cut(a.old, sl), _cut(a.ref, sl),
                                       _cut(a.gen, sl), ext, *xf.args, **policy_args(cfg, is_mode),
                                       with_entropy=cfg.compute_entropy, compute_grad=need_grad)
            out.write(sl, logp=lp, ratio=rho, kl=kl, jt=jt, ent=en)
            if need_grad and g is not z:
                g.copy_(z)
        else:
            lp, lse, en = chunk_stats(z, a.t[sl], xf, cfg.needs_entropy, backend)
            terms, c, c_h = policy_terms(lp, cfg=cfg, need_grad=need_grad, ent=en, **a.part(sl))
            out.write(sl, logp=lp, ratio=terms["ratio"], kl=terms["kl"], jt=terms["j"], ent=en)
            if need_grad:
                chunk_grad_(z, a.t[sl], lse, None if c_h is None else en, c, c_h, xf, backend, out=g)
        if need_grad:
            tiles.backprop(g, s, e, hc)
        del hc, z, g  # the next tile's GEMM must not find this one still alive (peak memory: one tile)
    return out


def _cut(x: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if x is None else x[sl]


def two_pass(a: Active, tiles: Tiles, *, cfg: GRPOLossConfig, xf: LogitTransform, backend: str, chunk: int,
             need_grad: bool, recompute: bool):
    """Every log-prob first, the terms over all tokens, then (``recompute``) each tile to its gradient.
    Returns (out, lse [n], c = dJ/dl [n] or None, c_h = dJ/dH [n] or None)."""
    n = a.n
    out = TokenOut.empty(n, a.h.device, cfg.needs_entropy)
    lse = torch.full_like(out.logp, float("nan"))
    keep = need_grad and recompute and n <= chunk
    kept = None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hc, z, g = tiles.logits(s, e)
        lp, ls, en = chunk_stats(z, a.t[s:e], xf, cfg.needs_entropy, backend)
        if keep:
            kept = (hc, z, g)
        del hc, z, g
        out.logp[s:e], lse[s:e] = lp, ls
        if out.ent is not None:
            out.ent[s:e] = en
    terms, c, c_h = policy_terms(out.logp, cfg=cfg, need_grad=need_grad, ent=out.ent, **a.part(slice(0, n)))
    out.ratio, out.kl, out.jt = terms["ratio"], terms["kl"], terms["j"]
    if need_grad and recompute:
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            hc, z, g = kept if kept is not None else tiles.logits(s, e)
            kept = None
            ent_h = None if c_h is None else (out.ent[s:e].contiguous(), c_h[s:e].contiguous())
            chunk_grad_(z, a.t[s:e], lse[s:e], None if ent_h is None else ent_h[0], c[s:e].contiguous(),
                        None if ent_h is None else ent_h[1], xf, backend, out=g)
            tiles.backprop(g, s, e, hc)
            del hc, z, g
    return out, lse, c, c_h
