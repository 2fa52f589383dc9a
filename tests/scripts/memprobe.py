"""Peak tensor memory of two SFT steps of a built student on the CPU (argv: hidden layers intermediate tokens
checkpointing precision): what `exgrpo plan` predicts. The peak is counted exactly, not read from the process's
RSS (which depends on the allocator's arenas and varies run to run): a dispatch mode sees every tensor an op
creates, adds its storage's bytes once, and subtracts them when the storage is freed, as a GPU's caching
allocator would see the live bytes (its fragmentation is the planner's slack term)."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from exgrpo.config import ModelConfig, OptimConfig  # noqa: E402
from exgrpo.metrics import LiveTensorBytes  # noqa: E402
from exgrpo.model import PolicyHidden, build_student  # noqa: E402
from exgrpo.optim import make_optimizer  # noqa: E402
from exgrpo.steps import StepContext, nll_micro_loss  # noqa: E402


def main(H, L, inter, T, ckpt, precision):
    torch.set_num_threads(1)
    mc = ModelConfig(hidden_size=H, intermediate_size=inter, num_layers=L, head_dim=64, gradient_checkpointing=ckpt)
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(0, 255, (512,), generator=g), torch.ones(512, dtype=torch.bool)) for _ in range(T // 512)]
    mem = LiveTensorBytes()
    with mem:
        model, tok = build_student(mc)
        p = PolicyHidden(model).train()
        ctx = StepContext(policy=p, module=p, device=torch.device("cpu"), micro_batch_tokens=T,
                          autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
        opt, _ = make_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0), 10)
        for _ in range(2):  # the second step has AdamW's moments
            loss, _ = nll_micro_loss(ctx, seqs, T)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    print(json.dumps({"measured_gib": mem.peak / 2 ** 30, "vocab": len(tok)}))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), int(a[2]), int(a[3]), a[4] == "1", a[5] if len(a) > 5 else "fp32")
