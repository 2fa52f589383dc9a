"""Packing benchmark.

1. pack + unpack of 4096 dialogues with long-tailed lengths (64 .. 8192 tokens) with ``kernels.pack_sequences``
   against a straightforward torch loop (per-sequence positions/targets/masks, cat, pad_sequence).
2. forward + backward tokens/s of a small random-init model on the same kind of length distribution, packed
   (one row, exgrpo_varlen attention) against padded (one row per sequence, attention mask), and the
   fraction of padded tokens. GPU: a 0.5B Qwen2-shaped model; CPU: a tiny Llama-shaped one.
Writes JSON and a PNG.

    python bench/bench_packing.py [--out bench/results/packing-cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from exgrpo_kernels import _native, pack_sequences, pack_sequences_reference, unpack  # noqa: E402

from bench.bench_grpo_loss import environment  # noqa: E402
from exgrpo.attention import packed_model_kwargs, use_packed_attention  # noqa: E402


def long_tailed_lengths(n, lo, hi, seed=0, alpha=1.1):
    rng = random.Random(seed)
    return [min(hi, int(lo * rng.paretovariate(alpha))) for _ in range(n)]


def torch_loop_pack(seqs, masks):
    """What a trainer writes by hand: one sequence at a time, then cat."""
    ids, pos, tgt, sid, lm = [], [], [], [], []
    for s, (x, m) in enumerate(zip(seqs, masks)):
        n = x.numel()
        ids.append(x)
        pos.append(torch.arange(n, device=x.device))
        t = torch.full((n,), -100, dtype=torch.int64, device=x.device)
        t[:-1] = x[1:]
        tgt.append(t)
        sid.append(torch.full((n,), s, dtype=torch.int64, device=x.device))
        mm = torch.zeros(n, dtype=torch.bool, device=x.device)
        mm[:-1] = m[1:]
        lm.append(mm)
    lengths = torch.tensor([x.numel() for x in seqs], device=seqs[0].device)
    cu = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).int()
    return [torch.cat(v) for v in (ids, pos, tgt, sid, lm)] + [cu]


def torch_loop_unpack(values, lengths):
    return torch.nn.utils.rnn.pad_sequence(list(values.split(lengths)), batch_first=True)


def timed(fn, device, reps=5, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def bench_pack(device, n=4096):
    lengths = long_tailed_lengths(n, 64, 8192)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 150000, (L,), generator=g).to(device) for L in lengths]
    masks = [(torch.rand(L, generator=g) > 0.3).to(device) for L in lengths]
    flat = torch.cat(seqs)
    flat_mask = torch.cat(masks)
    lt = torch.tensor(lengths, device=device)
    # correctness first: identical to the reference on a slice
    ref = pack_sequences_reference([s.cpu() for s in seqs[:64]], [m.cpu() for m in masks[:64]])
    b64 = pack_sequences(seqs[:64], token_mask=masks[:64])
    ok = all(torch.equal(getattr(b64, k).cpu(), ref[k]) for k in ("input_ids", "position_ids", "targets", "seq_ids", "loss_mask"))
    vals = torch.randn(flat.numel(), device=device)
    b = pack_sequences(flat, lt, token_mask=flat_mask)

    backend = "triton" if device.type == "cuda" else ("native" if _native.AVAILABLE else "torch")
    res = {"num_dialogues": n, "num_tokens": int(flat.numel()), "correct": ok, "backend": backend,
           "ours_pack_ms": timed(lambda: pack_sequences(flat, lt, token_mask=flat_mask, backend=backend), device),
           "ours_pack_from_list_ms": timed(lambda: pack_sequences(seqs, token_mask=masks), device),
           "ours_unpack_ms": timed(lambda: unpack(vals, b), device),
           "loop_pack_ms": timed(lambda: torch_loop_pack(seqs, masks), device, reps=3),
           "loop_unpack_ms": timed(lambda: torch_loop_unpack(vals, lengths), device, reps=3)}
    if device.type == "cpu":  # the vectorised torch path (the CPU path before the C++ kernel, and without it)
        res["torch_path_pack_ms"] = timed(lambda: pack_sequences(flat, lt, token_mask=flat_mask, backend="torch"),
                                          device)
        if backend == "native":
            bn = pack_sequences(flat, lt, token_mask=flat_mask, backend="native")
            bt = pack_sequences(flat, lt, token_mask=flat_mask, backend="torch")
            res["correct"] = ok and all(torch.equal(getattr(bn, k), getattr(bt, k)) for k in (
                "input_ids", "position_ids", "targets", "seq_ids", "loss_mask", "cu_seqlens"))
            res["speedup_native_vs_torch_path"] = res["torch_path_pack_ms"] / res["ours_pack_ms"]
    res["speedup_pack"] = res["loop_pack_ms"] / res["ours_pack_ms"]
    res["speedup_pack_unpack"] = (res["loop_pack_ms"] + res["loop_unpack_ms"]) / (res["ours_pack_ms"] + res["ours_unpack_ms"])
    return res


def small_model(device):
    import transformers
    if device.type == "cuda":  # Qwen2-0.5B shape
        cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                       tie_word_embeddings=True, attn_implementation="sdpa")
        dt = torch.bfloat16
    else:
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                       attn_implementation="sdpa")
        dt = torch.float32
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dt), cfg


def bench_train(device, budget_tokens):
    from exgrpo_kernels import fused_linear_logprobs
    model, cfg = small_model(device)
    lo, hi = (64, 2048) if device.type == "cuda" else (16, 512)
    lengths, total = [], 0
    for L in long_tailed_lengths(10000, lo, hi, seed=1):
        if total + L > budget_tokens:
            break
        lengths.append(L)
        total += L
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, cfg.vocab_size, (L,), generator=g).to(device) for L in lengths]

    def padded_step():
        T = max(lengths)
        ids = torch.zeros(len(seqs), T, dtype=torch.int64, device=device)
        att = torch.zeros(len(seqs), T, dtype=torch.int64, device=device)
        for i, s in enumerate(seqs):
            ids[i, :s.numel()] = s
            att[i, :s.numel()] = 1
        tgt = torch.full_like(ids, -100)
        tgt[:, :-1] = torch.where(att[:, 1:].bool(), ids[:, 1:], -100)
        h = model.model(input_ids=ids, attention_mask=att).last_hidden_state
        lp = fused_linear_logprobs(h.reshape(-1, h.shape[-1]), model.lm_head.weight, tgt.reshape(-1))
        lp.sum().backward()

    def packed_step():
        b = pack_sequences(seqs)
        h = model.model(**packed_model_kwargs(b)).last_hidden_state[0]
        lp = fused_linear_logprobs(h, model.lm_head.weight, b.targets)
        lp.sum().backward()

    pad_ms = timed(padded_step, device, reps=3)
    use_packed_attention(model)
    pack_ms = timed(packed_step, device, reps=3)
    return {"num_sequences": len(lengths), "real_tokens": total, "padded_tokens": len(lengths) * max(lengths),
            "padding_waste": 1 - total / (len(lengths) * max(lengths)),
            "padded_ms": pad_ms, "packed_ms": pack_ms,
            "padded_tokens_per_s": total / pad_ms * 1e3, "packed_tokens_per_s": total / pack_ms * 1e3,
            "speedup": pad_ms / pack_ms,
            "model": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}}


def plot(doc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    p, t = doc["pack"], doc["train"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = [f"ours pack ({p.get('backend', '?')})", "ours unpack", "loop pack", "loop unpack"]
    vals = [p["ours_pack_ms"], p["ours_unpack_ms"], p["loop_pack_ms"], p["loop_unpack_ms"]]
    if "torch_path_pack_ms" in p:
        names.insert(1, "torch-path pack")
        vals.insert(1, p["torch_path_pack_ms"])
    ax[0].bar(names, vals, color=["tab:green" if n.startswith("ours") else "tab:gray" for n in names])
    ax[0].tick_params(axis="x", labelrotation=20)
    ax[0].set_yscale("log")
    ax[0].set_ylabel("ms")
    ax[0].set_title(f"{p['num_dialogues']} dialogues, {p['num_tokens']} tokens: {p['speedup_pack_unpack']:.1f}x")
    ax[1].bar(["padded", "packed"], [t["padded_tokens_per_s"], t["packed_tokens_per_s"]], color=["tab:gray", "tab:green"])
    ax[1].set_ylabel("real tokens / s (fwd+bwd)")
    ax[1].set_title(f"padding waste {t['padding_waste']:.0%}: packed {t['speedup']:.2f}x")
    fig.suptitle(doc["environment"]["card"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/packing-latest")
    ap.add_argument("--train-tokens", type=int, default=None, help="tokens in the fwd+bwd batch")
    ap.add_argument("--dialogues", type=int, default=4096, help="dialogues in the pack / unpack benchmark")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    doc = {"environment": env, "pack": bench_pack(device, a.dialogues)}
    print(json.dumps(doc["pack"], indent=1), flush=True)
    doc["train"] = bench_train(device, a.train_tokens or (16384 if device.type == "cuda" else 4096))
    print(json.dumps(doc["train"], indent=1), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    plot(doc, os.path.join(a.out, "results.png"))
    print(f"wrote {a.out}/results.json, results.png")
    return 0 if doc["pack"]["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
