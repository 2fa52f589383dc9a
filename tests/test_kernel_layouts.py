"""The CUDA code path's failure modes, on the CPU: the Triton kernels (interpreter, backend forced) and the torch
twins with upstream gradients in every layout (dense, stride 0 from ``.sum()``, scaled mean, strided view),
strided and expanded 1-D inputs, non-contiguous hidden states, a vocabulary spanning several BLOCK_V blocks,
the token NLL (SFT) loss in 3 GEMMs, and the GEMM dtypes under autocast. Ground truth: float64 on the same
inputs; the tolerance rule of tests/utils.py."""
import pytest
import torch
from exgrpo_kernels import (
    GRPOLossConfig,
    fused_linear_grpo_loss,
    fused_linear_logprobs,
    fused_linear_nll_loss,
    grpo_loss_reference,
    logprobs_reference,
    nll_loss_reference,
)

from tests.utils import BACKENDS, DEVICE, GemmRecorder, make_inputs, rel_err, targets, tolerance, use_small_blocks


@pytest.fixture
def small_blocks(monkeypatch):
    """BLOCK_V capped at 32: V = 301 spans 10 blocks, so the online log-sum-exp crosses block borders."""
    use_small_blocks(monkeypatch, 32)


def _targets(N, V, seed):
    return targets(N, V, seed, ignore_every=5, last_at=2)


UPSTREAM = ["dense", "sum", "scaled_mean", "strided"]


def _upstream_loss(kind, lp, ent, N):
    """A scalar of (lp, ent) whose gradient reaches the kernel's backward in the named layout."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(N, 2, generator=g, dtype=torch.float64).to(DEVICE)
    if kind == "dense":
        return (lp.double() * w[:, 0]).sum() + (ent.double() * w[:, 1]).sum()
    if kind == "sum":  # stride-0 upstream gradients (what -(logp.sum()) hands the backward)
        return lp.sum() + ent.sum()
    if kind == "scaled_mean":  # stride 0 and a scale
        return lp.mean() * 3.0 - ent.mean() * 0.5
    # strided: both outputs stacked into one [N, 2] tensor; each upstream is a column (stride 2)
    both = torch.stack([lp.double(), ent.double()], 1)
    return (both * w).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", UPSTREAM)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_every_upstream_layout(backend, kind, dtype, small_blocks):
    N, H, V = 29, 16, 301
    hidden, weight = make_inputs(N, H, V, dtype, seed=5)
    targets = _targets(N, V, 5)

    def run(fn, h, w, **kw):
        h = h.detach().clone().requires_grad_()
        w = w.detach().clone().requires_grad_()
        lp, ent = fn(h, w, targets, temperature=0.9, return_entropy=True, **kw)
        _upstream_loss(kind, lp, ent, N).backward()
        return h.grad, w.grad

    ours = run(fused_linear_logprobs, hidden, weight, chunk_size=8, backend=backend)
    truth = run(logprobs_reference, hidden.double(), weight.double())
    pipe = run(logprobs_reference, hidden, weight)
    for name, o, t, p in zip(("grad_hidden", "grad_weight"), ours, truth, pipe):
        err, perr = rel_err(o, t), rel_err(p, t)
        assert err <= tolerance(dtype, perr), f"{name} ({kind}): {err:.2e} vs pipeline {perr:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_strided_targets_and_noncontiguous_hidden(backend, small_blocks):
    N, H, V = 23, 12, 301
    big_h, weight = make_inputs(N * 2, 2 * H, V, torch.float32, seed=2)
    weight = weight[:, :H].contiguous() * 1.4
    hidden = big_h[1::2, H:]  # a slice of a batch: row stride 4H, offset
    assert not hidden.is_contiguous()
    t2 = torch.stack([_targets(N, V, 3), torch.zeros(N, dtype=torch.long, device=DEVICE)], 1)
    targets = t2[:, 0]  # a column: stride 2
    lp = fused_linear_logprobs(hidden, weight, targets, backend=backend, chunk_size=5)
    ref = logprobs_reference(hidden.double(), weight.double(), targets.contiguous())
    assert rel_err(lp, ref) < 2e-6


def _grpo_batch(N=37, H=12, V=301, S=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = make_inputs(N, H, V, torch.float32, seed=seed, device="cpu")
    seq_ids = torch.sort(torch.randint(0, S, (N,), generator=g))[0]
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.1] = -100
    mask = torch.rand(N, generator=g) > 0.2
    adv = torch.randn(S, generator=g)
    with torch.no_grad():
        l = logprobs_reference(hidden.double(), weight.double(), targets, temperature=0.8).float()
    cols = torch.stack([l + 0.3 * torch.randn(N, generator=g), l + 0.2 * torch.randn(N, generator=g),
                        l + 0.25 * torch.randn(N, generator=g)], 1)  # old, ref, gen as columns of one [N, 3] tensor
    return {k: v.to(DEVICE) for k, v in dict(hidden=hidden, weight=weight, targets=targets, seq_ids=seq_ids, mask=mask,
                                              adv=adv, cols=cols).items()}


def _grpo(fn, b, cfg, layout, f64=False):
    cast = (lambda x: x.double()) if f64 else (lambda x: x)
    h = cast(b["hidden"]).detach().clone().requires_grad_()
    w = cast(b["weight"]).detach().clone().requires_grad_()
    cols = cast(b["cols"])
    if layout == "strided":  # views: columns (stride 3), an expanded advantage vector (stride 0), strided ids
        old, ref, gen = cols[:, 0], cols[:, 1], cols[:, 2]
        adv = cast(b["adv"])[:1].expand(b["adv"].shape[0]) if f64 is None else cast(b["adv"])
        adv = torch.stack([cast(b["adv"]), cast(b["adv"])], 1)[:, 1]
        t = torch.stack([b["targets"], b["targets"]], 1)[:, 0]
        sid = torch.stack([b["seq_ids"], b["seq_ids"]], 1)[:, 1]
        mask = torch.stack([b["mask"], b["mask"]], 1)[:, 0]
    else:
        old, ref, gen = (cols[:, i].contiguous() for i in range(3))
        adv, t, sid, mask = cast(b["adv"]), b["targets"], b["seq_ids"], b["mask"]
    loss, metrics = fn(h, w, t, sid, adv, mask, cfg, old_logp=old, ref_logp=ref, gen_logp=gen)
    loss.backward()
    return loss, metrics, h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance", ["token", "sequence"])
@pytest.mark.parametrize("memory_mode", ["fast", "low_memory"])
@pytest.mark.parametrize("gen_correction", ["off", "token_truncate"])
def test_grpo_strided_inputs_equal_contiguous_and_float64(backend, importance, memory_mode, gen_correction, small_blocks):
    b = _grpo_batch(seed=3)
    cfg = GRPOLossConfig(temperature=0.8, eps_low=0.2, eps_high=0.28, beta=0.04, chunk_size=7, backend=backend,
                         importance_sampling=importance, memory_mode=memory_mode, gen_correction=gen_correction,
                         compute_entropy=True)
    strided = _grpo(fused_linear_grpo_loss, b, cfg, "strided")
    dense = _grpo(fused_linear_grpo_loss, b, cfg, "dense")
    truth = _grpo(grpo_loss_reference, b, cfg, "dense", f64=True)
    for i, name in ((0, "loss"), (2, "grad_hidden"), (3, "grad_weight")):
        assert rel_err(strided[i], truth[i]) < 2e-5, name
        assert rel_err(dense[i], truth[i]) < 2e-5, name
    for k in strided[1]:
        assert float(strided[1][k]) == pytest.approx(float(truth[1][k]), rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_loss_scaled_upstream_and_noncontiguous_hidden(backend, small_blocks):
    b = _grpo_batch(seed=4)
    big = torch.randn(b["hidden"].shape[0], 3 * b["hidden"].shape[1], device=DEVICE)
    big[:, 1::3] = b["hidden"]
    cfg = GRPOLossConfig(temperature=0.8, chunk_size=6, backend=backend)
    out = {}
    for name, hid in (("view", big[:, 1::3]), ("dense", b["hidden"])):
        h = hid.detach().clone() if name == "dense" else hid
        h.requires_grad_(name == "dense")
        leaf = big.detach().clone().requires_grad_() if name == "view" else None
        hh = leaf[:, 1::3] if leaf is not None else h
        w = b["weight"].detach().clone().requires_grad_()
        cols = b["cols"]
        loss, _ = fused_linear_grpo_loss(hh, w, b["targets"], b["seq_ids"], b["adv"], b["mask"], cfg,
                                         old_logp=cols[:, 0], ref_logp=cols[:, 1])
        (loss * -2.5).backward()  # a scaled upstream gradient
        out[name] = ((leaf.grad[:, 1::3] if leaf is not None else h.grad), w.grad, loss)
        if leaf is not None:
            assert torch.all(leaf.grad[:, 0::3] == 0)
    for a, c in zip(out["view"], out["dense"]):
        assert torch.allclose(a, c, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------- NLL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 24, 301, 8), (19, 8, 129, 1), (5, 16, 1000, 64)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_nll_loss_matches_float64(backend, dtype, shape, temperature, small_blocks):
    N, H, V, chunk = shape
    hidden, weight = make_inputs(N, H, V, dtype, seed=N)
    targets = _targets(N, V, N)
    n_glob = 3 * int((targets != -100).sum())

    def run(fn, h, w, **kw):
        h = h.detach().clone().requires_grad_()
        w = w.detach().clone().requires_grad_()
        loss = fn(h, w, targets, temperature=temperature, num_global_tokens=n_glob, **kw)
        (loss * 1.7).backward()
        return loss, h.grad, w.grad

    ours = run(fused_linear_nll_loss, hidden, weight, chunk_size=chunk, backend=backend)
    truth = run(nll_loss_reference, hidden.double(), weight.double())
    pipe = run(nll_loss_reference, hidden, weight)
    for name, o, t, p in zip(("loss", "grad_hidden", "grad_weight"), ours, truth, pipe):
        err, perr = rel_err(o, t), rel_err(p, t)
        assert err <= tolerance(dtype, perr), f"{name}: {err:.2e} vs pipeline {perr:.2e}"
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    assert torch.all(ours[1][targets == -100] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nll_reductions_frozen_weight_and_errors(backend):
    hidden, weight = make_inputs(17, 8, 50, torch.float32, seed=1)
    targets = _targets(17, 50, 1)
    n = int((targets != -100).sum())
    s = fused_linear_nll_loss(hidden, weight, targets, reduction="sum", backend=backend)
    m = fused_linear_nll_loss(hidden, weight, targets, backend=backend)
    assert float(s) == pytest.approx(float(m) * n, rel=1e-6)
    h = hidden.clone().requires_grad_()
    fused_linear_nll_loss(h, weight, targets, backend=backend).backward()
    assert h.grad is not None and weight.grad is None
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_linear_nll_loss(hidden, weight, targets, reduction="none")
    with pytest.raises(ValueError, match="num_global_tokens must be > 0, got 0"):
        fused_linear_nll_loss(hidden, weight, targets, num_global_tokens=0)
    all_ignored = torch.full_like(targets, -100)
    h = hidden.clone().requires_grad_()
    z = fused_linear_nll_loss(h, weight, all_ignored, backend=backend)
    z.backward()
    assert float(z) == 0 and torch.all(h.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemm_counts(backend):
    """The SFT loss takes 3 vocabulary GEMMs (2 with a frozen head); -logprobs.sum() takes 4; GRPO fast 3, sequence
    level 4 (3 in one tile)."""
    N, H, V = 24, 8, 97
    hidden, weight = make_inputs(N, H, V, torch.float32, seed=0)
    targets = torch.randint(0, V, (N,), device=DEVICE)

    def units(fn, frozen=False):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(not frozen)
        with GemmRecorder() as rec:
            fn(h, w).backward()
        return rec.matmul_units(N, H, V)

    assert units(lambda h, w: fused_linear_nll_loss(h, w, targets, chunk_size=5, backend=backend)) == 3
    assert units(lambda h, w: fused_linear_nll_loss(h, w, targets, chunk_size=5, backend=backend), frozen=True) == 2
    assert units(lambda h, w: -fused_linear_logprobs(h, w, targets, chunk_size=5, backend=backend).sum()) == 4
    seq = torch.zeros(N, dtype=torch.long, device=DEVICE)
    mask = torch.ones(N, dtype=torch.bool, device=DEVICE)
    adv = torch.ones(1, device=DEVICE)
    cfg = GRPOLossConfig(beta=0.0, chunk_size=5, backend=backend)
    assert units(lambda h, w: fused_linear_grpo_loss(h, w, targets, seq, adv, mask, cfg)[0]) == 3
    assert units(lambda h, w: fused_linear_grpo_loss(h, w, targets, seq, adv, mask,
                                                     cfg.replace(importance_sampling="sequence"))[0]) == 4
    # every row in one tile: the sequence-level pass 2 takes pass 1's tile
    one_tile = cfg.replace(importance_sampling="sequence", chunk_size=N)
    assert units(lambda h, w: fused_linear_grpo_loss(h, w, targets, seq, adv, mask, one_tile)[0]) == 3


# ----------------------------------------------------------------------------------------------------- autocast


def _gemm_operand_dtypes(rec, V):
    return {d for c in rec.vocab_gemms(V) for d in (c[3], c[4])}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["logprobs", "nll", "grpo"])
def test_fp32_master_under_bf16_autocast_gets_bf16_gemms_and_fp32_grads(backend, op):
    N, H, V = 20, 16, 77
    hidden, weight = make_inputs(N, H, V, torch.float32, seed=9)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    dev = torch.device(DEVICE).type
    seq = torch.arange(N, device=DEVICE) // 7
    adv = torch.tensor([0.5, -1.0, 1.5], device=DEVICE)
    mask = torch.ones(N, dtype=torch.bool, device=DEVICE)
    with GemmRecorder() as rec:
        with torch.autocast(dev, dtype=torch.bfloat16):
            if op == "logprobs":
                loss = fused_linear_logprobs(h, w, targets, backend=backend, chunk_size=8).sum()
            elif op == "nll":
                loss = fused_linear_nll_loss(h, w, targets, backend=backend, chunk_size=8)
            else:
                loss = fused_linear_grpo_loss(h, w, targets, seq, adv, mask, GRPOLossConfig(beta=0.0, chunk_size=8,
                                                                                             backend=backend))[0]
        loss.backward()
    assert _gemm_operand_dtypes(rec, V) == {torch.bfloat16}
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    # and the numbers are those of a bf16-GEMM computation, close to float64
    truth = nll_loss_reference(hidden.double(), weight.double(), targets) if op == "nll" else None
    if truth is not None:
        assert abs(float(loss) - float(truth)) / abs(float(truth)) < 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_model_gemm_dtype_and_grad_dtypes(backend):
    N, H, V = 20, 16, 77
    hidden, weight = make_inputs(N, H, V, torch.bfloat16, seed=9)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with GemmRecorder() as rec:
        fused_linear_nll_loss(h, w, targets, backend=backend, chunk_size=8).backward()
    # bf16 GEMMs on CUDA; on the CPU (no autocast) the kernels widen to fp32 GEMMs: the logits tile and its
    # gradient are fp32 there
    if torch.device(DEVICE).type == "cuda":
        assert _gemm_operand_dtypes(rec, V) == {torch.bfloat16}
    else:
        assert torch.float32 in _gemm_operand_dtypes(rec, V)
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    with GemmRecorder() as rec:
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            fused_linear_nll_loss(h, w, targets, backend=backend, chunk_size=8).backward()
    assert _gemm_operand_dtypes(rec, V) == {torch.bfloat16}


def test_mixed_dtypes_without_autocast_are_an_error():
    hidden, weight = make_inputs(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="differs from weight dtype.*only under torch.autocast"):
        fused_linear_nll_loss(hidden, weight.bfloat16(), torch.zeros(4, dtype=torch.long, device=DEVICE))
