"""Attention over packed batches for Hugging Face models (Llama, Qwen2, Gemma and any model that goes
through transformers' AttentionInterface).

``use_packed_attention(model)`` registers ``exgrpo_varlen`` with transformers and switches the model to
it. The model then takes one packed row, ``input_ids [1, N]`` with ``position_ids [1, N]`` restarting at
0 for each sequence (and optionally ``cu_seq_lens_q/k`` and ``max_length_q/k`` from a PackedBatch), and
no token attends across a sequence border. Kernels, first available wins:
  1. flash-attn's ``flash_attn_varlen_func`` (CUDA, if installed),
  2. torch's ``torch.nn.attention.varlen.varlen_attn`` (CUDA, torch >= 2.10),
  3. ``scaled_dot_product_attention``, causal, batched over buckets of similar length (``bucketed_sdpa``: CPU,
     and anywhere else).
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

IMPL = "exgrpo_varlen"


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[1, N] position ids restarting at 0 -> (cu_seqlens [S+1] int32, max_seqlen)."""
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().reshape(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


@functools.cache
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func
    except ImportError:
        return None


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def block_causal_mask(cu: torch.Tensor, n: int, device, sliding_window: int | None = None) -> torch.Tensor:
    """[n, n] bool: query i sees key j iff same sequence and j <= i (and i - j < window)."""
    lengths = (cu[1:] - cu[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths.to(device))
    idx = torch.arange(n, device=device)
    mask = (seq[:, None] == seq[None, :]) & (idx[None, :] <= idx[:, None])
    if sliding_window:
        mask &= (idx[:, None] - idx[None, :]) < sliding_window
    return mask


def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, softcap=None, **kwargs):
    """transformers attention function. query [1, Hq, N, D], key/value [1, Hkv, N, D] -> ([1, N, Hq, D], None)."""
    B, Hq, N, D = query.shape
    Hkv = key.shape[1]
    if key.shape[2] != N or B != 1:
        # decoding with a cache, or an ordinary padded batch: plain attention with the model's mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None:
        pos = kwargs.get("position_ids")
        if pos is None:
            cu, max_len = torch.tensor([0, N], dtype=torch.int32, device=query.device), N
        else:
            cu, max_len = cu_seqlens_from_position_ids(pos)
    cu = cu.to(device=query.device, dtype=torch.int32)
    max_len = int(max_len) if max_len is not None else int((cu[1:] - cu[:-1]).max())
    scale = scaling if scaling is not None else D ** -0.5
    p = dropout if module.training else 0.0
    q, k, v = (x.transpose(1, 2)[0] for x in (query, key, value))  # [N, H, D]
    if query.is_cuda and _flash_varlen() is not None and query.dtype in (torch.float16, torch.bfloat16):
        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        out = _flash_varlen()(q, k, v, cu, cu, max_len, max_len, dropout_p=p, softmax_scale=scale, causal=True,
                              window_size=window, softcap=softcap or 0.0)
        return out.unsqueeze(0), None
    tv = _torch_varlen() if query.is_cuda else None
    half = query.dtype in (torch.float16, torch.bfloat16)  # torch's varlen kernel takes fp16 / bf16 only
    if tv is not None and half and not p and not softcap and not sliding_window:
        fn, params = tv
        kw = {"scale": scale}
        if "window_size" in params:
            kw["window_size"] = (-1, 0)
        if "is_causal" in params:
            kw["is_causal"] = True
        if Hkv != Hq:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:
                k, v = (x.repeat_interleave(Hq // Hkv, dim=1) for x in (k, v))
        return fn(q, k, v, cu, cu, max_len, max_len, **kw).unsqueeze(0), None
    if softcap:
        raise NotImplementedError("exgrpo_varlen: attention logit soft-capping needs flash-attn on CUDA")
    if Hkv != Hq:
        key, value = (x.repeat_interleave(Hq // Hkv, dim=1) for x in (key, value))
    return bucketed_sdpa(query[0], key[0], value[0], cu.tolist(), dropout=p, scale=scale,
                         sliding_window=sliding_window).unsqueeze(0), None


PAD_WASTE = 0.25  # a bucket's padded size may exceed its tokens by this fraction


def length_buckets(lengths: list[int], waste: float = PAD_WASTE) -> list[list[int]]:
    """Indices of the non-empty sequences, longest first, cut into buckets whose padded size (count x longest)
    stays within (1 + waste) x their tokens."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    tokens = 0
    for i in order:
        if buckets and (len(buckets[-1]) + 1) * lengths[buckets[-1][0]] <= (1 + waste) * (tokens + lengths[i]):
            buckets[-1].append(i)
            tokens += lengths[i]
        else:
            buckets.append([i])
            tokens = lengths[i]
    return buckets


def bucketed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], *, dropout: float = 0.0,
                  scale: float | None = None, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention within each packed sequence, by batched SDPA calls over length buckets (no Python loop per
    sequence, no [N, N] mask).

    q, k, v: [H, N, D] (k, v already repeated to q's heads); bounds: cu_seqlens as a list, [S + 1] from 0 to N.
    Returns [N, H, D]. Each bucket's sequences are gathered right-padded into [n_b, H, L_b, D]: causal masking keeps
    every real query off the padding (pad keys come after it), and the pad rows' outputs are dropped, so the result
    and its gradients equal per-sequence attention exactly."""
    H, N, D = q.shape
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    vals, where = [], []
    for b in length_buckets(lengths):
        L = lengths[b[0]]
        starts = torch.tensor([bounds[i] for i in b], device=q.device)
        lens = torch.tensor([lengths[i] for i in b], device=q.device)
        ar = torch.arange(L, device=q.device)
        valid = ar[None, :] < lens[:, None]  # [n_b, L]
        idx = starts[:, None] + torch.minimum(ar[None, :], lens[:, None] - 1)  # pads repeat the last token
        qb, kb, vb = (x[:, idx].transpose(0, 1) for x in (q, k, v))  # [n_b, H, L, D]
        if sliding_window and L > sliding_window:
            m = block_causal_mask(torch.tensor([0, L]), L, q.device, sliding_window)
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=m, dropout_p=dropout, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, dropout_p=dropout, scale=scale)
        vals.append(o.transpose(1, 2)[valid])  # [n_valid, H, D]
        where.append(idx[valid])
    if not vals:
        return q.new_zeros(N, H, D)
    if len(vals) == 1 and len(b) == 1:  # one sequence: already in order
        return vals[0]
    return torch.cat(vals)[torch.argsort(torch.cat(where))]


def register() -> str:
    """Register ``exgrpo_varlen`` with transformers' AttentionInterface (idempotent) and return its name."""
    AttentionInterface.register(IMPL, packed_attention_forward)
    return IMPL


def use_packed_attention(model):
    """Switch a transformers model to packed (varlen) attention; returns the model."""
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(IMPL)
    else:
        model.config._attn_implementation = IMPL
    return model


def packed_model_kwargs(batch) -> dict:
    """The model-call keyword arguments of a PackedBatch: input_ids/position_ids [1, N] and the varlen
    metadata that flash-attn style kernels read."""
    return {"input_ids": batch.input_ids.unsqueeze(0), "position_ids": batch.position_ids.unsqueeze(0),
            "cu_seq_lens_q": batch.cu_seqlens, "cu_seq_lens_k": batch.cu_seqlens,
            "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen}
