"""Run under torchrun (or alone): SFT steps and one GRPO update on fixed global batches with parallel=<ddp|fsdp2>;
rank 0 writes the losses, the final weights and the generator's weight stream (``merged_state``) to OUT/result.pt.
argv: data out parallel tie lora [memory], memory:
"ckpt" (gradient checkpointing) or "offload" (checkpointing + activation offloading, host copies forced on the CPU)."""
import json
import os
import sys
import weakref

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from exgrpo import distributed  # noqa: E402
from exgrpo.checkpoint import full_state_dict  # noqa: E402
from exgrpo.config import ModelConfig, OptimConfig, SFTConfig, TrainConfig  # noqa: E402
from exgrpo.model import PolicyHidden, build_student, merged_state  # noqa: E402
from exgrpo.optim import NonFiniteGuard, make_optimizer, optimizer_step  # noqa: E402
from exgrpo.rollouts import RolloutBatch  # noqa: E402
from exgrpo.sft import sft  # noqa: E402
from exgrpo.steps import grpo_update, step_context  # noqa: E402


def main(data, out, par, tie, lora, memory=""):
    torch.set_num_threads(1)
    mc = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, tie_embeddings=tie == "1",
                     lora_rank=4 if lora == "1" else 0, lora_alpha=8, gradient_checkpointing=memory in ("ckpt", "offload"),
                     activation_offload=memory == "offload")
    if memory == "offload":  # on the CPU the saved tensors would stay in place: copy them, as on CUDA
        import functools

        from exgrpo import steps
        from exgrpo.offload import OffloadActivations
        steps.OffloadActivations = functools.partial(OffloadActivations, min_bytes=0, copy_host_tensors=True)
    r = sft(SFTConfig(data=data, model=mc, out_dir=os.path.join(out, "sft"), max_steps=3, batch_dialogues=6,
                      micro_batch_tokens=700, progress=False, parallel=par, optim=OptimConfig(lr=1e-2, warmup_steps=0)))
    rank, world, device = distributed.init()
    # a GRPO update of a fixed global batch, each rank holding its slice (as after its own rollouts)
    model, tok = build_student(mc, seed=0)
    g = torch.Generator().manual_seed(0)
    S = 8
    ids = [torch.randint(0, 255, (int(n),), generator=g) for n in torch.randint(6, 30, (S,), generator=g)]
    mask = [torch.rand(len(x), generator=g) > 0.3 for x in ids]
    gen = [-torch.rand(len(x), generator=g) for x in ids]
    adv = torch.randn(S, generator=g)
    mine = list(range(S))[rank::world]
    batch = RolloutBatch([ids[i] for i in mine], [mask[i] for i in mine], [gen[i] for i in mine], adv[mine])
    cfg = TrainConfig(init=None, model=mc, G=2, k=2, k_partial=1, micro_batch_tokens=40, parallel=par,
                      optim=OptimConfig(lr=1e-2, warmup_steps=0))
    policy = PolicyHidden(model).train()
    ctx = step_context(cfg, policy, device)
    opt, sched = make_optimizer(model, cfg.optim, 10)
    m = grpo_update(ctx, batch.inputs(), [], cfg.loss.replace(beta=0.0),
                    lambda ok: optimizer_step(model, opt, sched, cfg.optim, ok, NonFiniteGuard(5))).record()
    weights = full_state_dict(model) if par == "fsdp2" else {k: v.detach().clone() for k, v in model.state_dict().items()}
    # the generator's weight stream (what a colocated vLLM's sync reads): names, merged values, and the bytes of
    # earlier yielded tensors still alive when the next one is drawn (FSDP2: each is a fresh gather; none should be)
    stream, held, alive = [], 0, []
    for name, t in merged_state(model):
        held = max(held, sum(r().numel() * r().element_size() for r in alive if r() is not None))
        alive.append(weakref.ref(t))
        stream.append((name, t.clone()))
        del t
    if distributed.is_main():
        rows = [json.loads(x) for x in open(os.path.join(out, "sft", "metrics.jsonl"))]
        sft_losses = [x["loss"] for x in rows]
        torch.save({"sft_final": r["final"], "grpo_loss": m["loss"], "sft_losses": sft_losses,
                    "offload_tensors": [x.get("offload_tensors", 0) for x in rows],
                    "grpo_weights": {k: v.detach().clone() for k, v in weights.items()},
                    "stream": stream, "stream_held_bytes": held}, os.path.join(out, "result.pt"))
    distributed.barrier()
    distributed.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
