"""QLoRA (model.load_in_4bit=true): the base's linear layers in NF4 (bitsandbytes' CPU backend here), LoRA adapters
on top, lm_head / embeddings / norms plain; the weights a generator or an export gets are the dequantized base plus
the adapters' deltas (never requantized); `exgrpo sft` and `exgrpo train` train only the adapters and export a plain
Hugging Face folder that reproduces the trained model."""
import dataclasses
import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from exgrpo.config import ModelConfig, SamplingConfig, SFTConfig, TrainConfig  # noqa: E402
from exgrpo.model import PolicyHidden, build_student, merged_model, merged_state  # noqa: E402
from tests.utils import ei_data  # noqa: E402

Q = ModelConfig(hidden_size=128, intermediate_size=256, num_layers=2, head_dim=64, lora_rank=4, lora_alpha=8,
                load_in_4bit=True)


def _random_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_the_model_is_prepared_as_peft_expects():
    model, _ = build_student(Q, seed=0)
    base = model.base_model.model
    q = base.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit) and q.base_layer.weight.quant_state.quant_type == "nf4"
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32
    assert PolicyHidden(model).lm_head_weight is base.lm_head.weight  # what the fused kernels read: a plain weight
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    with pytest.raises(ValueError, match=r"load_in_4bit=true trains LoRA adapters .*set lora_rank > 0 \(got 0\)"):
        ModelConfig(load_in_4bit=True)
    with pytest.raises(ValueError, match=r"SFTConfig: model.load_in_4bit=true \(QLoRA\) runs with parallel=ddp"):
        SFTConfig(model=Q, parallel="fsdp2")


def test_merged_weights_are_the_dequantized_base_plus_the_deltas():
    model, _ = build_student(Q, seed=0)
    _random_adapters(model)
    q = model.base_model.model.model.layers[1].self_attn.q_proj
    w = bnb.functional.dequantize_4bit(q.base_layer.weight.data, q.base_layer.weight.quant_state)
    want = w + q.scaling["default"] * q.lora_B["default"].weight @ q.lora_A["default"].weight
    got = {n: t.clone() for n, t in merged_state(model)}
    torch.testing.assert_close(got["model.layers.1.self_attn.q_proj.weight"], want, rtol=1e-6, atol=1e-6)
    plain_names = set(build_student(dataclasses.replace(Q, load_in_4bit=False, lora_rank=0))[0].state_dict())
    assert set(got) == plain_names  # Hugging Face names, no packed NF4 tensors or quantization state
    before = q.base_layer.weight.data.clone()
    plain = merged_model(model)
    assert torch.equal(q.base_layer.weight.data, before)  # nothing requantized
    x = torch.randint(0, 200, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)

    from exgrpo.weight_transfer import PolicySource  # the server push reads the same weights
    src = PolicySource(model)
    assert [(m.name, m.shape) for m in src.metadata()] == [(n, tuple(t.shape)) for n, t in got.items()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ei_data(tmp_path_factory, limit=8, rules_per_example=2)


def test_sft_then_train_with_qlora_export_a_plain_model_that_reproduces_it(data, tmp_path):
    from exgrpo.grpo import train
    from exgrpo.sft import sft
    r = sft(SFTConfig(data=data, model=Q, out_dir=str(tmp_path / "sft"), max_steps=3, batch_dialogues=4,
                      progress=False))
    rows = [json.loads(x) for x in open(tmp_path / "sft" / "metrics.jsonl")]
    assert len(rows) == 3 and all(x["loss"] == x["loss"] and not x["skipped"] for x in rows)
    exported, _ = build_student(ModelConfig(path=r["final"]))  # a plain folder, no bitsandbytes needed to read it
    assert not any(type(p).__name__ == "Params4bit" for p in exported.parameters())
    assert "quantization_config" not in json.load(open(f"{r['final']}/config.json"))
    t = train(TrainConfig(data=data, init=r["final"], model=Q, out_dir=str(tmp_path / "rl"), steps=2,
                          questions_per_step=2, G=2, k=2, k_partial=1, sampling=SamplingConfig(max_new_tokens=8),
                          backend="transformers", progress=False, log_samples=0))
    rows = [json.loads(x) for x in open(tmp_path / "rl" / "metrics.jsonl")]
    assert len(rows) == 2 and all(x["loss"] == x["loss"] for x in rows)
    assert max(x["gen_logp_abs_diff_max"] for x in rows) < 1e-4  # generating through NF4 = the trainer's log-probs
    final, _ = build_student(ModelConfig(path=t["final"]))
    x = torch.randint(0, 200, (1, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (final(x).logits - exported(x).logits).abs().max() > 0  # the step moved the adapters


def test_the_fused_grpo_gradient_through_the_4bit_base_equals_full_logits_autograd():
    from exgrpo_kernels import GRPOLossConfig, fused_linear_grpo_loss, pack_sequences
    model, _ = build_student(Q, seed=0)
    _random_adapters(model)
    g = torch.Generator().manual_seed(3)
    b = pack_sequences([torch.randint(0, 200, (n,), generator=g) for n in (19, 33, 11)])
    adv = torch.randn(3, generator=g)
    mask = (torch.rand(b.targets.numel(), generator=g) > 0.25) & (b.targets >= 0)
    p = PolicyHidden(model)

    def grads(loss_of):
        model.zero_grad(set_to_none=True)
        loss_of(p(b)).backward()
        return {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}
    cfg = GRPOLossConfig(beta=0.0, loss_type="dapo")
    fused = grads(lambda h: fused_linear_grpo_loss(h, p.lm_head_weight, b.targets, b.seq_ids, adv, mask, cfg)[0])

    def full_logits(h):  # ratio 1 (one update per batch): d loss = -sum_t A_t d logp_t / tokens
        logp = torch.log_softmax(h @ p.lm_head_weight.T, -1).gather(1, b.targets.clamp(min=0)[:, None])[:, 0]
        return -(adv[b.seq_ids] * logp * mask).sum() / mask.sum()
    want = grads(full_logits)
    assert fused.keys() == want.keys() and all("lora_" in n for n in want)
    for n in want:
        torch.testing.assert_close(fused[n], want[n], rtol=2e-4, atol=1e-6)
    assert sum(float(v.abs().sum()) for v in want.values()) > 0
