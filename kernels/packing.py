"""Pack S ragged token sequences into one padding-free layout, and back.

``pack_sequences`` writes, in one Triton launch over blocks of packed tokens (after one cumsum of the
lengths), every per-token field the trainer needs: input ids, position ids restarting at 0 for each
sequence, next-token targets that never cross a sequence border, sequence ids, the loss mask shifted
onto the positions that predict a trained token, and FlashAttention's ``cu_seqlens``. ``unpack`` turns
any per-token tensor of the packed layout back into ``[S, T_max]`` or a per-sequence list.

The torch reference (``pack_sequences_reference``) builds the same fields one sequence at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _native
from ._utils import IGNORE_INDEX, KERNEL_BACKENDS, interpret_mode, resolve_backend


@dataclass
class PackedBatch:
    """S sequences packed end to end, N = sum of lengths tokens, no padding.

    input_ids:    [N] int64   the tokens
    position_ids: [N] int64   0 .. len_s - 1 within each sequence
    targets:      [N] int64   the next token of the same sequence; -100 at each sequence's last token
    seq_ids:      [N] int64   which sequence (0 .. S-1) each token belongs to
    loss_mask:    [N] bool    position i is trained: its target token i+1 is marked in token_mask
    cu_seqlens:   [S+1] int32 start offsets (FlashAttention varlen convention), cu_seqlens[-1] = N
    lengths:      [S] int64   tokens per sequence (0 allowed)
    max_seqlen:   int         the longest sequence
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    seq_ids: torch.Tensor
    loss_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    lengths: torch.Tensor
    max_seqlen: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.lengths.shape[0])

    def to(self, device) -> PackedBatch:
        return PackedBatch(*(getattr(self, f).to(device) for f in ("input_ids", "position_ids", "targets", "seq_ids",
                                                                    "loss_mask", "cu_seqlens", "lengths")),
                           max_seqlen=self.max_seqlen)


@triton.jit
def _pack_kernel(TOK, TMASK, CU, S, N, IDS, POS, TGT, SEQ, LMASK,
                 HAS_MASK: tl.constexpr, LOG_S: tl.constexpr, BLOCK: tl.constexpr):
    # token i: s = max{s : cu[s] <= i} (binary search over cu[0..S]), pos = i - cu[s]
    # target[i] = tok[i+1] if i+1 < cu[s+1] else -100;  loss_mask[i] = target exists and tmask[i+1]
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < N
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = tl.zeros([BLOCK], dtype=tl.int64) + S
    for _ in range(LOG_S):
        mid = (lo + hi + 1) // 2
        go = tl.load(CU + mid, mask=live, other=0).to(tl.int64) <= i
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    s = tl.minimum(lo, S - 1)
    start = tl.load(CU + s, mask=live, other=0).to(tl.int64)
    end = tl.load(CU + s + 1, mask=live, other=0).to(tl.int64)
    tok = tl.load(TOK + i, mask=live, other=0)
    has_next = (i + 1) < end
    nxt = tl.load(TOK + i + 1, mask=live & has_next, other=0)
    tl.store(IDS + i, tok.to(tl.int64), mask=live)
    tl.store(POS + i, i - start, mask=live)
    tl.store(SEQ + i, s, mask=live)
    tl.store(TGT + i, tl.where(has_next, nxt.to(tl.int64), -100), mask=live)
    if HAS_MASK:
        m = tl.load(TMASK + i + 1, mask=live & has_next, other=0) != 0
    else:
        m = has_next
    tl.store(LMASK + i, (m & has_next).to(tl.int8), mask=live)


def _flatten(sequences, lengths, token_mask):
    """(tokens [N], lengths [S] int64, token_mask [N] or None) from either input form."""
    if isinstance(sequences, (list, tuple)):
        if lengths is not None:
            raise ValueError("lengths must be None when sequences is a list of 1-D tensors")
        for k, x in enumerate(sequences):
            if not isinstance(x, torch.Tensor) or x.dim() != 1:
                raise ValueError(f"sequences[{k}] must be a 1-D tensor, got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not sequences:
            raise ValueError("sequences is empty (S = 0)")
        dev = sequences[0].device
        lengths = torch.tensor([x.numel() for x in sequences], dtype=torch.int64, device=dev)
        tokens = torch.cat([x.reshape(-1) for x in sequences])
        if token_mask is not None:
            if not isinstance(token_mask, (list, tuple)) or len(token_mask) != len(sequences):
                raise ValueError("token_mask must be a list of the same length as sequences")
            for k, (m, x) in enumerate(zip(token_mask, sequences)):
                if m.shape != x.shape:
                    raise ValueError(f"token_mask[{k}] has shape {tuple(m.shape)} but sequences[{k}] has {tuple(x.shape)}")
            token_mask = torch.cat([m.reshape(-1) for m in token_mask])
        return tokens, lengths, token_mask
    tokens = sequences
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise ValueError("sequences must be a list of 1-D tensors or a flat 1-D tensor with lengths")
    if lengths is None or not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.numel() == 0:
        raise ValueError("lengths must be a non-empty 1-D tensor when sequences is a flat buffer")
    lengths = lengths.to(device=tokens.device, dtype=torch.int64)
    if bool((lengths < 0).any()):
        k = int((lengths < 0).nonzero()[0, 0])
        raise ValueError(f"lengths[{k}] = {int(lengths[k])} is negative")
    if int(lengths.sum()) != tokens.numel():
        raise ValueError(f"lengths sum to {int(lengths.sum())} but the flat buffer has {tokens.numel()} tokens")
    if token_mask is not None and token_mask.shape != tokens.shape:
        raise ValueError(f"token_mask has shape {tuple(token_mask.shape)} but the tokens have {tuple(tokens.shape)}")
    return tokens, lengths, token_mask


def pack_sequences(sequences, lengths: torch.Tensor | None = None, *, token_mask=None,
                   backend: str = "auto") -> PackedBatch:
    """Pack S ragged sequences end to end.

    Args:
        sequences: a list of S 1-D int tensors, or a flat [N] int tensor with ``lengths``.
        lengths: [S] int, with a flat buffer only (zeros allowed).
        token_mask: which tokens are trained on (e.g. assistant content), same form as sequences (list of
            1-D bool/int tensors, or flat [N]). Position i gets loss_mask = token_mask[i + 1] (it predicts
            token i + 1); None: every position that has a target.
        backend: "auto" (Triton on CUDA and under TRITON_INTERPRET=1; on the CPU the C++ kernel where built, else
            the vectorised torch path), "triton", "native" or "torch".

    Returns:
        PackedBatch (fields documented there) on the device of the input.
    """
    tokens, lengths, tmask = _flatten(sequences, lengths, token_mask)
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = ("triton" if (tokens.is_cuda or interpret_mode()) else
                   "native" if (_native.AVAILABLE and tokens.device.type == "cpu") else "torch")
    if backend == "native":
        resolve_backend("native", tokens.device)  # the clear error where it cannot run
    if backend == "torch":
        return _pack_torch(tokens, lengths, tmask)
    S, dev = lengths.numel(), tokens.device
    cu = torch.zeros(S + 1, dtype=torch.int32, device=dev)
    torch.cumsum(lengths, 0, out=cu[1:])
    fn = _pack_triton if backend == "triton" else _native.ops.pack
    ids, pos, tgt, seq, lmask = fn(tokens.contiguous(), cu, None if tmask is None else tmask.contiguous().bool())
    return PackedBatch(ids, pos, tgt, seq, lmask, cu, lengths, int(lengths.max()) if S else 0)


# exgrpo_native::pack (schema: _native.SCHEMAS): tokens [N] int, cu [S+1] int32, token_mask [N] bool or None ->
# (ids, pos, targets, seq_ids [N] int64, loss_mask [N] bool)


def _pack_triton(tokens, cu, tmask):
    N, S, dev = tokens.numel(), cu.numel() - 1, tokens.device
    out = {k: torch.full((N,), -7, dtype=torch.int64, device=dev) for k in ("ids", "pos", "tgt", "seq")}
    lmask = torch.full((N,), 2, dtype=torch.int8, device=dev)  # poison: neither 0 nor 1
    if N:
        BLOCK = 1024
        _pack_kernel[(triton.cdiv(N, BLOCK),)](
            tokens, tokens if tmask is None else tmask, cu, S, N, out["ids"], out["pos"], out["tgt"], out["seq"], lmask,
            HAS_MASK=tmask is not None, LOG_S=max(1, int(S).bit_length() + 1), BLOCK=BLOCK)
    return out["ids"], out["pos"], out["tgt"], out["seq"], lmask.view(torch.bool)


def _pack_twin(tokens, cu, tmask):
    b = _pack_torch(tokens, (cu[1:] - cu[:-1]).long(), tmask)
    return b.input_ids, b.position_ids, b.targets, b.seq_ids, b.loss_mask


_native.register("pack", "CUDA", _pack_triton)
_native.register("pack", "CPU", _pack_twin)


def _pack_torch(tokens, lengths, tmask) -> PackedBatch:
    """Vectorised torch: the CPU path (same outputs as the kernel)."""
    S, N, dev = lengths.numel(), tokens.numel(), tokens.device
    cu = torch.zeros(S + 1, dtype=torch.int32, device=dev)
    torch.cumsum(lengths, 0, out=cu[1:])
    seq = torch.repeat_interleave(torch.arange(S, device=dev), lengths)
    pos = torch.arange(N, device=dev) - cu[:-1].long()[seq]
    has_next = pos + 1 < lengths[seq]
    ids = tokens.long()
    tgt = torch.full((N,), IGNORE_INDEX, dtype=torch.int64, device=dev)
    tgt[:-1] = torch.where(has_next[:-1], ids[1:], IGNORE_INDEX) if N else tgt[:-1]
    lm = has_next.clone()
    if tmask is not None and N:
        lm[:-1] &= tmask[1:].bool()
    return PackedBatch(ids.clone(), pos, tgt, seq, lm, cu, lengths, int(lengths.max()) if S else 0)


def unpack(values: torch.Tensor, batch: PackedBatch, *, padding_value=0.0, as_list: bool = False):
    """Per-token packed values [N, ...] -> padded [S, max_seqlen, ...] (or a list of S tensors [len_s, ...])."""
    if not isinstance(values, torch.Tensor) or values.shape[:1] != (batch.num_tokens,):
        raise ValueError(f"values must have first dimension N = {batch.num_tokens}, got "
                         f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
    if as_list:
        return list(values.split(batch.lengths.tolist()))
    out = torch.full((batch.num_seqs, batch.max_seqlen) + tuple(values.shape[1:]), padding_value,
                     dtype=values.dtype, device=values.device)
    flat = batch.seq_ids * batch.max_seqlen + batch.position_ids
    out.view((-1,) + tuple(values.shape[1:])).index_copy_(0, flat, values)
    return out


def pack_sequences_reference(sequences, token_mask=None) -> dict:
    """One sequence at a time, the plain definition (list input only)."""
    f = {k: [] for k in ("input_ids", "position_ids", "targets", "seq_ids", "loss_mask")}
    cu = [0]
    for s, x in enumerate(sequences):
        x = x.long().tolist()
        m = token_mask[s].bool().tolist() if token_mask is not None else [True] * len(x)
        for i, tok in enumerate(x):
            last = i == len(x) - 1
            f["input_ids"].append(tok)
            f["position_ids"].append(i)
            f["seq_ids"].append(s)
            f["targets"].append(IGNORE_INDEX if last else x[i + 1])
            f["loss_mask"].append(False if last else m[i + 1])
        cu.append(cu[-1] + len(x))
    out = {k: torch.tensor(v, dtype=torch.bool if k == "loss_mask" else torch.int64) for k, v in f.items()}
    out["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    return out
