"""fused_linear_grpo_loss against the float64 reference on the same inputs: loss, metrics, grad-hidden and
grad-weight for every loss_type x importance level x KL estimator, every backend (triton, native, torch), both
memory modes, with and without old/ref/gen log-probs, odd shapes, empty sequences, chunk borders."""
import itertools

import pytest
import torch
from exgrpo_kernels import GRPOLossConfig, fused_linear_grpo_loss, grpo_loss_reference, logprobs_reference
from exgrpo_kernels.grpo_loss import LOSS_TYPES

from tests.utils import BACKENDS, DEVICE, make_inputs, rel_err, tolerance


def make_batch(N=41, H=12, V=263, S=6, dtype=torch.float32, seed=0, empty_seq=True):
    """A packed batch: S sequences of uneven length, prompt tokens masked out, one sequence with no loss token,
    a few -100 targets, old/ref/gen log-probs near the current ones (ratios that hit both clip bounds)."""
    g = torch.Generator().manual_seed(seed)
    hidden, weight = make_inputs(N, H, V, dtype, seed=seed, device="cpu")
    cuts = torch.sort(torch.randperm(N - 1, generator=g)[: S - 1] + 1)[0]
    seq_ids = torch.zeros(N, dtype=torch.int64)
    for c in cuts:
        seq_ids[c:] += 1
    loss_mask = torch.rand(N, generator=g) > 0.25
    if empty_seq:
        loss_mask[seq_ids == 2] = False
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.1] = -100
    adv = torch.randn(S, generator=g)
    with torch.no_grad():
        l = logprobs_reference(hidden.double(), weight.double(), targets, temperature=0.8).float()
    old = l + 0.3 * torch.randn(N, generator=g)
    ref = l + 0.2 * torch.randn(N, generator=g)
    gen = old + 0.2 * torch.randn(N, generator=g)
    b = dict(hidden=hidden, weight=weight, targets=targets, seq_ids=seq_ids, advantages=adv, loss_mask=loss_mask,
             old_logp=old, ref_logp=ref, gen_logp=gen)
    return {k: v.to(DEVICE) for k, v in b.items()}


def run(fn, b, cfg, dtype=None, frozen=False, **over):
    kw = dict(b, **over)
    cast = (lambda x: x.double()) if dtype == torch.float64 else (lambda x: x)
    h = cast(kw.pop("hidden")).detach().clone().requires_grad_()
    w = cast(kw.pop("weight")).detach().clone().requires_grad_(not frozen)
    if dtype == torch.float64:
        for k in ("old_logp", "ref_logp", "gen_logp", "advantages"):
            if kw.get(k) is not None:
                kw[k] = kw[k].double()
    loss, metrics = fn(h, w, kw.pop("targets"), kw.pop("seq_ids"), kw.pop("advantages"), kw.pop("loss_mask"), cfg, **kw)
    loss.backward()
    return loss, metrics, h.grad, w.grad


def check(b, cfg, dtype=torch.float32, frozen=False, **over):
    ours = run(fused_linear_grpo_loss, b, cfg, frozen=frozen, **over)
    truth = run(grpo_loss_reference, b, cfg, torch.float64, frozen=frozen, **over)
    pipe = run(grpo_loss_reference, b, cfg, frozen=frozen, **over)
    names = ("loss", "grad_hidden") + (() if frozen else ("grad_weight",))
    idx = (0, 2) + (() if frozen else (3,))
    for name, i in zip(names, idx):
        err, perr = rel_err(ours[i], truth[i]), rel_err(pipe[i], truth[i])
        assert err <= tolerance(dtype, perr), f"{name}: error {err:.2e} vs torch pipeline {perr:.2e} ({cfg})"
    if frozen:
        assert ours[3] is None
    n_tok = max(1.0, float(truth[1]["num_tokens"]))
    for k, v in ours[1].items():
        assert k in truth[1], k
        t, p = float(truth[1][k]), float(pipe[1][k])
        # metrics are means of per-token values: no worse than 2x torch's own pipeline at this dtype; a clip
        # fraction may differ by the tokens that sit on a clip boundary within the dtype's rounding
        tol = max(1e-4 * (1 + abs(t)), 2 * abs(p - t), (2 / n_tok if k.startswith("clip_frac") and dtype != torch.float32 else 0))
        assert abs(float(v) - t) <= tol, (k, float(v), t, p)
    return ours


BASE = GRPOLossConfig(temperature=0.8, eps_low=0.2, eps_high=0.28, beta=0.04, chunk_size=8,
                      max_completion_length=16, compute_entropy=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,importance,kl", list(itertools.product(
    ("grpo", "bnpo", "dr_grpo", "dapo"), ("token", "sequence"), ("k1", "k2", "k3"))))
def test_matrix_against_float64(backend, loss_type, importance, kl):
    b = make_batch(seed=LOSS_TYPES.index(loss_type) * 100 + ("token", "sequence").index(importance) * 10 + int(kl[1]))
    cfg = BASE.replace(loss_type=loss_type, importance_sampling=importance, kl_estimator=kl, backend=backend)
    check(b, cfg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_mode", ["fast", "low_memory"])
@pytest.mark.parametrize("variant", ["plain", "no_old", "no_ref", "delta", "token_tis", "seq_tis", "seq_tis_no_old",
                                     "frozen", "fp32_logits", "num_global", "chunk1", "big_chunk"])
def test_options_against_float64(backend, memory_mode, variant):
    b = make_batch(seed=11)
    cfg = BASE.replace(backend=backend, memory_mode=memory_mode)
    over, frozen = {}, False
    if variant == "no_old":
        over["old_logp"] = None
    elif variant == "no_ref":
        cfg, over["ref_logp"] = cfg.replace(beta=0.0), None
    elif variant == "delta":
        cfg = cfg.replace(delta=1.2)
    elif variant == "token_tis":
        cfg = cfg.replace(gen_correction="token_truncate", gen_correction_cap=1.1)
    elif variant == "seq_tis":
        cfg = cfg.replace(gen_correction="sequence_truncate", gen_correction_cap=1.5)
    elif variant == "seq_tis_no_old":
        cfg, over["old_logp"] = cfg.replace(gen_correction="sequence_truncate", gen_correction_cap=1.5), None
    elif variant == "frozen":
        frozen = True
    elif variant == "fp32_logits":
        cfg = cfg.replace(fp32_logits=True)
    elif variant == "num_global":
        over["num_global_tokens"] = 97
    elif variant == "chunk1":
        cfg = cfg.replace(chunk_size=1)
    elif variant == "big_chunk":
        cfg = cfg.replace(chunk_size=None)
    check(b, cfg, frozen=frozen, **over)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_low_precision_inputs(backend, dtype, importance):
    b = make_batch(N=53, H=16, V=517, S=5, dtype=dtype, seed=5)
    ours = check(b, BASE.replace(backend=backend, importance_sampling=importance), dtype=dtype)
    assert ours[2].dtype == dtype and ours[3].dtype == dtype and ours[0].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_micro_batches_sum_to_the_global_batch(backend):
    # dapo with num_global_tokens: two micro-batches give the loss and gradients of the whole batch
    b = make_batch(N=40, S=4, seed=3, empty_seq=False)
    cfg = BASE.replace(backend=backend, loss_type="dapo")
    active = b["loss_mask"] & (b["targets"] != -100)
    n_glob = int(active.sum())
    full = run(fused_linear_grpo_loss, b, cfg, num_global_tokens=n_glob)
    half = (b["seq_ids"] < 2)
    parts = []
    for sel in (half, ~half):
        sub = {k: (v[sel] if (isinstance(v, torch.Tensor) and v.shape[:1] == (40,)) else v) for k, v in b.items()}
        sub["seq_ids"] = sub["seq_ids"] - (0 if sel is half else 2)
        sub["advantages"] = b["advantages"][:2] if sel is half else b["advantages"][2:]
        parts.append(run(fused_linear_grpo_loss, sub, cfg, num_global_tokens=n_glob))
    assert torch.allclose(parts[0][0] + parts[1][0], full[0], rtol=1e-5, atol=1e-7)
    assert torch.allclose(parts[0][3] + parts[1][3], full[3], rtol=1e-4, atol=1e-7)
    gh = torch.zeros_like(full[2])
    gh[half], gh[~half] = parts[0][2], parts[1][2]
    assert torch.allclose(gh, full[2], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_masked_in_gives_zero_loss_and_zero_grads(backend):
    b = make_batch(seed=2)
    b["loss_mask"] = torch.zeros_like(b["loss_mask"])
    loss, metrics, gh, gw = run(fused_linear_grpo_loss, b, BASE.replace(backend=backend))
    assert float(loss) == 0 and float(metrics["num_tokens"]) == 0
    assert torch.all(gh == 0) and torch.all(gw == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmasked_rows_get_no_gradient(backend):
    b = make_batch(seed=4)
    _, _, gh, _ = run(fused_linear_grpo_loss, b, BASE.replace(backend=backend))
    inactive = ~(b["loss_mask"] & (b["targets"] != -100))
    assert torch.all(gh[inactive] == 0) and gh[~inactive].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_hidden_gives_nan_loss(backend):
    b = make_batch(seed=6)
    row = int((b["loss_mask"] & (b["targets"] != -100)).nonzero()[0, 0])
    b["hidden"][row, 0] = float("nan")
    loss, _ = fused_linear_grpo_loss(b["hidden"], b["weight"], b["targets"], b["seq_ids"], b["advantages"],
                                     b["loss_mask"], BASE.replace(backend=backend), old_logp=b["old_logp"],
                                     ref_logp=b["ref_logp"])
    assert torch.isnan(loss)


def test_no_grad_call_returns_the_same_loss():
    b = make_batch(seed=8)
    kw = {k: b[k] for k in ("old_logp", "ref_logp")}
    args = [b[k] for k in ("hidden", "weight", "targets", "seq_ids", "advantages", "loss_mask")]
    with torch.no_grad():
        l0, _ = fused_linear_grpo_loss(*args, BASE.replace(backend="triton"), **kw)
    l1, _ = fused_linear_grpo_loss(*args, BASE.replace(backend="torch"), **kw)
    assert torch.allclose(l0, l1, rtol=1e-5)
