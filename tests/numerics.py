"""Error measures shared by the kernel tests: relative L2 error against a float64 ground truth, and the
tolerance rule of TARGETS.md (no worse than 2x torch's own low-precision pipeline, with a per-dtype floor
that a wrong formula, index or scale exceeds by orders of magnitude)."""
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

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
