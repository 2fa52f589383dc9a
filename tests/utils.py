"""What the tests share (as Liger-Kernel's test/utils.py): the device, the kernel backends every kernel test runs on,
the error measures (relative L2 error against a float64 ground truth, and the tolerance rule of docs/kernels.md,
Precision: no worse than 2x torch's own low-precision pipeline, with a per-dtype floor that a wrong formula, index or
scale exceeds by orders of magnitude), random inputs, targets with ignored positions, small Triton blocks, the
Explanatory-Inversion data of the trainer tests, and the trainer's own log-probs of a sequence."""
import os

import pytest
import torch
from exgrpo_kernels import _native, fused_linear_logprobs, pack_sequences

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")

# every kernel test runs on each backend: Triton (the interpreter on the CPU), the torch twin, and the C++ CPU kernels
# (csrc/) where built; tests/test_native.py fails if they should have been built and were not
NATIVE = pytest.param("native", marks=pytest.mark.skipif(
    DEVICE.type != "cpu" or not _native.AVAILABLE,
    reason=f"the native backend runs CPU tensors and needs exgrpo_kernels._C ({_native.WHY_NOT})"))
BACKENDS = ["triton", "torch", NATIVE]

FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    assert not torch.isnan(x).any(), "NaN in kernel output (unwritten or poisoned element)"
    return float((x - ref).norm() / ref.norm().clamp(min=1e-30))


def tolerance(dtype: torch.dtype, pipeline_err: float) -> float:
    return max(2.0 * pipeline_err, FLOOR[dtype])


def make_inputs(N, H, V, dtype, seed=0, device=DEVICE, logit_std=3.0):
    """hidden [N, H], weight [V, H] in dtype with logits of standard deviation about logit_std."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (logit_std / H ** 0.5)
    return hidden.to(dtype).to(device), weight.to(dtype).to(device)


def _value_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype, except that an fp32 tensor on the CPU whose every value is a bf16 number counts as bf16: CPU
    torch has no bf16 x bf16 -> fp32 GEMM, so the kernels widen bf16 operands to fp32 for fp32 accumulation
    there (the same products and sums as CUDA's bf16 GEMM with an fp32 output)."""
    if x.dtype == torch.float32 and not x.is_cuda and torch.equal(x, x.bfloat16().float()):
        return torch.bfloat16
    return x.dtype


class GemmRecorder:
    """Records every matrix product of a computation, forward and backward: (op, operand shapes, operand value
    dtypes (see _value_dtype)). Products inside this project's custom ops (exgrpo::*, opaque to a dispatch mode)
    are recorded where the kernels issue them (their ``mm`` / ``addmm_fp32_``); every other aten product is
    recorded by a dispatch mode, so a [tokens x vocab] product anywhere else shows up too.
    ``vocab_gemms(V)`` keeps the ones with a dimension of size V; ``matmul_units(n, H, V)`` is their FLOPs over
    one [n, H] x [H, V] product."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        rec = self
        self.calls = []
        aten = torch.ops.aten
        packets = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
                if func.overloadpacket in packets and len(mats) >= 2:  # batched (3-D) products: not vocabulary GEMMs
                    rec._add(str(func), mats[-2], mats[-1])
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._patches = []

    def _add(self, name, a, b):
        self.calls.append((name, tuple(a.shape), tuple(b.shape), _value_dtype(a), _value_dtype(b)))

    def __enter__(self):
        import exgrpo_kernels._rows as rows_mod
        import exgrpo_kernels.grpo_loss.ops as grpo_mod
        for mod in (rows_mod, grpo_mod):
            for name in ("mm", "addmm_fp32_"):
                orig = getattr(mod, name)

                def wrapped(*args, _orig=orig, _name=name, **kw):
                    a, b = args[-2], args[-1]
                    self._add(f"exgrpo:{_name}", a, b)
                    return _orig(*args, **kw)
                self._patches.append((mod, name, orig))
                setattr(mod, name, wrapped)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mod, name, orig in self._patches:
            setattr(mod, name, orig)
        self._patches.clear()
        return self._mode.__exit__(*exc)

    def vocab_gemms(self, V):
        return [c for c in self.calls if V in c[1] or V in c[2]]

    def matmul_units(self, n, H, V):
        tot = 0
        for _, sa, sb, _, _ in self.vocab_gemms(V):
            tot += sa[0] * sa[1] * sb[1]
        return tot / (n * H * V)


def targets(N: int, V: int, seed: int, ignore_every: int = 6, last_at: int | None = None) -> torch.Tensor:
    """[N] int64 targets on DEVICE: random ids, -100 (no target) at every ``ignore_every``-th position, and the last
    vocabulary column at ``last_at`` (None: nowhere in particular)."""
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed))
    t[::ignore_every] = -100
    if last_at is not None:
        t[last_at] = V - 1
    return t.to(DEVICE)


def use_small_blocks(monkeypatch, block_v: int) -> None:
    """Cap the Triton row kernels' BLOCK_V so that small test vocabularies span several blocks (the online
    log-sum-exp then crosses block borders)."""
    import exgrpo_kernels._rows as rows
    monkeypatch.setattr(rows, "MAX_BLOCK_V", block_v)


def ei_data(tmp_path_factory, name: str = "ei", **kw) -> str:
    """d_ei.jsonl of the built-in arithmetic domain (symbolic teacher), for the trainer tests; ``kw``: EIConfig fields
    (limit, rules_per_example, arith_ops, ...)."""
    from exgrpo.config import EIConfig
    from exgrpo.ei.pipeline import run_ei
    out = tmp_path_factory.mktemp(name)
    run_ei(EIConfig(out_dir=str(out), **kw), progress=False)
    return str(out / "d_ei.jsonl")


def trainer_logprobs(model, seq, temperature: float = 1.0) -> torch.Tensor:
    """The trainer's log-probs of one token sequence ([T - 1]: position t predicts token t + 1), no grad."""
    from exgrpo.model import PolicyHidden
    b = pack_sequences([torch.tensor(seq)])
    p = PolicyHidden(model)
    with torch.no_grad():
        return fused_linear_logprobs(p(b), p.lm_head_weight, b.targets, temperature=temperature)
