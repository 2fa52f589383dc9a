"""The trainer's CUDA code path (on a GPU: the same tests run on CUDA). On the CPU: the real SFT step, GRPO step
with the auxiliary loss, and the
old-log-prob pass of ``updates_per_batch > 1`` run through ``exgrpo.steps`` with the Triton kernels (interpreter,
forced with ``$EXGRPO_KERNEL_BACKEND=triton``), the torch kernels, and a plain full-logits torch implementation
of the same step; every parameter gradient must agree. Also: bf16 autocast through the trainer gives bf16
vocabulary GEMMs and fp32 gradients, and the process group serves CPU scalars in the CUDA layout."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from exgrpo_kernels import GRPOLossConfig, _native, grpo_loss_reference, logprobs_reference, nll_loss_reference

from exgrpo.config import ModelConfig
from exgrpo.model import PolicyHidden, build_student
from exgrpo.steps import GRPOInputs, StepContext, autocast_dtype, grpo_update, policy_logprobs, sft_backward
from tests.utils import BACKENDS, DEVICE, GemmRecorder, rel_err, use_small_blocks

TINY = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2)
V = 259  # the byte tokenizer's vocabulary


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    use_small_blocks(monkeypatch, 64)  # V = 259 spans 5 blocks


# the trainer's steps on each backend: triton (forced as CI forces it), the torch twin, the C++ CPU kernels where built
STEP_BACKENDS = ("triton", "torch") + (("native",) if (_native.AVAILABLE and DEVICE.type == "cpu") else ())


def _seqs(S, seed, lo=5, hi=18):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 255, (int(n),), generator=g) for n in torch.randint(lo, hi, (S,), generator=g)]
    masks = [torch.rand(len(x), generator=g) > 0.3 for x in ids]
    return list(zip(ids, masks)), g


def _ctx(model, backend, monkeypatch, precision="fp32", tokens=40, ref=None):
    policy = PolicyHidden(model).train()
    if backend == "triton":  # the environment switch, as CI would set it for a whole run
        monkeypatch.setenv("EXGRPO_KERNEL_BACKEND", "triton")
        kb = "auto"
    else:
        monkeypatch.delenv("EXGRPO_KERNEL_BACKEND", raising=False)
        kb = backend
    return StepContext(policy=policy, module=policy, device=DEVICE, autocast_dtype=autocast_dtype(precision, DEVICE),
                       kernel_backend=kb, micro_batch_tokens=tokens, ref=ref)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _hidden_per_sequence(model, ids):
    """The model's own forward of one sequence (no packing, plain SDPA): last hidden states [T, H]."""
    from exgrpo.attention import IMPL
    model.set_attn_implementation("sdpa")
    try:
        return model.model(input_ids=ids[None].to(DEVICE)).last_hidden_state[0]
    finally:
        model.set_attn_implementation(IMPL)


def _plain_batch(model, seqs):
    """Concatenated hidden states, next-token targets, loss positions, sequence ids of seqs, sequence by sequence."""
    hs, tg, lm, sid = [], [], [], []
    for i, (ids, mask) in enumerate(seqs):
        hs.append(_hidden_per_sequence(model, ids))
        tg.append(torch.cat([ids[1:], ids.new_tensor([-100])]).to(DEVICE))
        lm.append(torch.cat([mask[1:], mask.new_zeros(1)]).to(DEVICE))
        sid.append(torch.full((len(ids),), i, device=DEVICE))
    return torch.cat(hs), torch.cat(tg), torch.cat(lm), torch.cat(sid)


def _compare(got, want, tol, what):
    assert set(got) == set(want), what
    for n in want:
        err = rel_err(got[n], want[n])
        assert err < tol, f"{what}: {n} relative error {err:.2e}"


def test_sft_step_triton_equals_torch_and_full_logits(monkeypatch):
    seqs, _ = _seqs(7, 0)
    out = {}
    for backend in STEP_BACKENDS:
        model, _ = build_student(TINY, seed=0, device=DEVICE)
        stats = sft_backward(_ctx(model, backend, monkeypatch), seqs)
        assert stats.finite
        out[backend] = _grads(model)
    model, _ = build_student(TINY, seed=0, device=DEVICE)
    h, t, lm, _ = _plain_batch(model, seqs)
    n = sum(int(m[1:].sum()) for _, m in seqs)
    nll_loss_reference(h, model.lm_head.weight, torch.where(lm, t, -100), num_global_tokens=n).backward()
    plain = _grads(model)
    assert len(plain) == len(list(model.parameters()))
    for b in STEP_BACKENDS[1:]:
        _compare(out["triton"], out[b], 1e-5, f"sft triton vs {b}")
    _compare(out["triton"], plain, 1e-4, "sft triton vs full logits")


def _grpo_step(model, backend, monkeypatch, seqs, adv, gen, aux, cfg, updates=1, ref_model=None):
    """grpo_update through the trainer's code; the optimizer step records the gradients, then applies SGD."""
    ref = PolicyHidden(ref_model).eval() if ref_model is not None else None
    ctx = _ctx(model, backend, monkeypatch, ref=ref)
    x = GRPOInputs(seqs=seqs, advantages=adv, gen_logp=gen)
    if ref is not None:
        x.ref_logp = policy_logprobs(ctx, ref, seqs, cfg.temperature)
    seen = []

    def step(ok):
        seen.append(_grads(model))
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
                    p.grad = None
        return True, 0.0
    res = grpo_update(ctx, x, aux, cfg, step, aux_weight=0.1, updates=updates)
    return res, seen, x


@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_grpo_step_with_aux_triton_equals_torch_and_full_logits(monkeypatch, importance):
    seqs, g = _seqs(6, 1)
    aux, _ = _seqs(3, 2)
    adv = torch.randn(6, generator=g)
    gen = [-torch.rand(len(s[0]), generator=g) for s in seqs]
    cfg = GRPOLossConfig(loss_type="dapo", beta=0.04, temperature=0.9, importance_sampling=importance,
                         compute_entropy=True)
    out = {}
    for backend in STEP_BACKENDS:
        model, _ = build_student(TINY, seed=0, device=DEVICE)
        ref_model, _ = build_student(TINY, seed=5, device=DEVICE)
        res, seen, _ = _grpo_step(model, backend, monkeypatch, seqs, adv, gen, aux, cfg, ref_model=ref_model)
        out[backend] = (res, seen[0])
    for b in STEP_BACKENDS[1:]:
        _compare(out["triton"][1], out[b][1], 1e-5, f"grpo+aux triton vs {b}")
        assert out["triton"][0].loss == pytest.approx(out[b][0].loss, rel=1e-5)
        for k, v in out[b][0].metrics.items():
            assert out["triton"][0].metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (b, k)
    # the plain implementation: full logits, per sequence, the reference formulas
    model, _ = build_student(TINY, seed=0, device=DEVICE)
    ref_model, _ = build_student(TINY, seed=5, device=DEVICE)
    h, t, lm, sid = _plain_batch(model, seqs)
    with torch.no_grad():
        hr, _, _, _ = _plain_batch(ref_model, seqs)
        ref_lp = logprobs_reference(hr, ref_model.lm_head.weight, t, temperature=0.9)
    n = sum(int(m[1:].sum()) for _, m in seqs)
    gen_tok = torch.cat([torch.cat([x[1:], x.new_zeros(1)]) for x in gen]).to(DEVICE)
    loss, _ = grpo_loss_reference(h, model.lm_head.weight, t, sid, adv.to(DEVICE), lm, cfg, ref_logp=ref_lp, gen_logp=gen_tok,
                                  num_global_tokens=n)
    ha, ta, la, _ = _plain_batch(model, aux)
    n_aux = sum(int(m[1:].sum()) for _, m in aux)
    (loss + 0.1 * nll_loss_reference(ha, model.lm_head.weight, torch.where(la, ta, -100), num_global_tokens=n_aux)).backward()
    _compare(out["triton"][1], _grads(model), 1e-4, "grpo+aux triton vs full logits")
    assert out["triton"][0].loss == pytest.approx(float(loss), rel=1e-4)


def test_old_logprob_pass_of_two_updates(monkeypatch):
    seqs, g = _seqs(5, 3)
    adv = torch.randn(5, generator=g)
    gen = [-torch.rand(len(s[0]), generator=g) for s in seqs]
    cfg = GRPOLossConfig(loss_type="grpo", beta=0.0, temperature=0.8, eps_low=0.1, eps_high=0.1)
    out = {}
    for backend in STEP_BACKENDS:
        model, _ = build_student(TINY, seed=0, device=DEVICE)
        res, seen, x = _grpo_step(model, backend, monkeypatch, seqs, adv, gen, [], cfg, updates=2)
        assert len(seen) == 2 and x.old_logp is not None
        out[backend] = (seen, x.old_logp, res)
    for be in STEP_BACKENDS[1:]:
        for a, b in zip(out["triton"][1], out[be][1]):
            assert torch.allclose(a, b, atol=1e-5)
        for i in range(2):
            _compare(out["triton"][0][i], out[be][0][i], 1e-5, f"update {i} triton vs {be}")
    # old log-probs equal the plain model's log-probs of each token; the second update's gradient is that of the
    # clipped loss at the moved weights with those old log-probs (full-logits reference)
    model, _ = build_student(TINY, seed=0, device=DEVICE)
    with torch.no_grad():
        for (ids, _), old in zip(seqs, out["triton"][1]):
            lp = logprobs_reference(_hidden_per_sequence(model, ids), model.lm_head.weight,
                                    torch.cat([ids[1:], ids.new_tensor([-100])]).to(DEVICE), temperature=0.8)
            assert torch.allclose(old, torch.cat([lp.new_zeros(1), lp[:-1]]).cpu(), atol=1e-5)
    h, t, lm, sid = _plain_batch(model, seqs)
    old_tok = torch.cat([torch.cat([o[1:], o.new_zeros(1)]) for o in out["triton"][1]]).to(DEVICE)
    adv = adv.to(DEVICE)
    loss, _ = grpo_loss_reference(h, model.lm_head.weight, t, sid, adv, lm, cfg, old_logp=old_tok)
    loss.backward()
    _compare(out["triton"][0][0], _grads(model), 1e-4, "update 0 vs full logits")
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
            p.grad = None
    h, t, lm, sid = _plain_batch(model, seqs)
    loss, _ = grpo_loss_reference(h, model.lm_head.weight, t, sid, adv, lm, cfg, old_logp=old_tok)
    loss.backward()
    assert float(out["triton"][2].metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-5)  # metrics of update 0
    _compare(out["triton"][0][1], _grads(model), 1e-4, "update 1 vs full logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_through_the_trainer(monkeypatch, backend):
    """precision=bf16 (what 'auto' does on CUDA) on an fp32 student: the vocabulary GEMMs receive bf16, the
    parameters' gradients are fp32; for SFT and for a GRPO step."""
    seqs, g = _seqs(4, 7)
    model, _ = build_student(TINY, seed=0, device=DEVICE)
    ctx = _ctx(model, backend, monkeypatch, precision="bf16")
    with GemmRecorder() as rec:
        sft_backward(ctx, seqs)
    dts = {d for c in rec.vocab_gemms(V) for d in (c[3], c[4])}
    assert dts == {torch.bfloat16}, dts
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    model.zero_grad()
    x = GRPOInputs(seqs=seqs, advantages=torch.randn(4, generator=g), gen_logp=[torch.zeros(len(s[0])) for s in seqs])
    with GemmRecorder() as rec:
        grpo_update(ctx, x, [], GRPOLossConfig(beta=0.0), lambda ok: (True, 0.0))
    assert {d for c in rec.vocab_gemms(V) for d in (c[3], c[4])} == {torch.bfloat16}
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU stand-in; bench/device_check.sh runs NCCL itself")
def test_process_group_serves_cpu_scalars_in_the_cuda_layout(tmp_path):
    """The trainer's scalar collectives (all_sum / all_max / all_gather_object on CPU values) through a process
    group created with a backend per device type, as on CUDA (there: cpu:gloo,cuda:nccl; here NCCL is not built,
    so gloo stands in on the cuda side). A CUDA-only group (the old 'nccl') would fail on these CPU tensors."""
    from exgrpo import distributed
    assert distributed.backend_for("cuda") == "cpu:gloo,cuda:nccl" and distributed.backend_for("cpu") == "cpu:gloo"
    script = tmp_path / "pg.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        import torch, torch.distributed as dist
        from exgrpo import distributed
        rank, world, device = distributed.init()
        assert dist.get_backend() != "nccl"
        from torch.distributed.distributed_c10d import _get_default_group
        assert _get_default_group()._get_backend(torch.device("cpu")) is not None
        s = distributed.all_sum(rank + 1)
        m = distributed.all_max(float(rank) * 2.5)
        objs = distributed.all_gather_object({{"rank": rank}})
        assert s == 3 and m == 2.5 and [o["rank"] for o in objs] == [0, 1], (s, m, objs)
        open({str(tmp_path)!r} + f"/ok{{rank}}", "w").write("ok")
        distributed.close()
    """))
    env = dict(os.environ, EXGRPO_DIST_BACKEND="cpu:gloo,cuda:gloo", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
