"""The native CPU backend (csrc/, exgrpo_kernels._C): built when it should be, its schemas equal the Python
contract, each op equal to its torch twin on random inputs (odd shapes, several dtypes, every option), thread-count
invariant, clear errors. The public functions on backend="native" are checked against float64 by the kernel tests
(tests/utils.py BACKENDS)."""
import os
import subprocess
import sys

import pytest
import torch
from exgrpo_kernels import _native, fused_linear_grpo_loss
from exgrpo_kernels._rows import LogitTransform, _grad_torch, _stats_torch
from exgrpo_kernels._utils import resolve_backend
from exgrpo_kernels.grpo_loss.rows import token_rows_twin as _token_rows_twin
from exgrpo_kernels.nll_loss import _stats_grad_twin
from exgrpo_kernels.packing import _pack_twin

HERE = os.path.dirname(os.path.abspath(__file__))
SKIPPED = os.environ.get(_native.NO_NATIVE_ENV) == "1"
needs_native = pytest.mark.skipif(not _native.AVAILABLE, reason=f"native backend not loaded: {_native.WHY_NOT}")
ops = torch.ops.exgrpo_native


def test_extension_was_built_and_serves_the_cpu():
    """Fails where the install should have built exgrpo_kernels._C and did not (or it does not load)."""
    if SKIPPED:
        assert not _native.AVAILABLE and resolve_backend("auto", torch.device("cpu")) == "torch"
        return
    assert _native.AVAILABLE, _native.WHY_NOT
    assert _native.status()["library"].endswith(".so")
    assert resolve_backend("auto", torch.device("cpu")) == "native"


@needs_native
def test_schemas_equal_the_python_contract():
    for name, schema in _native.SCHEMAS.items():
        registered = str(getattr(ops, name).default._schema).replace("exgrpo_native::", "")
        assert registered == str(torch._C.parse_schema(schema)), name


def test_without_the_library_the_twins_serve(tmp_path):
    """$EXGRPO_NO_NATIVE=1: the same ops, defined in Python, with the torch twins on the CPU; auto picks torch."""
    code = ("import torch, exgrpo_kernels as k; from exgrpo_kernels import _native, _utils\n"
            "assert not _native.AVAILABLE and _utils.resolve_backend('auto', torch.device('cpu')) == 'torch'\n"
            "z = torch.randn(3, 11); t = torch.tensor([1, -100, 10])\n"
            "lp, lse, ent = torch.ops.exgrpo_native.row_stats(z, t, 1.0, 1.0, 0.0, True)\n"
            "assert torch.allclose(lse, torch.logsumexp(z, -1)) and lp[1] == 0\n"
            "b = k.pack_sequences([torch.arange(4), torch.arange(3)], backend='auto')\n"
            "assert b.targets.tolist() == [1, 2, 3, -100, 1, 2, -100]\n"
            "print('ok')\n")
    env = dict(os.environ, EXGRPO_NO_NATIVE="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_backend_native_errors_are_clear():
    if not _native.AVAILABLE:
        with pytest.raises(ValueError, match="backend='native'.*not loaded"):
            resolve_backend("native", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend='native' is the C\\+\\+ CPU backend, got a meta tensor"):
        resolve_backend("native", torch.device("meta"))


# ---------------------------------------------------------------------------------------------- op == twin

XFS = [(1.0, 1.0, 0.0), (1 / 0.7, 1.0, 0.0), (1.0, 0.8, 5.0), (1 / 1.3, 1.7, 30.0)]  # (inv_tau, pre, cap)
SHAPES = [(1, 1), (3, 17), (5, 511), (4, 513), (7, 1531)]  # V: 1 column, sub-vector, around the 512 block, odd


def _tile(C, V, dtype, seed, std=4.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(C, V, generator=g) * std).to(dtype)
    t = torch.randint(0, V, (C,), generator=g)
    if C > 2:
        t[1] = -100
    return z, t, g


def _stats64(z, t, xf):
    """float64 (logp, lse, entropy) of the tile z under the transform xf = (inv_tau, pre, cap)."""
    y = z.double() * xf[1]
    if xf[2]:
        y = xf[2] * torch.tanh(y / xf[2])
    ls = torch.log_softmax(y * xf[0], -1)
    logp = torch.where(t != -100, ls.gather(1, t.clamp(min=0)[:, None]).squeeze(1), 0.0)
    return logp, torch.logsumexp(y * xf[0], -1), -(ls.exp() * ls).sum(-1)


def _err(a, b, floor):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=floor))


def _close(a, b, tol, what, floor=None):
    """Relative L2 error; ``floor`` bounds the denominator below: 1 for log-probs, lse, entropy (O(1) values that
    can all be 0, e.g. V = 1), 1e-5 for gradients (a 1-ulp p = 1 +- 6e-8 against an exact 0 at V = 1)."""
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), f"{what}: NaN"
    if floor is None:
        floor = 1e-5 if what.startswith("grad") else 1.0
    err = float((a - b).norm() / b.norm().clamp(min=floor))
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


TOL = {torch.float32: 2e-6, torch.float64: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}  # fp32 math on each


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("xf", XFS)
def test_row_stats_and_grad_equal_the_twin(dtype, shape, xf):
    C, V = shape
    z, t, g = _tile(C, V, dtype, seed=C * 1000 + V)
    ref64 = _stats64(z, t, xf)
    for with_entropy in (False, True):
        got = ops.row_stats(z, t, *xf, with_entropy)
        want = _stats_torch(z, t, LogitTransform(xf[0], xf[1], xf[2] or None), with_entropy)
        for k, name in enumerate(("logp", "lse", "entropy")[:3 if with_entropy else 2]):
            # native within 2x the twin's error against float64; floor: fp32 rounding of O(1..10) values (entropy:
            # lse - E[z'] cancels, an ulp of lse against H ~ 1)
            tol = max(2 * _err(want[k], ref64[k], 1.0), 1e-5 if k == 2 else 2e-6)
            _close(got[k], ref64[k], tol, name)
        assert (got[0][t == -100] == 0).all()
        if not with_entropy:
            assert got[2].numel() == 0
    lse = want[1]
    ent = want[2]
    c_l = torch.randn(C, generator=g)
    c_h = torch.randn(C, generator=g)
    for with_h in (False, True):
        for col0, Vs in ((0, V), (V // 3, V - V // 3)):  # a full row, and a vocabulary slab starting at col0
            zs = z[:, col0:col0 + Vs]
            args = (t, lse, ent if with_h else None, c_l, c_h if with_h else None, *xf, col0)
            out = torch.full(zs.shape, float("nan"), dtype=dtype)  # poison: every element must be written
            ops.row_grad_(zs, *args, out)
            ref = torch.empty(zs.shape, dtype=dtype)
            _grad_torch(zs, t, lse, ent if with_h else None, c_l, c_h if with_h else None,
                        LogitTransform(xf[0], xf[1], xf[2] or None), col0, ref)
            _close(out, ref, 2e-6 if dtype in (torch.float32, torch.float64) else 1e-2, f"grad h={with_h} col0={col0}",
                   floor=1e-5 if V > 1 else 1.0)  # V = 1: the gradient is 0, both within an ulp of it
            inplace = zs.clone()
            ops.row_grad_(inplace, *args, inplace)
            assert torch.equal(inplace, out), "in place differs from out of place"


@needs_native
@pytest.mark.parametrize("zdt,gdt", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
def test_row_grad_writes_a_narrower_buffer(zdt, gdt):
    z, t, g = _tile(6, 700, zdt, seed=3)
    lse = torch.logsumexp(z.float(), -1)
    c_l = torch.randn(6, generator=g)
    out = torch.full(z.shape, float("nan"), dtype=gdt)
    ops.row_grad_(z, t, lse, None, c_l, None, 1.0, 1.0, 0.0, 0, out)
    ref = _grad_torch(z, t, lse, None, c_l, None, LogitTransform(), 0, torch.empty(z.shape, dtype=torch.float32))
    assert torch.equal(out, ref.to(gdt)) or float((out.double() - ref.double()).abs().max()) < 1e-3


@needs_native
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("xf", XFS[:3])
def test_row_stats_grad_equals_the_twin(shape, xf):
    C, V = shape
    z, t, g = _tile(C, V, torch.float32, seed=V)
    t = t.clamp(min=0)  # NLL rows all have targets
    c_l = -torch.rand(C, generator=g)
    a, b = z.clone(), z.clone()
    lp, lse = ops.row_stats_grad_(a, t, c_l, *xf)
    lp2, lse2 = _stats_grad_twin(b, t, c_l, *xf)
    _close(lp, lp2, 2e-6, "logp")
    _close(lse, lse2, 2e-6, "lse")
    _close(a, b, 2e-6, "grad")


POLICY = [  # (eps_low, eps_high, delta, beta, is_cap, kl_est, is_mode, old?, ref?, ext?)
    (0.2, 0.2, 0.0, 0.04, 2.0, 3, 0, True, True, False),
    (0.2, 0.28, 3.0, 0.1, 2.0, 1, 1, True, True, True),
    (0.1, 0.1, 0.0, 0.5, 1.5, 2, 2, False, True, False),
    (0.3, 0.5, 1.5, 0.0, 3.0, 3, 0, True, False, True),
]


@needs_native
@pytest.mark.parametrize("policy", POLICY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("xf", XFS[:3])
def test_grpo_token_rows_equal_the_twin(policy, dtype, xf):
    eps_low, eps_high, delta, beta, is_cap, kl_est, is_mode, has_old, has_ref, has_ext = policy
    C, V, S = 23, 1031, 4
    z, t, g = _tile(C, V, dtype, seed=kl_est * 10 + is_mode)
    t = t.clamp(min=0)
    sid = torch.randint(0, S, (C,), generator=g)
    adv = torch.randn(S, generator=g)
    w_seq = torch.rand(S, generator=g) + 0.1
    lp0 = torch.log_softmax(z.float() * xf[1], -1).gather(1, t[:, None]).squeeze(1)
    old = (lp0 + 0.3 * torch.randn(C, generator=g)) if has_old else None
    ref = (lp0 + 0.3 * torch.randn(C, generator=g)) if has_ref else None
    gen = lp0 + 0.3 * torch.randn(C, generator=g) if is_mode == 1 else None
    seq_isw = torch.rand(S, generator=g) + 0.5 if is_mode == 2 else None
    ext = torch.rand(C, generator=g) + 0.5 if has_ext else None
    for with_entropy in (False, True):
        for grad in (False, True):
            args = (t, sid, adv, w_seq, seq_isw, old, ref, gen, ext, *xf, eps_low, eps_high, delta, beta, is_cap,
                    kl_est, is_mode, with_entropy, grad)
            a, b = z.clone(), z.clone()
            got = ops.grpo_token_rows_(a, *args)
            want = _token_rows_twin(b, *args)
            for name, x, y in zip(("logp", "ratio", "kl", "entropy", "j"), got, want):
                if name == "entropy" and not with_entropy:
                    assert x.numel() == 0
                    continue
                _close(x, y, 1e-5 if name != "kl" else 1e-4, name)
            if grad:
                _close(a, b, 1e-5 if dtype != torch.bfloat16 else 1e-2, "grad")
            else:
                assert torch.equal(a, z), "compute_grad=False must leave the tile alone"


@needs_native
@pytest.mark.parametrize("tok_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("with_mask", [False, True])
def test_pack_equals_the_twin(tok_dtype, with_mask):
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 0, 1, 17, 3, 0, 64, 2])
    N = int(lengths.sum())
    tokens = torch.randint(0, 50000, (N,), generator=g).to(tok_dtype)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu[1:])
    mask = torch.rand(N, generator=g) > 0.4 if with_mask else None
    got = ops.pack(tokens, cu, mask)
    want = _pack_twin(tokens, cu, mask)
    for name, x, y in zip(("ids", "pos", "targets", "seq", "loss_mask"), got, want):
        assert x.dtype == y.dtype and torch.equal(x, y), name


@needs_native
def test_thread_count_does_not_change_a_bit():
    z, t, g = _tile(64, 3001, torch.float32, seed=9)
    c_l = torch.randn(64, generator=g)
    n = torch.get_num_threads()
    outs = []
    try:
        for k in (1, max(2, n)):
            torch.set_num_threads(k)
            a = z.clone()
            lp, lse = ops.row_stats_grad_(a, t.clamp(min=0), c_l, 1.0, 1.0, 0.0)
            outs.append((lp, lse, a))
    finally:
        torch.set_num_threads(n)
    for x, y in zip(*outs):
        assert torch.equal(x, y)


@needs_native
def test_a_nan_logit_poisons_its_row_only():
    z, t, g = _tile(4, 1100, torch.float32, seed=2)
    t = t.clamp(min=0)
    z[2, 700] = float("nan")
    lp, lse, ent = ops.row_stats(z, t, 1.0, 1.0, 0.0, True)
    assert torch.isnan(lse[2]) and torch.isnan(lp[2]) and torch.isnan(ent[2])
    assert not torch.isnan(lse[[0, 1, 3]]).any()
    a = z.clone()
    ops.row_stats_grad_(a, t, torch.ones(4), 1.0, 1.0, 0.0)
    assert torch.isnan(a[2]).all() and not torch.isnan(a[[0, 1, 3]]).any()


@needs_native
def test_bad_inputs_name_the_field():
    z = torch.randn(4, 10)
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="t must be Long, got Int"):
        ops.row_stats(z, t.int(), 1.0, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="t must be a \\[4\\] vector"):
        ops.row_stats(z, t[:3], 1.0, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="contiguous columns"):
        ops.row_stats(z.t(), torch.zeros(10, dtype=torch.long), 1.0, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="sid\\[0\\] = 7 outside \\[0, 2\\)"):
        ops.grpo_token_rows_(z, t, torch.full((4,), 7), torch.zeros(2), torch.ones(2), None, None, None, None, None,
                             1.0, 1.0, 0.0, 0.2, 0.2, 0.0, 0.0, 2.0, 3, 0, False, False)
    with pytest.raises(RuntimeError, match="cu must run from 0 to N = 3"):
        ops.pack(torch.arange(3), torch.tensor([0, 2], dtype=torch.int32), None)


@needs_native
def test_public_loss_native_equals_torch_twin():
    """End to end through fused_linear_grpo_loss: native and the torch twin agree on loss, metrics and grads."""
    from exgrpo_kernels import GRPOLossConfig
    g = torch.Generator().manual_seed(0)
    N, H, V, S = 40, 24, 777, 5
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    t = torch.randint(0, V, (N,), generator=g)
    sid = torch.arange(S).repeat_interleave(N // S)
    mask = torch.rand(N, generator=g) > 0.2
    adv = torch.randn(S, generator=g)
    old = -torch.rand(N, generator=g) * 5
    out = {}
    for be in ("native", "torch"):
        for mode in ("fast", "low_memory"):
            cfg = GRPOLossConfig(backend=be, memory_mode=mode, compute_entropy=True, temperature=0.9)
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            loss, m = fused_linear_grpo_loss(hh, ww, t, sid, adv, mask, cfg, old_logp=old, ref_logp=old + 0.1)
            loss.backward()
            out[be, mode] = (loss.detach(), m["entropy"], hh.grad, ww.grad)
    for mode in ("fast", "low_memory"):
        for x, y in zip(out["native", mode], out["torch", mode]):
            _close(x.reshape(-1), y.reshape(-1), 1e-5, mode)


def _isas_this_cpu_runs() -> list[str]:
    best = _native.status()["isa"]
    return ["base", "avx2", "avx512"][: ["base", "avx2", "avx512"].index(best) + 1]


ISA_CHECK = """
import torch
from exgrpo_kernels import _native
from exgrpo_kernels._rows import LogitTransform, _grad_torch, _stats_torch
from exgrpo_kernels.grpo_loss.rows import token_rows_twin as _token_rows_twin
assert _native.status()["isa"] == "{isa}", _native.status()
ops = torch.ops.exgrpo_native
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    for V in (1, 15, 17, 513, 1531):
        z = (torch.randn(37, V, generator=g) * 3).to(dt)
        t = torch.randint(0, V, (37,), generator=g); t[::5] = -100
        xf = LogitTransform(1 / 0.7, 1.3, 30.0)
        lp, lse, ent = ops.row_stats(z, t, *xf.args, True)
        lp2, lse2, ent2 = _stats_torch(z, t, xf, True)
        for a, b in ((lp, lp2), (lse, lse2), (ent, ent2)):
            assert torch.allclose(a, b, atol=2e-5, rtol=2e-5), (dt, V, (a - b).abs().max())
        c = torch.randn(37, generator=g)
        out, want = torch.full_like(z, float("nan")), torch.full_like(z, float("nan"))
        ops.row_grad_(z, t, lse, ent, c, c * 0.5, *xf.args, 0, out)
        _grad_torch(z, t, lse, ent, c, c * 0.5, xf, 0, want)
        tol = 2e-5 if dt == torch.float32 else 1e-2
        assert not out.isnan().any() and torch.allclose(out.float(), want.float(), atol=tol), (dt, V)
        sid = torch.zeros(37, dtype=torch.long); adv = torch.tensor([0.7]); w = torch.full((1,), 1 / 37)
        t = t.clamp(min=0)  # the token rows see the loss's active rows only
        ref = _stats_torch(z, t, xf, False)[0] - 0.1
        za, zb = z.clone(), z.clone()
        a = ops.grpo_token_rows_(za, t, sid, adv, w, None, None, ref, None, None, *xf.args, 0.2, 0.28, 0.0, 0.04,
                                 2.0, 3, 0, True, True)
        b = _token_rows_twin(zb, t, sid, adv, w, None, None, ref, None, None, *xf.args, 0.2, 0.28, 0.0, 0.04, 2.0,
                             3, 0, True, True)
        for x, y in zip(a, b):
            assert torch.allclose(x, y, atol=2e-5, rtol=2e-5), (dt, V)
        assert torch.allclose(za.float(), zb.float(), atol=tol), (dt, V)
print("ok {isa}")
"""


@needs_native
@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_every_instruction_set_equals_the_twin(isa, tmp_path):
    """The row kernels are compiled for AVX-512, AVX2 and the x86-64 baseline; each one this CPU can run, forced with
    $EXGRPO_NATIVE_ISA, equals the torch twin (statistics, gradients, the GRPO token rows); one it cannot run is
    refused with a clear error, not executed."""
    runs = isa in _isas_this_cpu_runs()
    env = dict(os.environ, EXGRPO_NATIVE_ISA=isa, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", ISA_CHECK.replace("{isa}", isa)], env=env, capture_output=True,
                       text=True, cwd=tmp_path, timeout=300)
    if runs:
        assert r.returncode == 0 and r.stdout.strip() == f"ok {isa}", r.stderr[-3000:]
    else:
        assert r.returncode != 0 and f"EXGRPO_NATIVE_ISA={isa}: this CPU supports up to" in r.stderr, r.stderr[-2000:]


@needs_native
def test_the_default_build_is_portable_and_picks_the_best_isa():
    """No -march=native by default: the library itself is baseline x86-64; the ISA chosen is the CPU's best."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    want = "avx512" if all(f in flags for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl")) else \
        "avx2" if ("avx2" in flags and "fma" in flags) else "base"
    assert _native.status()["isa"] == want
    cmake = open(os.path.join(HERE, "..", "CMakeLists.txt")).read()
    assert 'option(EXGRPO_NATIVE_ARCH "compile for this machine\'s vector unit only (-march=native)" OFF)' in cmake
