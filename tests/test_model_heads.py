"""The trainer reads the model-side logit options from the Hugging Face config with no user action: a Gemma-2
student (final-logit soft-capping) and a Cohere student (logit scale) get the log-probs of the model's own
forward; an lm_head with a bias gets its gradient."""
import pytest
import torch
import transformers

from exgrpo.attention import use_packed_attention
from exgrpo.model import PolicyHidden, logit_transform_of
from exgrpo.steps import StepContext, nll_micro_loss, policy_logprobs

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def _model(arch):
    torch.manual_seed(0)
    if arch == "gemma2":
        cfg = transformers.Gemma2Config(**COMMON, final_logit_softcapping=2.0, attn_logit_softcapping=None,
                                        sliding_window=64, attn_implementation="sdpa")
    elif arch == "cohere":
        cfg = transformers.CohereConfig(**{k: v for k, v in COMMON.items() if k != "head_dim"}, logit_scale=0.3,
                                        attn_implementation="sdpa")
    else:
        cfg = transformers.LlamaConfig(**COMMON, attn_implementation="sdpa")
    m = transformers.AutoModelForCausalLM.from_config(cfg).double()
    with torch.no_grad():  # random init makes the logits tiny: scale them so a missing soft-cap would show
        m.get_output_embeddings().weight.mul_(40.0)
    return m


@pytest.mark.parametrize("arch,expect", [("gemma2", (2.0, 1.0)), ("cohere", (None, 0.3)), ("llama", (None, 1.0))])
def test_policy_logprobs_equal_the_models_own(arch, expect):
    m = _model(arch)
    assert logit_transform_of(m.config) == expect
    ids = torch.randint(0, 97, (19,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch.log_softmax(m(input_ids=ids[None]).logits[0].double() / 0.8, -1)
        ref = torch.cat([ref.new_zeros(1), ref[:-1].gather(1, ids[1:, None]).squeeze(1)])
    use_packed_attention(m)
    p = PolicyHidden(m)
    ctx = StepContext(policy=p, module=p, device=torch.device("cpu"))
    got = policy_logprobs(ctx, p, [(ids, torch.ones_like(ids, dtype=torch.bool))], temperature=0.8)[0]
    assert torch.allclose(got.double(), ref, atol=1e-6), (got - ref).abs().max()


def test_lm_head_bias_gets_its_gradient():
    m = _model("llama")
    m.lm_head.bias = torch.nn.Parameter(torch.randn(97, dtype=torch.float64) * 0.1)
    use_packed_attention(m)
    p = PolicyHidden(m)
    ctx = StepContext(policy=p, module=p, device=torch.device("cpu"))
    ids = torch.randint(0, 97, (15,), generator=torch.Generator().manual_seed(2))
    seq = [(ids, torch.ones_like(ids, dtype=torch.bool))]
    loss, _ = nll_micro_loss(ctx, seq, 14)
    loss.backward()
    gb = m.lm_head.bias.grad.clone()
    m.zero_grad()
    ref = torch.nn.functional.cross_entropy(m(input_ids=ids[None]).logits[0, :-1], ids[1:])
    ref.backward()
    assert torch.allclose(loss.double(), ref, rtol=1e-6) and torch.allclose(gb, m.lm_head.bias.grad, atol=1e-8)
