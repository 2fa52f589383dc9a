"""Activation offloading (exgrpo/offload.py): gradients bit for bit those of the run without it (with and without
gradient checkpointing, LoRA, bf16 autocast, the fused GRPO loss), the checkpointed layer inputs are what travels,
parameters never do, every host copy is released by the backward; `exgrpo sft` and `exgrpo train` with
model.activation_offload=true equal the runs without it. On the CPU the host copies are forced
(copy_host_tensors: the CUDA path's bookkeeping; its stream and pinned copies run on a GPU, bench/device_check.sh)."""
import dataclasses
import functools
import json

import pytest
import torch
from exgrpo_kernels import GRPOLossConfig, fused_linear_grpo_loss, fused_linear_logprobs, pack_sequences

from exgrpo.config import ModelConfig, SFTConfig
from exgrpo.model import PolicyHidden, build_student
from exgrpo.offload import OffloadActivations, _is_parameter
from tests.utils import ei_data

SMALL = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=3, head_dim=32)
LENS = (37, 50, 23)


def _grads(model, offload: OffloadActivations | None, loss_kind: str, autocast: bool):
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    b = pack_sequences([torch.randint(0, 200, (n,), generator=g) for n in LENS])
    p = PolicyHidden(model)
    with offload if offload is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h = p(b)
            if loss_kind == "nll":
                loss = -fused_linear_logprobs(h, p.lm_head_weight, b.targets).sum()
            else:
                n = b.targets.numel()
                adv = torch.randn(len(LENS), generator=g)
                loss, _ = fused_linear_grpo_loss(h, p.lm_head_weight, b.targets, b.seq_ids, adv,
                                                 torch.rand(n, generator=g) > 0.2,
                                                 GRPOLossConfig(beta=0.04, loss_type="dapo"),
                                                 old_logp=-torch.rand(n, generator=g) - 5.0,
                                                 ref_logp=-torch.rand(n, generator=g) - 5.0)
    loss.backward()
    return float(loss.detach()), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}


@pytest.mark.parametrize("ckpt,lora,loss_kind,autocast", [
    (False, False, "nll", False), (True, False, "nll", False), (True, True, "nll", False),
    (True, False, "grpo", False), (False, True, "grpo", False), (True, False, "nll", True),
])
def test_gradients_equal_the_run_without_offloading(ckpt, lora, loss_kind, autocast):
    model, _ = build_student(dataclasses.replace(SMALL, gradient_checkpointing=ckpt, lora_rank=4 if lora else 0),
                             seed=0)
    model.train()
    want_loss, want = _grads(model, None, loss_kind, autocast)
    hooks = OffloadActivations(min_bytes=0, copy_host_tensors=True)
    got_loss, got = _grads(model, hooks, loss_kind, autocast)
    assert hooks.offloaded > 0 and hooks.host_bytes == 0  # it moved tensors, and the backward released them all
    assert got_loss == want_loss and got.keys() == want.keys() and len(got) > 0
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_with_checkpointing_the_layer_inputs_are_what_travels():
    tokens, h4 = sum(LENS), SMALL.hidden_size * 4
    sizes = {}
    for ckpt in (False, True):
        model, _ = build_student(dataclasses.replace(SMALL, gradient_checkpointing=ckpt), seed=0)
        model.train()
        hooks = OffloadActivations(min_bytes=0, copy_host_tensors=True)
        _grads(model, hooks, "nll", False)
        sizes[ckpt] = hooks.host_bytes_peak
    # every layer's input [tokens, H] fp32 is held for the recompute, and not much more
    assert SMALL.num_layers * tokens * h4 <= sizes[True] < 0.15 * sizes[False]
    # a threshold above the layer inputs keeps them in place
    model, _ = build_student(dataclasses.replace(SMALL, gradient_checkpointing=True), seed=0)
    model.train()
    hooks = OffloadActivations(min_bytes=tokens * h4 + 1, copy_host_tensors=True)
    _grads(model, hooks, "nll", False)
    assert hooks.host_bytes_peak < sizes[True] - SMALL.num_layers * tokens * h4 + 1


def test_parameters_never_travel_and_the_cpu_default_keeps_tensors_in_place():
    lin = torch.nn.Linear(4, 3)
    assert _is_parameter(lin.weight) and _is_parameter(lin.weight.t()) and not _is_parameter(lin.weight * 1)
    model, _ = build_student(SMALL, seed=0)
    model.train()
    hooks = OffloadActivations(min_bytes=0)  # CPU: the saved tensors already live in host memory
    _grads(model, hooks, "nll", False)
    assert hooks.offloaded == 0

    seen = []
    hooks = OffloadActivations(min_bytes=0, copy_host_tensors=True)
    pack = hooks.pack_hook
    hooks.pack_hook = lambda t: (seen.append(_is_parameter(t)), pack(t))[1]
    _grads(model, hooks, "nll", False)
    # parameters were saved, and passed through; every other tensor travelled (once, however often it was saved)
    assert any(seen) and 0 < hooks.offloaded <= seen.count(False) and hooks.offloaded_bytes > 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ei_data(tmp_path_factory, limit=8, rules_per_example=2)


@pytest.mark.parametrize("command", ["sft", "train"])
def test_sft_and_train_with_offloading_equal_the_runs_without(command, data, tmp_path, monkeypatch):
    from exgrpo import steps
    from exgrpo.config import SamplingConfig, TrainConfig
    from exgrpo.grpo import train
    from exgrpo.sft import sft
    monkeypatch.setattr(steps, "OffloadActivations",
                        functools.partial(OffloadActivations, min_bytes=0, copy_host_tensors=True))
    rows = {}
    for off in (False, True):
        model = dataclasses.replace(SMALL, gradient_checkpointing=True, activation_offload=off)
        out = tmp_path / f"off{int(off)}"
        if command == "sft":
            sft(SFTConfig(data=data, model=model, out_dir=str(out), max_steps=2, batch_dialogues=4, progress=False))
        else:
            train(TrainConfig(data=data, init=None, model=model, out_dir=str(out), steps=2, questions_per_step=2, G=2, k=2,
                              k_partial=1, sampling=SamplingConfig(max_new_tokens=8), backend="transformers",
                              progress=False, log_samples=0))
        rows[off] = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert len(rows[True]) == len(rows[False]) == 2
    for a, b in zip(rows[False], rows[True]):
        assert b["offload_tensors"] > 0 and b["offload_host_gib"] > 0 and "offload_tensors" not in a
        assert b["loss"] == a["loss"] and b["grad_norm"] == a["grad_norm"], (a, b)


@pytest.mark.parametrize("ckpt", [True, False])
def test_the_planners_host_memory_is_what_the_offloader_holds(ckpt):
    """exgrpo plan's host term for model.activation_offload (what the layers and the final norm save) against the
    host bytes the offloader held at the end of a forward (fp32, RoPE's tables and the loss input on top)."""
    from exgrpo.config import PlanConfig
    from exgrpo.plan import plan
    cfg = ModelConfig(hidden_size=256, intermediate_size=704, num_layers=6, head_dim=64, gradient_checkpointing=ckpt,
                      activation_offload=True)
    model, tok = build_student(cfg, seed=0)
    model.train()
    b = pack_sequences([torch.randint(0, 200, (256,), generator=torch.Generator().manual_seed(i)) for i in range(4)])
    p = PolicyHidden(model)
    hooks = OffloadActivations(min_bytes=0, copy_host_tensors=True)
    with hooks:
        loss = -fused_linear_logprobs(p(b), p.lm_head_weight, b.targets).sum()
    measured = hooks.host_bytes_peak / 2**30
    loss.backward()
    pred = plan(PlanConfig(model=cfg, parallel="ddp", world_size=1, precision="fp32", micro_batch_tokens=1024,
                           beta=0.0, vllm_gpu_memory_utilization=0.0, seq_len=256), vocab=len(tok))["host_offload_gib"]
    print(f"ckpt={ckpt}: host predicted {pred:.4f} GiB, measured {measured:.4f}")
    assert abs(pred - measured) / measured < 0.2, (pred, measured)


def test_the_planner_moves_the_saved_layers_to_the_host():
    from exgrpo.config import PlanConfig
    from exgrpo.plan import plan

    def at(offload):
        mc = ModelConfig(preset="qwen2.5-7b", lora_rank=32, dtype="bfloat16", gradient_checkpointing=True,
                         activation_offload=offload)
        return plan(PlanConfig(model=mc, parallel="ddp", world_size=1, micro_batch_tokens=32768, card="a100-40"))
    on, off = at(True), at(False)
    assert off["host_offload_gib"] == 0
    moved = off["per_gpu_gib"]["activations"] - on["per_gpu_gib"]["activations"]
    # the 28 layer inputs (32768 x 3584, fp32) but the one brought back, and the final norm's (8 H), leave the device
    assert moved == pytest.approx((27 * 4 + 8) * 32768 * 3584 / 2**30, rel=1e-6)
    assert on["host_offload_gib"] == pytest.approx((28 * 4 + 8) * 32768 * 3584 / 2**30, rel=1e-6)
    assert on["training_phase_gib"] < off["training_phase_gib"] - 12
