"""Peak host memory of two SFT steps of a built student (argv: hidden layers intermediate tokens checkpointing),
measured as the growth of the max RSS over the process after imports: what exgrpo plan predicts for the CPU."""
import gc
import json
import os
import resource
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from exgrpo.model import ModelConfig, PolicyHidden, build_student  # noqa: E402
from exgrpo.steps import StepContext, nll_loss  # noqa: E402
from exgrpo.trainer import OptimConfig, make_optimizer  # noqa: E402


def rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * 4096


def main(H, L, inter, T, ckpt):
    torch.set_num_threads(1)
    mc = ModelConfig(hidden_size=H, intermediate_size=inter, num_layers=L, head_dim=64, gradient_checkpointing=ckpt)
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(0, 255, (512,), generator=g), torch.ones(512, dtype=torch.bool)) for _ in range(T // 512)]
    gc.collect()
    base = max(rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    model, tok = build_student(mc)
    p = PolicyHidden(model).train()
    ctx = StepContext(policy=p, module=p, device=torch.device("cpu"), micro_batch_tokens=T)
    opt, _ = make_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0), 10)
    for _ in range(2):
        loss, _ = nll_loss(ctx, seqs, T)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"measured_gib": (peak - base) / 2 ** 30, "vocab": len(tok)}))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), int(a[2]), int(a[3]), a[4] == "1")
