"""fused_linear_logprobs against a float64 computation on the same inputs: log-probs, entropy,
grad-hidden and grad-weight, every backend (triton, native, torch), several dtypes, temperatures and odd shapes."""
import pytest
import torch
from exgrpo_kernels import fused_linear_logprobs, logprobs_reference

from tests.utils import BACKENDS, DEVICE, make_inputs, rel_err, targets, tolerance

SHAPES = [  # N, H, V, chunk: V not a power of two, N not a multiple of the chunk, chunks of 1
    (37, 24, 301, 8),
    (5, 16, 1000, 64),
    (19, 8, 129, 1),
]


def _targets(N, V, seed):
    return targets(N, V, seed + 1, ignore_every=7, last_at=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_entropy_and_grads_match_float64(backend, dtype, shape, temperature):
    N, H, V, chunk = shape
    hidden, weight = make_inputs(N, H, V, dtype, seed=N + V)
    targets = _targets(N, V, N)
    g = torch.Generator().manual_seed(7)
    up_l, up_h = (torch.randn(N, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))

    def run(fn, h, w, **kw):
        h = h.detach().clone().requires_grad_()
        w = w.detach().clone().requires_grad_()
        lp, ent = fn(h, w, targets, temperature=temperature, return_entropy=True, **kw)
        ((lp.double() * up_l).sum() + (ent.double() * up_h).sum()).backward()
        return lp, ent, h.grad, w.grad

    ours = run(fused_linear_logprobs, hidden, weight, chunk_size=chunk, backend=backend)
    truth = run(logprobs_reference, hidden.double(), weight.double())
    pipe = run(logprobs_reference, hidden, weight)  # torch's own low-precision pipeline
    for name, o, t, p in zip(("logp", "entropy", "grad_hidden", "grad_weight"), ours, truth, pipe):
        err, perr = rel_err(o, t), rel_err(p, t)
        assert err <= tolerance(dtype, perr), f"{name}: error {err:.2e} vs torch pipeline {perr:.2e}"
    assert ours[0].dtype == torch.float32 and ours[2].dtype == dtype and ours[3].dtype == dtype
    assert torch.all(ours[0][targets == -100] == 0)
    assert torch.all(ours[2][targets == -100].float().abs().sum(-1) >= 0)  # finite
    assert torch.all(ours[0] <= 1e-6), "a log-prob above 0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_negative_logits_and_extreme_values(backend):
    # every logit strongly negative: a max initialised to 0 instead of -inf would break this
    N, H, V = 9, 4, 77
    hidden = torch.ones(N, H, device=DEVICE)
    weight = -50.0 - torch.rand(V, H, device=DEVICE) * 10
    targets = torch.arange(N, device=DEVICE) * 3
    lp = fused_linear_logprobs(hidden, weight, targets, backend=backend, chunk_size=4)
    ref = logprobs_reference(hidden.double(), weight.double(), targets)
    assert rel_err(lp, ref) < 1e-5
    # very peaked rows: log-probs of the argmax near 0, of others large negative but finite
    h2 = torch.rand(N, H, device=DEVICE)
    weight2 = torch.randn(V, H, device=DEVICE) * 40
    lp2 = fused_linear_logprobs(h2, weight2, targets, backend=backend)
    ref2 = logprobs_reference(h2.double(), weight2.double(), targets)
    assert torch.isfinite(lp2).all() and rel_err(lp2, ref2) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_pass_and_chunk_invariance(backend):
    hidden, weight = make_inputs(50, 16, 333, torch.float32, seed=3)
    targets = _targets(50, 333, 3)
    with torch.no_grad():
        a = fused_linear_logprobs(hidden, weight, targets, chunk_size=1, backend=backend)
        b = fused_linear_logprobs(hidden, weight, targets, chunk_size=7, backend=backend)
        c = fused_linear_logprobs(hidden, weight, targets, backend=backend)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)
    assert not a.requires_grad


def test_frozen_weight_gets_no_grad():
    hidden, weight = make_inputs(11, 8, 40, torch.float32)
    hidden.requires_grad_()
    lp = fused_linear_logprobs(hidden, weight, torch.randint(0, 40, (11,), device=DEVICE), backend="torch")
    lp.sum().backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_gives_nan(backend):
    hidden, weight = make_inputs(6, 8, 40, torch.float32)
    hidden[2, 3] = float("nan")
    lp = fused_linear_logprobs(hidden, weight, torch.randint(0, 40, (6,), device=DEVICE), backend=backend)
    assert torch.isnan(lp[2]) and torch.isfinite(lp[[0, 1, 3, 4, 5]]).all()
