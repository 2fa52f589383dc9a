"""Model-side options of the fused kernels against float64 on every backend (triton, native, torch): an lm_head
bias (and its gradient), final-logit soft-capping (Gemma-2/3), a logit scale (Cohere), external importance weights
per token or per sequence (TRL's vllm_is_ratio); the ops as torch.library custom ops under torch.compile(fullgraph=True); and
the import name: a checkout on sys.path never stands in for Hugging Face's `kernels` package."""
import importlib
import sys

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

from tests.utils import BACKENDS, DEVICE, make_inputs, rel_err, targets, tolerance, use_small_blocks

HEADS = [dict(softcap=None, logit_scale=1.0), dict(softcap=2.5, logit_scale=1.0), dict(softcap=None, logit_scale=0.6),
         dict(softcap=3.0, logit_scale=1.7)]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    use_small_blocks(monkeypatch, 64)


def _bias(V, dtype, seed=3):
    return (torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 0.5).to(dtype).to(DEVICE)


def _leaves(*xs, f64=False):
    return [None if x is None else (x.double() if f64 else x).detach().clone().requires_grad_() for x in xs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", HEADS, ids=lambda h: f"cap{h['softcap']}-scale{h['logit_scale']}")
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_nll_with_head_options(backend, head, with_bias, dtype):
    N, H, V = 23, 16, 211
    hidden, weight = make_inputs(N, H, V, dtype, seed=11)
    bias = _bias(V, dtype) if with_bias else None
    t = targets(N, V, 2)
    up = torch.randn(N, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE)

    def run_lp(fn, f64, **kw):
        h, w, b = _leaves(hidden, weight, bias, f64=f64)
        lp, ent = fn(h, w, t, bias=b, temperature=0.8, return_entropy=True, **head, **kw)
        ((lp.double() * up[:, 0]).sum() + (ent.double() * up[:, 1]).sum()).backward()
        return [lp, ent, h.grad, w.grad] + ([b.grad] if b is not None else [])

    def run_nll(fn, f64, **kw):
        h, w, b = _leaves(hidden, weight, bias, f64=f64)
        loss = fn(h, w, t, bias=b, temperature=0.8, **head, **kw)
        (loss * 1.3).backward()
        return [loss, h.grad, w.grad] + ([b.grad] if b is not None else [])

    for run, fn, ref in ((run_lp, fused_linear_logprobs, logprobs_reference),
                         (run_nll, fused_linear_nll_loss, nll_loss_reference)):
        ours = run(fn, False, chunk_size=7, backend=backend)
        truth = run(ref, True)
        pipe = run(ref, False)
        for i, (o, tr, p) in enumerate(zip(ours, truth, pipe)):
            err, perr = rel_err(o, tr), rel_err(p, tr)
            assert err <= tolerance(dtype, perr), f"{fn.__name__} output {i}: {err:.2e} vs pipeline {perr:.2e}"
        if with_bias:
            assert ours[-1].dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["fast", "low_memory", "sequence"])
@pytest.mark.parametrize("is_level", [None, "token", "sequence"])
def test_grpo_with_head_options_and_external_is_weights(backend, variant, is_level):
    N, H, V, S = 41, 12, 157, 5
    hidden, weight = make_inputs(N, H, V, torch.float32, seed=21)
    g = torch.Generator().manual_seed(5)
    bias = _bias(V, torch.float32)
    t = targets(N, V, 6)
    sid = torch.sort(torch.randint(0, S, (N,), generator=g))[0].to(DEVICE)
    mask = (torch.rand(N, generator=g) > 0.2).to(DEVICE)
    adv = torch.randn(S, generator=g).to(DEVICE)
    head = dict(softcap=4.0, logit_scale=0.9)
    with torch.no_grad():
        l = logprobs_reference(hidden.double(), weight.double(), t, bias=bias.double(), temperature=0.8, **head).float()
    old = l + 0.3 * torch.randn(N, generator=g).to(DEVICE)
    ref = l + 0.2 * torch.randn(N, generator=g).to(DEVICE)
    isw = None
    if is_level == "token":
        isw = torch.rand(N, generator=g).to(DEVICE) * 1.5
    elif is_level == "sequence":
        isw = torch.rand(S, generator=g).to(DEVICE) * 1.5
    cfg = GRPOLossConfig(temperature=0.8, eps_low=0.2, eps_high=0.28, beta=0.04, chunk_size=9, compute_entropy=True,
                         memory_mode="low_memory" if variant == "low_memory" else "fast",
                         importance_sampling="sequence" if variant == "sequence" else "token")

    def run(fn, f64, **kw):
        h, w, b = _leaves(hidden, weight, bias, f64=f64)
        c = (lambda x: None if x is None else x.double()) if f64 else (lambda x: x)
        loss, m = fn(h, w, t, sid, c(adv), mask, cfg, old_logp=c(old), ref_logp=c(ref), is_weights=c(isw), bias=b,
                     **head, **kw)
        (loss * 0.7).backward()
        return [loss, h.grad, w.grad, b.grad], m

    cfg_b = cfg.replace(backend=backend)
    ours, m = run(lambda *a, **k: fused_linear_grpo_loss(*a[:6], cfg_b, **k), False)
    truth, mt = run(grpo_loss_reference, True)
    for i, (o, tr) in enumerate(zip(ours, truth)):
        assert rel_err(o, tr) < 2e-5, f"output {i}"
    for k in ("kl", "clip_frac_low", "clip_frac_high", "ratio_mean", "entropy"):
        assert float(m[k]) == pytest.approx(float(mt[k]), rel=1e-4, abs=1e-6), k
    if is_level is not None:  # the weights change the loss: a test that could not see them would pass anyway
        base, _ = run(lambda *a, **k: fused_linear_grpo_loss(*a[:6], cfg_b, **dict(k, is_weights=None)), False)
        assert abs(float(base[0]) - float(ours[0])) > 1e-3 * abs(float(ours[0]))


def test_head_option_errors():
    hidden, weight = make_inputs(4, 8, 20, torch.float32)
    t = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"bias must be a \[V=20\] tensor"):
        fused_linear_logprobs(hidden, weight, t, bias=torch.zeros(19, device=DEVICE))
    with pytest.raises(ValueError, match="softcap must be > 0 or None, got -1"):
        fused_linear_nll_loss(hidden, weight, t, softcap=-1.0)
    with pytest.raises(ValueError, match="logit_scale must be a finite non-zero number"):
        fused_linear_logprobs(hidden, weight, t, logit_scale=float("inf"))
    with pytest.raises(ValueError, match=r"is_weights must be \[N=4\] \(per token\) or \[S=1\]"):
        fused_linear_grpo_loss(hidden, weight, t, torch.zeros(4, dtype=torch.long, device=DEVICE),
                               torch.ones(1, device=DEVICE), torch.ones(4, dtype=torch.bool, device=DEVICE),
                               GRPOLossConfig(beta=0.0), is_weights=torch.ones(3, device=DEVICE))


# ------------------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("op", ["logprobs", "nll", "grpo"])
def test_ops_compile_fullgraph(op):
    """A caller compiled with fullgraph=True (no graph break allowed) gives eager's values and gradients."""
    torch._dynamo.reset()
    N, H, V = 24, 16, 97
    hidden, weight = make_inputs(N, H, V, torch.float32, seed=1)
    bias = _bias(V, torch.float32)
    t = targets(N, V, 1)
    sid = (torch.arange(N, device=DEVICE) // 8)
    adv = torch.tensor([0.5, -1.0, 2.0], device=DEVICE)
    mask = torch.ones(N, dtype=torch.bool, device=DEVICE)
    old = torch.full((N,), -4.5, device=DEVICE)

    def caller(h, w, b):
        x = torch.tanh(h) * 2.0  # work around the op, compiled with it
        if op == "logprobs":
            lp, ent = fused_linear_logprobs(x, w, t, bias=b, softcap=3.0, return_entropy=True)
            return (lp * 1.5).sum() - ent.mean()
        if op == "nll":
            return fused_linear_nll_loss(x, w, t, bias=b, temperature=0.9)
        loss, m = fused_linear_grpo_loss(x, w, t, sid, adv, mask, GRPOLossConfig(beta=0.0, compute_entropy=True),
                                         old_logp=old, bias=b)
        return loss + 0.0 * m["entropy"]

    def grads(fn):
        h, w, b = _leaves(hidden, weight, bias)
        out = fn(h, w, b)
        out.backward()
        return out.detach(), h.grad, w.grad, b.grad

    eager = grads(caller)
    compiled = grads(torch.compile(caller, fullgraph=True, backend="aot_eager"))
    for a, c in zip(eager, compiled):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ import name


def test_checkout_on_sys_path_does_not_stand_in_for_hub_kernels(monkeypatch):
    """transformers probes (and may import) a package named `kernels`; with this repository's root on sys.path (as
    when running from a checkout) it must still see no hub kernels, and nothing may register the ops twice."""
    import os
    pytest.importorskip("transformers")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(root)
    for k in [k for k in sys.modules if k == "kernels" or k.startswith("kernels.")]:
        monkeypatch.delitem(sys.modules, k)
    from transformers.utils import import_utils
    import_utils.is_kernels_available.cache_clear()
    assert import_utils.is_kernels_available() is False
    mod = importlib.import_module("kernels")
    assert not hasattr(mod, "fused_linear_grpo_loss") and not hasattr(mod, "__version__")
    with pytest.raises(ImportError, match="belongs to the package exgrpo_kernels"):
        importlib.import_module("kernels.grpo_loss")
    import exgrpo_kernels
    assert exgrpo_kernels.fused_linear_grpo_loss.__module__ == "exgrpo_kernels.grpo_loss.api"
    assert not any(k == "kernels._rows" for k in sys.modules)


def test_config_key_roundtrip_covers_every_field():
    import dataclasses
    import json

    from exgrpo_kernels.grpo_loss.config import FIELDS
    assert set(FIELDS) == {f.name for f in dataclasses.fields(GRPOLossConfig)}
    c = GRPOLossConfig(loss_type="dr_grpo", max_completion_length=7, delta=1.5, eps_low=0.1, chunk_size=5,
                       gen_correction="token_mask", gen_correction_min=0.5, off_policy_mask_threshold=0.3,
                       use_bias_correction_kl=True, sapo_temperature_neg=2.0, vespo_k_pos=1.5,
                       memory_mode="low_memory", compute_entropy=True, backend="torch")
    assert GRPOLossConfig(**json.loads(c.key())) == c
    assert GRPOLossConfig.from_key(c.key()) is GRPOLossConfig.from_key(c.key())  # parsed once
