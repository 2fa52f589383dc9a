"""GRPO policy-loss step from hidden states: this project's kernels against torch eager, torch.compile,
Liger-Kernel (LigerFusedLinearGRPOLoss and triton_grpo_loss) and one cuBLAS matmul of the same shape, in
one run, as ratios. Forward + backward time (median) and peak extra memory; also the frozen-head step and
the log-prob-only pass. Writes JSON, CSV and a PNG; prints ratios to the floor and the verdicts
against the targets of docs/benchmarks.md.

A speed of this project's kernel is reported only where its correctness check at that shape passed:
log-probs, loss and gradients on a subset of rows against float64, no worse than 2x torch's own
bf16-matmul + fp32-log-softmax pipeline (docs/benchmarks.md).

    python bench/bench_grpo_loss.py                       # CUDA: the reference shape + N/V sweep
    python bench/bench_grpo_loss.py --preset cpu-small    # small CPU shape (the demo)
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from exgrpo_kernels import GRPOLossConfig, fused_linear_grpo_loss, fused_linear_logprobs  # noqa: E402
from exgrpo_kernels.grpo_loss import grpo_loss_reference  # noqa: E402
from exgrpo_kernels.logprobs import logprobs_reference  # noqa: E402

GIB = 1 << 30


@dataclass(frozen=True)
class Shape:
    B: int  # sequences
    T: int  # tokens per sequence (M = B * T)
    H: int
    V: int
    dtype: str = "bfloat16"

    @property
    def M(self):
        return self.B * self.T


PRESETS = {
    # the reference shape (docs/benchmarks.md): B=8 x T=1024, H=4096, V=151936 (Qwen2.5), bf16
    "targets": [Shape(8, 1024, 4096, 151936)],
    "sweep": [Shape(b, 1024, 4096, v) for v in (32768, 131072, 151936) for b in (2, 4, 8, 16, 32)],
    "cpu-small": [Shape(4, 96, 256, 8000, "float32")],
    "smoke": [Shape(2, 24, 32, 301, "float32")],  # CI: every path runs, in seconds
}

# the reference loss settings (docs/benchmarks.md): token ratio, clip 0.2 / 0.28, k3 KL (beta 0.04), dapo
LOSS = dict(loss_type="dapo", importance_sampling="token", eps_low=0.2, eps_high=0.28, beta=0.04, kl_estimator="k3")


def make_problem(shape: Shape, device, seed=0, all_active=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = getattr(torch, shape.dtype)
    M = shape.M
    hidden = torch.randn(M, shape.H, generator=g).to(device=device, dtype=dt)
    weight = (torch.randn(shape.V, shape.H, generator=g) * (3.0 / shape.H ** 0.5)).to(device=device, dtype=dt)
    targets = torch.randint(0, shape.V, (M,), generator=g).to(device)
    seq_ids = torch.arange(shape.B).repeat_interleave(shape.T).to(device)
    mask = torch.ones(M, dtype=torch.bool)
    for b in range(shape.B if not all_active else 0):  # completions of varying length: the tail of each row is
        mask[b * shape.T + int(shape.T * (0.5 + 0.5 * (b + 1) / shape.B)):(b + 1) * shape.T] = False  # padding (78%)
    mask = mask.to(device)
    adv = torch.randn(shape.B, generator=g).to(device)
    noise = lambda s: (s * torch.randn(M, generator=g)).to(device)  # noqa: E731
    with torch.no_grad():
        logp = fused_linear_logprobs(hidden, weight, targets)
    old, ref = logp + noise(0.1), logp + noise(0.1)
    return dict(hidden=hidden, weight=weight, targets=targets, seq_ids=seq_ids, mask=mask, adv=adv, old=old, ref=ref)


# ---------------------------------------------------------------------------------------------- peers


def eager_loss(hidden, weight, targets, mask, adv_tok, old, ref, n_tokens, eps_low=0.2, eps_high=0.28, beta=0.04):
    """What a GRPO trainer does by default: fp32 logits materialised, log_softmax, gather, TRL's loss."""
    logits = (hidden @ weight.t()).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - old)
    pg = -torch.minimum(ratio * adv_tok, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv_tok)
    d = ref - logp
    kl = torch.exp(d) - d - 1
    return ((pg + beta * kl) * mask).sum() / n_tokens


def eager_sequence_loss(hidden, weight, targets, mask, seq_ids, num_seqs, adv_tok, old, ref, n_tokens, eps_low=0.2,
                        eps_high=0.28, beta=0.04):
    """The sequence-level importance ratio (GSPO-style) the same way: rho_i = exp(mean over sequence i of l - l_old)."""
    logits = (hidden @ weight.t()).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    cnt = torch.zeros(num_seqs, device=mask.device).index_add(0, seq_ids, mask).clamp(min=1)
    lr = torch.zeros(num_seqs, device=mask.device).index_add(0, seq_ids, (logp - old) * mask) / cnt
    ratio = torch.exp(lr)[seq_ids]
    pg = -torch.minimum(ratio * adv_tok, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv_tok)
    d = ref - logp
    kl = torch.exp(d) - d - 1
    return ((pg + beta * kl) * mask).sum() / n_tokens


def eager_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


_compiled = {}


def compiled(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def variants(p, shape: Shape, device, skip):
    """name -> (matmul count of the floor, closure doing one step, needs grad of hidden/weight)."""
    h, w, t, sid, m, adv, old, ref = (p[k] for k in ("hidden", "weight", "targets", "seq_ids", "mask", "adv", "old", "ref"))
    n_tok = int(m.sum())
    mf = m.float()
    adv_tok = adv[sid]
    cfg = GRPOLossConfig(**LOSS)
    on_cuda = device.type == "cuda"
    out = {}

    def step(fn, frozen=False):
        def run():
            hh = h.detach().requires_grad_()
            ww = w.detach().requires_grad_(not frozen)
            loss = fn(hh, ww)
            loss.backward()
            return loss.detach(), hh.grad, ww.grad
        return run

    ours = lambda c: lambda hh, ww: fused_linear_grpo_loss(hh, ww, t, sid, adv, m, c, old_logp=old, ref_logp=ref)[0]  # noqa: E731
    out["floor_matmul"] = (1, lambda: (torch.mm(h, w.t()), None, None))
    h_act = h[m].contiguous()  # our kernels drop the rows outside the loss before any GEMM: their own floor unit
    out["floor_matmul_active"] = (1, lambda: (torch.mm(h_act, w.t()), None, None))
    # ours_*: backend "auto" (Triton on CUDA; on the CPU the C++ kernels where built); on the CPU also ours_*_torch,
    # the torch twins (the CPU path without the C++ library)
    for suffix, be in [("", "auto")] + ([("_torch", "torch")] if not on_cuda else []):
        c = cfg.replace(backend=be)
        out[f"ours_fast{suffix}"] = (3, step(ours(c)))
        out[f"ours_low_memory{suffix}"] = (4, step(ours(c.replace(memory_mode="low_memory"))))
        out[f"ours_sequence{suffix}"] = (4, step(ours(c.replace(importance_sampling="sequence"))))
        out[f"ours_frozen{suffix}"] = (2, step(ours(c), frozen=True))
        out[f"ours_logprobs{suffix}"] = (1, (lambda be: lambda: (
            torch.no_grad()(fused_linear_logprobs)(h, w, t, backend=be), None, None))(be))
    eager = lambda hh, ww: eager_loss(hh, ww, t, mf, adv_tok, old, ref, n_tok)  # noqa: E731
    S = int(sid.max()) + 1
    eager_seq = lambda hh, ww: eager_sequence_loss(hh, ww, t, mf, sid, S, adv_tok, old, ref, n_tok)  # noqa: E731
    out["eager"] = (None, step(eager))
    out["eager_sequence"] = (None, step(eager_seq))
    out["eager_frozen"] = (None, step(eager, frozen=True))
    out["eager_logprobs"] = (None, lambda: (torch.no_grad()(eager_logprobs)(h, w, t), None, None))
    if "compile" not in skip:
        ceager = lambda hh, ww: compiled(eager_loss)(hh, ww, t, mf, adv_tok, old, ref, n_tok)  # noqa: E731
        cseq = lambda hh, ww: compiled(eager_sequence_loss)(hh, ww, t, mf, sid, S, adv_tok, old, ref, n_tok)  # noqa: E731
        out["compile"] = (None, step(ceager))
        out["compile_sequence"] = (None, step(cseq))
        out["compile_frozen"] = (None, step(ceager, frozen=True))
        out["compile_logprobs"] = (None, lambda: (torch.no_grad()(compiled(eager_logprobs))(h, w, t), None, None))
    if "liger" not in skip:
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        except ImportError as e:  # reported in the results, not hidden
            out["liger_chunked"] = (None, f"skipped: {e}")
        else:
            B, T = shape.B, shape.T
            for chunk in (1, 8):
                mod = LigerFusedLinearGRPOLoss(beta=0.04, compiled=on_cuda, use_ref_model=True, chunk_size=chunk,
                                               epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo", temperature=1.0)
                fn = (lambda mod: lambda hh, ww: mod(hh.view(B, T, -1), ww, t.view(B, T), m.view(B, T), adv,
                                                     ref_per_token_logps=ref.view(B, T),
                                                     old_per_token_logps=old.view(B, T))[0])(mod)
                out[f"liger_chunked_{chunk}"] = (None, step(fn))
            if on_cuda:
                def liger_triton(hh, ww):
                    hx = torch.cat([hh.view(B, T, -1), hh.new_zeros(B, 1, hh.shape[-1])], 1)  # [B, T+1, H]
                    logits = hx @ ww.t()
                    loss, _ = triton_grpo_loss(logits, old.view(B, T), ref.view(B, T), t.view(B, T), adv,
                                               m.view(B, T).int(), temperature=1.0, beta=0.04, eps_low=0.2,
                                               eps_high=0.28, loss_type="dapo", reduce=True)
                    return loss
                out["liger_triton"] = (None, step(liger_triton))
            else:
                out["liger_triton"] = (None, "skipped: triton_grpo_loss needs CUDA")
    return out


# ---------------------------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, reps, warmup):
    """Median ms of `reps` runs after `warmup`; peak extra GiB (CUDA) of one run."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / GIB
    return statistics.median(times), peak


def measure_interleaved(fns: dict, reps: int, warmup: int) -> list:
    """CPU: median ms of each function over ``reps`` rounds, each round running every function once in turn, so that
    a drift of the machine's speed falls on every variant alike. Returns a list (ms or the exception raised), in
    the order of ``fns``."""
    out = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            out[name] = []
        except Exception as e:  # noqa: BLE001  (a peer failing must not hide the others)
            out[name] = e
    for _ in range(reps):
        for name, fn in fns.items():
            if isinstance(out[name], Exception):
                continue
            t0 = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - t0) * 1e3)
    return [v if isinstance(v, Exception) else statistics.median(v) for v in out.values()]


def _time_one(row, run):
    try:
        row["ms"], row["peak_gib"] = run()
        row["status"] = "ok"
    except torch.OutOfMemoryError:
        row["status"] = "out of memory"
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001  (a peer failing must not hide the others)
        row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


# ---------------------------------------------------------------------------------------------- correctness


def rel(x, r):
    x, r = x.detach().double(), r.detach().double()
    if torch.isnan(x).any():
        return float("inf")
    return float((x - r).norm() / r.norm().clamp(min=1e-30))


def check_ours(p, shape: Shape, rows: int, device):
    """Our variants on the first `rows` tokens vs float64 and vs torch's bf16 pipeline on the same inputs.
    Returns {variant: {passed, errors}}. Floor 2e-5 for fp32 inputs, else err <= 2 x pipeline + 1e-3."""
    h, w = p["hidden"][:rows], p["weight"]
    t, sid, m, old, ref = (p[k][:rows] for k in ("targets", "seq_ids", "mask", "old", "ref"))
    adv = p["adv"]
    n_glob = float(p["mask"].sum())
    floor = 2e-5 if h.dtype == torch.float32 else 1e-3
    cfg = GRPOLossConfig(**LOSS)
    res = {}
    cases = {}
    for suffix, be in [("", "auto")] + ([("_torch", "torch")] if device.type != "cuda" else []):
        c = cfg.replace(backend=be)
        cases.update({f"ours_fast{suffix}": (c, False), f"ours_low_memory{suffix}": (c.replace(memory_mode="low_memory"), False),
                      f"ours_sequence{suffix}": (c.replace(importance_sampling="sequence"), False),
                      f"ours_frozen{suffix}": (c, True)})

    def run(fn, c, frozen, f64, **kw):
        hh = (h.double() if f64 else h).detach().requires_grad_()
        ww = (w.double() if f64 else w).detach().requires_grad_(not frozen)
        cast = (lambda x: x.double()) if f64 else (lambda x: x)
        loss, _ = fn(hh, ww, t, sid, cast(adv), m, c, old_logp=cast(old), ref_logp=cast(ref), num_global_tokens=n_glob, **kw)
        loss.backward()
        return [loss, hh.grad] + ([] if frozen else [ww.grad])

    for name, (c, frozen) in cases.items():
        o = run(fused_linear_grpo_loss, c, frozen, False)
        r64 = run(grpo_loss_reference, c, frozen, True)
        rp = run(grpo_loss_reference, c, frozen, False, logits_dtype=h.dtype)
        errs = [(rel(a, b), rel(q, b)) for a, b, q in zip(o, r64, rp)]
        res[name] = {"passed": all(e <= max(2 * pe, floor) for e, pe in errs),
                     "errors": {k: {"ours": e, "torch_pipeline": pe}
                                for k, (e, pe) in zip(("loss", "grad_hidden", "grad_weight"), errs)}}
        del o, r64, rp
    with torch.no_grad():
        l64 = logprobs_reference(h.double(), w.double(), t)
        lp = logprobs_reference(h, w, t, logits_dtype=h.dtype)
        for suffix, be in [("", "auto")] + ([("_torch", "torch")] if device.type != "cuda" else []):
            lo = fused_linear_logprobs(h, w, t, backend=be)
            e, pe = rel(lo, l64), rel(lp, l64)
            res[f"ours_logprobs{suffix}"] = {"passed": e <= max(2 * pe, floor),
                                            "errors": {"logp": {"ours": e, "torch_pipeline": pe}}}
    return res


# ---------------------------------------------------------------------------------------------- targets


def verdicts(rows):
    """The targets of docs/benchmarks.md at the reference shape, from one run's rows ({variant: row})."""
    def ms(k):
        return rows[k]["ms"] if k in rows and rows[k].get("ms") is not None else None

    def pk(k):
        return rows[k]["peak_gib"] if k in rows and rows[k].get("peak_gib") is not None else None
    f = ms("floor_matmul")
    out = {}

    def crit(name, cond):
        try:
            out[name] = bool(cond())
        except TypeError:  # a number missing (variant skipped or failed)
            out[name] = None
    crit("fast <= 1.05 x 3 matmuls", lambda: ms("ours_fast") <= 1.05 * 3 * f)
    crit("fast faster than torch.compile", lambda: ms("ours_fast") < ms("compile"))
    crit("fast peak <= 3/4 torch.compile", lambda: pk("ours_fast") <= 0.75 * pk("compile"))
    crit("low_memory <= 1.10 x 4 matmuls", lambda: ms("ours_low_memory") <= 1.10 * 4 * f)
    crit("low_memory peak <= 1/3 torch.compile", lambda: pk("ours_low_memory") <= pk("compile") / 3)
    crit("low_memory >= 8x faster than Liger chunked",
         lambda: 8 * ms("ours_low_memory") <= min(ms("liger_chunked_1"), ms("liger_chunked_8")))
    crit("frozen <= 1.10 x 2 matmuls", lambda: ms("ours_frozen") <= 1.10 * 2 * f)
    crit("frozen faster than torch.compile frozen", lambda: ms("ours_frozen") < ms("compile_frozen"))
    crit("frozen peak <= 0.6 GiB", lambda: pk("ours_frozen") <= 0.6)
    crit("sequence <= 1.10 x 4 matmuls", lambda: ms("ours_sequence") <= 1.10 * 4 * f)
    crit("logprobs <= 1.10 x 1 matmul", lambda: ms("ours_logprobs") <= 1.10 * f)
    crit("logprobs peak <= 0.5 GiB", lambda: pk("ours_logprobs") <= 0.5)
    return out


def cpu_verdicts(rows):
    """The native CPU backend's targets (issue 14), from one run's rows at the CPU preset: each loss variant at
    least 1.2x faster than torch.compile of the same loss, log-probs within 1.10x of one matmul and no slower than
    torch.compile's."""
    def ms(k):
        return rows[k]["ms"] if k in rows and rows[k].get("ms") is not None else None
    out = {}

    def crit(name, cond):
        try:
            out[name] = bool(cond())
        except TypeError:
            out[name] = None
    for ours, peer in (("ours_fast", "compile"), ("ours_low_memory", "compile"), ("ours_sequence", "compile_sequence"),
                       ("ours_frozen", "compile_frozen")):
        crit(f"{ours} >= 1.2x faster than {peer}", lambda o=ours, p=peer: 1.2 * ms(o) <= ms(p))
    crit("logprobs <= 1.10 x 1 matmul", lambda: ms("ours_logprobs") <= 1.10 * ms("floor_matmul"))
    crit("logprobs no slower than torch.compile", lambda: ms("ours_logprobs") <= ms("compile_logprobs"))
    return out


# ---------------------------------------------------------------------------------------------- main


def environment(device):
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401
        env["liger_kernel"] = version("liger-kernel")
    except Exception:  # noqa: BLE001
        env["liger_kernel"] = None
    from exgrpo_kernels import _native
    from exgrpo_kernels._utils import resolve_backend
    env["kernel_backend"] = resolve_backend("auto", device)  # what ours_* ran on
    env["native"] = _native.status()
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name()
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return env


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = sorted({r["shape"] for r in results},
                    key=lambda s: [int(x) if x.isdigit() else x for x in s.replace("x", " ").split()])
    main = shapes[-1] if len(shapes) == 1 else max(
        shapes, key=lambda s: sum(1 for r in results if r["shape"] == s and r.get("ms")))
    rows = [r for r in results if r["shape"] == main and r.get("ms") is not None and r["variant"] != "floor_matmul"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    names = [r["variant"] for r in rows]
    ax.barh(names, [r["ratio_to_floor"] for r in rows],
            color=["tab:green" if n.startswith("ours") else "tab:gray" for n in names])
    for k in (1, 2, 3, 4):
        ax.axvline(k, color="tab:red", lw=0.6, ls="--")
    ax.set_xlabel("time / one [M,H]x[H,V] matmul")
    ax.set_title(f"fwd+bwd at {main}")
    ax = axes[1]
    mem = [r for r in rows if r.get("peak_gib") is not None]
    if mem:
        ax.barh([r["variant"] for r in mem], [r["peak_gib"] for r in mem],
                color=["tab:green" if r["variant"].startswith("ours") else "tab:gray" for r in mem])
        ax.set_xlabel("peak extra GiB")
    else:
        ax.text(0.5, 0.5, "peak memory: CUDA only", ha="center")
    ax.set_title("memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help=f"one of {sorted(PRESETS)} (default: targets on CUDA, cpu-small on the CPU)")
    ap.add_argument("--sweep", action="store_true", help="also run the N/V sweep (CUDA)")
    ap.add_argument("--sweep-variants", default="floor_matmul,ours_fast,ours_low_memory,ours_frozen,ours_logprobs,eager,compile",
                    help="variants timed in the sweep")
    ap.add_argument("--skip", default="", help="comma list of peer groups to skip: compile, liger")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--check-rows", type=int, default=96, help="rows checked against float64 at each shape")
    ap.add_argument("--all-active", action="store_true",
                    help="every token in the loss (default: 78%%, completions of varying length padded to T)")
    ap.add_argument("--out", default="bench/results/latest")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = a.preset or ("targets" if device.type == "cuda" else "cpu-small")
    if preset not in PRESETS:
        raise SystemExit(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    skip = set(filter(None, a.skip.split(",")))
    jobs = [(s, None) for s in PRESETS[preset]]
    if a.sweep:
        jobs += [(s, set(a.sweep_variants.split(","))) for s in PRESETS["sweep"] if s not in PRESETS[preset]]
    os.makedirs(a.out, exist_ok=True)
    env = environment(device)
    print(f"# {env['card']} | torch {env['torch']} | triton {env['triton']} | liger {env['liger_kernel']} | {env['date']}")
    results = []
    for shape, only in jobs:
        tag = f"M{shape.M} H{shape.H} V{shape.V} {shape.dtype}"
        p = make_problem(shape, device, all_active=a.all_active)
        checks = check_ours(p, shape, min(a.check_rows, shape.M), device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows, fns = [], {}
        for name, (n_mm, fn) in variants(p, shape, device, skip).items():
            if only is not None and name not in only:
                continue
            row = {"shape": tag, "variant": name, "floor_matmuls": n_mm, "ms": None, "peak_gib": None}
            rows.append(row)
            if isinstance(fn, str):
                row["status"] = fn
            elif name in checks and not checks[name]["passed"]:
                row["status"] = "correctness check failed: speed not reported"
                row["check"] = checks[name]
            else:
                fns[name] = fn
                if name in checks:
                    row["check"] = checks[name]
        if device.type == "cuda":  # one variant after the other, each with its peak memory
            for row in rows:
                if row["variant"] in fns:
                    _time_one(row, lambda fn=fns[row["variant"]]: measure(fn, device, a.reps, a.warmup))
        else:  # interleaved rounds: a CPU's speed drifts by tens of percent over seconds (shared cores, clocks)
            for row, res in zip([r for r in rows if r["variant"] in fns], measure_interleaved(fns, a.reps, a.warmup)):
                if isinstance(res, Exception):
                    row["status"] = f"failed: {type(res).__name__}: {str(res).splitlines()[0][:200]}"
                else:
                    row["ms"], row["status"] = res, "ok"
        by_name = {r["variant"]: r for r in rows}
        floor_ms = by_name.get("floor_matmul", {}).get("ms")
        active_ms = by_name.get("floor_matmul_active", {}).get("ms")
        for row in rows:
            name = row["variant"]
            if name == "floor_matmul" and row["ms"]:
                row["tflops"] = 2 * shape.M * shape.H * shape.V / (row["ms"] * 1e9)
            if row["ms"] is not None and floor_ms:
                row["ratio_to_floor"] = row["ms"] / floor_ms
            if row["ms"] is not None and name.startswith("ours") and "logprobs" not in name and active_ms:
                row["ratio_to_active_floor"] = row["ms"] / active_ms
            results.append(row)
            ms = f"{row['ms']:9.2f}" if row["ms"] is not None else "        -"
            rt = f"{row.get('ratio_to_floor', 0):6.2f}x" if row.get("ratio_to_floor") else "      -"
            pk = f"{row['peak_gib']:7.2f}" if row["peak_gib"] is not None else "      -"
            print(f"{tag:28s} {name:22s} {ms} ms {rt} floor {pk} GiB  {row['status']}", flush=True)
        del p
    s0 = PRESETS[preset][0]
    by = {r["variant"]: r for r in results if r["shape"] == f"M{s0.M} H{s0.H} V{s0.V} {s0.dtype}"}
    v = verdicts(by) if device.type == "cuda" and preset == "targets" else (
        cpu_verdicts(by) if device.type == "cpu" and preset == "cpu-small" else {})
    for k, ok in v.items():
        print(f"  target {'MET ' if ok else ('MISS' if ok is False else 'n/a ')} {k}")
    doc = {"environment": env, "preset": preset, "loss": LOSS, "all_active": a.all_active, "shapes": [asdict(s) for s, _ in jobs],
           "results": results, "targets": v}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    keys = ["shape", "variant", "ms", "ratio_to_floor", "ratio_to_active_floor", "peak_gib", "floor_matmuls", "status"]
    with open(os.path.join(a.out, "results.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(results)
    plot(results, os.path.join(a.out, "results.png"))
    print(f"wrote {a.out}/results.json, results.csv, results.png")
    failed = [r for r in results if r["status"].startswith("correctness")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
