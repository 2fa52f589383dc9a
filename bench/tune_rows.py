"""Launch-size and tile-size sweep of the fused kernels on CUDA (the numbers behind the defaults in
kernels/_rows.py). At the reference shape (H=4096, V=151936, bf16):

1. the row kernels alone on one [C, V] logits tile: statistics (one read), gradient (read + write) and the
   fused GRPO token kernel (read, read + write), for BLOCK_V x num_warps; effective bandwidth = bytes / time;
2. the whole fused step at several tile heights (rows per chunk): fast mode (fp32 grad-weight accumulator: each
   chunk's grad-weight GEMM reads and writes it) and the log-prob pass.

Writes JSON to --out and prints the best row-kernel configuration as environment variables
(EXGRPO_MAX_BLOCK_V, EXGRPO_ROW_WARPS) on its last line.

    python bench/tune_rows.py --out /tmp/tune.json
    TRITON_INTERPRET=1 python bench/tune_rows.py --smoke     # CI: tiny shapes through the Triton interpreter
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import exgrpo_kernels._rows as rows  # noqa: E402
from exgrpo_kernels import GRPOLossConfig, fused_linear_grpo_loss, fused_linear_logprobs  # noqa: E402
from exgrpo_kernels._utils import interpret_mode  # noqa: E402
from exgrpo_kernels.grpo_loss.losses import seq_weights  # noqa: E402
from exgrpo_kernels.grpo_loss.rows import policy_args, token_rows_triton  # noqa: E402

XF = rows.LogitTransform()  # temperature 1, no soft-cap


def bench(fn):
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    t0 = time.perf_counter()  # the interpreter (smoke): one call, wall time
    fn()
    return (time.perf_counter() - t0) * 1e3


def token_rows(z, t, sid, adv, w_seq, ref, cfg):
    """The fused GRPO token kernel on one tile (its gradient written into z in place)."""
    return token_rows_triton(z, t, sid, adv, w_seq, None, None, ref, None, None, *XF.args, **policy_args(cfg, 0),
                             with_entropy=False, compute_grad=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/tune_rows.json")
    ap.add_argument("--rows", type=int, default=1024, help="tile height for the row-kernel sweep")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one configuration (CPU, Triton interpreter)")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not (a.smoke and interpret_mode()):
        ap.error("needs CUDA, or --smoke with TRITON_INTERPRET=1")
    H, V, C = (64, 1531, 16) if a.smoke else (4096, 151936, a.rows)
    sweep = [(1024, 4)] if a.smoke else [(bv, nw) for bv in (1024, 2048, 4096, 8192, 16384) for nw in (4, 8, 16, 32)]
    g = torch.Generator(device="cpu").manual_seed(0)
    z0 = (torch.randn(C, V, generator=g) * 3).to(dev, torch.bfloat16)
    t = torch.randint(0, V, (C,), generator=g).to(dev)
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.28, beta=0.04)
    sid = torch.zeros(C, dtype=torch.long, device=dev)
    adv = torch.ones(1, device=dev)
    w_seq = seq_weights(sid, 1, C, cfg, None, dev)
    ref = torch.full((C,), -12.0, device=dev)
    tile_bytes = C * V * 2
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (Triton interpreter)"
    out = {"card": card, "torch": torch.__version__, "triton": triton.__version__,
           "tile": [C, V], "row_kernels": [], "chunks": []}
    best = None
    for bv, nw in sweep:
        if nw * 32 * 2 > bv:  # fewer than 2 elements a thread: skip
            continue
        rows.MAX_BLOCK_V, rows.ROW_WARPS = bv, nw
        z = z0.clone()
        try:
            st = bench(lambda: rows.chunk_stats(z, t, XF, False, "triton"))
            lse = rows.chunk_stats(z, t, XF, False, "triton")[1]
            c = torch.full((C,), -1e-3, device=dev)
            gr = bench(lambda: rows.chunk_grad_(z0, t, lse, None, c, None, XF, "triton", out=z))
            tk = bench(lambda: token_rows(z, t, sid, adv, w_seq, ref, cfg))
        except Exception as e:  # noqa: BLE001 (a launch that does not fit is a result, not a crash)
            out["row_kernels"].append({"block_v": bv, "warps": nw, "error": str(e).splitlines()[0][:200]})
            print(json.dumps(out["row_kernels"][-1]), flush=True)
            continue
        r = {"block_v": bv, "warps": nw, "stats_ms": st, "grad_ms": gr, "token_ms": tk,
             "stats_TBps": tile_bytes / st / 1e9, "grad_TBps": 2 * tile_bytes / gr / 1e9,
             "token_TBps": 3 * tile_bytes / tk / 1e9}
        out["row_kernels"].append(r)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        score = st + gr + tk
        if best is None or score < best[0]:
            best = (score, bv, nw)
    if best is None:
        raise SystemExit("no row-kernel configuration ran (errors above)")
    rows.MAX_BLOCK_V, rows.ROW_WARPS = best[1], best[2]
    z0 = z = None  # free the tile before the whole-step runs
    torch.cuda.empty_cache()
    M = 64 if a.smoke else 8192
    hid = torch.randn(M, H, generator=g).to(dev, torch.bfloat16)
    wt = (torch.randn(V, H, generator=g) * (3.0 / H ** 0.5)).to(dev, torch.bfloat16)
    tt = torch.randint(0, V, (M,), generator=g).to(dev)
    sid = torch.arange(8, device=dev).repeat_interleave(M // 8)
    backend = "triton"
    mask = torch.ones(M, dtype=torch.bool, device=dev)
    adv = torch.randn(8, generator=g).to(dev)
    with torch.no_grad():
        lp = fused_linear_logprobs(hid, wt, tt, backend=backend)
    mm = bench(lambda: torch.mm(hid, wt.t()))
    out["floor_matmul_ms"] = mm
    for chunk in (16,) if a.smoke else (1024, 2048, 4096):
        c = cfg.replace(chunk_size=chunk)

        def step():
            h = hid.detach().requires_grad_()
            w = wt.detach().requires_grad_()
            fused_linear_grpo_loss(h, w, tt, sid, adv, mask, c.replace(backend=backend), old_logp=lp,
                                   ref_logp=lp)[0].backward()
        ms = bench(step)
        out["chunks"].append({"op": "grpo_fast", "chunk": chunk, "ms": ms, "x_floor": ms / mm})
        print(json.dumps(out["chunks"][-1]), flush=True)
    for chunk in (16,) if a.smoke else (256, 512, 1024, 2048):
        with torch.no_grad():
            ms = bench(lambda: fused_linear_logprobs(hid, wt, tt, chunk_size=chunk, backend=backend))
        out["chunks"].append({"op": "logprobs", "chunk": chunk, "ms": ms, "x_floor": ms / mm})
        print(json.dumps(out["chunks"][-1]), flush=True)
    out["best_row_kernel"] = {"block_v": best[1], "warps": best[2]}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"export EXGRPO_MAX_BLOCK_V={best[1]} EXGRPO_ROW_WARPS={best[2]}")


if __name__ == "__main__":
    main()
