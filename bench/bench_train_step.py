"""Training-phase step (no generation): this project's loop (packed micro-batch, fused GRPO loss from hidden
states) against the same step done the usual way (padded batch, the model's full logits, log_softmax, TRL's
loss), as ratios of step time and peak memory. GPU: random-init Qwen2-0.5B and -1.5B shapes in bf16; CPU: a tiny
Llama shape. Writes JSON and a PNG.

    python bench/bench_train_step.py [--out bench/results/train-step-cpu]
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

from exgrpo_kernels import GRPOLossConfig, fused_linear_grpo_loss, fused_linear_logprobs, pack_sequences  # noqa: E402

from bench.bench_grpo_loss import environment  # noqa: E402
from exgrpo.attention import use_packed_attention  # noqa: E402
from exgrpo.model import PolicyHidden  # noqa: E402

SHAPES = {
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2),
    "qwen2-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2),
    "cpu-tiny": dict(vocab_size=8000, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2),
}


def model_of(shape, device, dtype):
    import transformers
    cfg = transformers.Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, tie_word_embeddings=False,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)


def batch_of(n, lo, hi, vocab, seed=0):
    rng = random.Random(seed)
    lens = [rng.randint(lo, hi) for _ in range(n)]
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (L,), generator=g) for L in lens]
    masks = [torch.arange(L) >= L // 3 for L in lens]  # the first third is the prompt
    adv = torch.randn(n, generator=g)
    return ids, masks, adv


def ours_step(model, ids, masks, adv, cfg, device):
    b = pack_sequences(ids, token_mask=masks).to(device)
    p = PolicyHidden(model)
    h = p(b)
    with torch.no_grad():
        ref = fused_linear_logprobs(h.detach(), p.lm_head_weight.detach(), b.targets)
    loss, _ = fused_linear_grpo_loss(h, p.lm_head_weight, b.targets, b.seq_ids, adv.to(device), b.loss_mask, cfg, ref_logp=ref)
    loss.backward()
    return float(loss)


def padded_step(model, ids, masks, adv, cfg, device):
    T = max(len(x) for x in ids)
    inp = torch.zeros(len(ids), T, dtype=torch.long)
    att = torch.zeros(len(ids), T, dtype=torch.long)
    lm = torch.zeros(len(ids), T, dtype=torch.bool)
    for i, (x, m) in enumerate(zip(ids, masks)):
        inp[i, :len(x)], att[i, :len(x)], lm[i, :len(x) - 1] = x, 1, m[1:]
    inp, att, lm = inp.to(device), att.to(device), lm.to(device)
    logits = model(input_ids=inp, attention_mask=att).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, inp[:, 1:, None]).squeeze(-1)
    ref = logp.detach()
    m = lm[:, :-1].float()
    ratio = torch.exp(logp - logp.detach())
    a = adv.to(device)[:, None]
    pg = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high) * a)
    d = ref - logp
    loss = ((pg + cfg.beta * (torch.exp(d) - d - 1)) * m).sum() / m.sum()
    loss.backward()
    return float(loss)


def measure(fn, device, reps):
    fn()
    times, peak = [], None
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/train-step-latest")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = ["qwen2-0.5b", "qwen2-1.5b"] if device.type == "cuda" else ["cpu-tiny"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, lo, hi = (16, 128, 1024) if device.type == "cuda" else (16, 32, 256)
    cfg = GRPOLossConfig(loss_type="dapo", beta=0.04)
    doc = {"environment": environment(device), "batch": {"sequences": n, "lengths": [lo, hi]}, "results": []}
    for shape in shapes:
        model = model_of(shape, device, dtype).train()
        ids, masks, adv = batch_of(n, lo, hi, SHAPES[shape]["vocab_size"])
        row = {"shape": shape, "tokens": sum(len(x) for x in ids)}
        try:
            row["padded_ms"], row["padded_peak_gib"] = measure(
                lambda: padded_step(model, ids, masks, adv, cfg, device), device, a.reps)
        except torch.OutOfMemoryError:
            row["padded_ms"] = "out of memory"
            torch.cuda.empty_cache()
        model.zero_grad(set_to_none=True)
        use_packed_attention(model)
        row["ours_ms"], row["ours_peak_gib"] = measure(lambda: ours_step(model, ids, masks, adv, cfg, device), device, a.reps)
        if isinstance(row.get("padded_ms"), float):
            row["speedup"] = row["padded_ms"] / row["ours_ms"]
            if row["ours_peak_gib"]:
                row["memory_ratio"] = row["padded_peak_gib"] / row["ours_peak_gib"]
        doc["results"].append(row)
        print(json.dumps(row), flush=True)
        model = None  # free it before the next shape
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    rs = [r for r in doc["results"] if isinstance(r.get("padded_ms"), float)]
    x = range(len(rs))
    ax.bar([i - 0.2 for i in x], [r["padded_ms"] for r in rs], 0.4, label="padded + full logits", color="tab:gray")
    ax.bar([i + 0.2 for i in x], [r["ours_ms"] for r in rs], 0.4, label="packed + fused loss", color="tab:green")
    ax.set_xticks(list(x), [r["shape"] for r in rs])
    ax.set_ylabel("ms per training step")
    ax.legend()
    ax.set_title(doc["environment"]["card"])
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "results.png"), dpi=110)
    print(f"wrote {a.out}/results.json, results.png")


if __name__ == "__main__":
    main()
