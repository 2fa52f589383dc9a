"""The transformers generation backend: the generator log-prob of every sampled token is log softmax(logits / tau)
of the raw logits (what the trainer computes), also under top-k / top-p truncation; greedy decoding; end of turn."""
import pytest
import torch

from exgrpo.config import ModelConfig, SamplingConfig
from exgrpo.dialogue import DialogueTokenizer
from exgrpo.generation import TransformersBackend
from exgrpo.model import build_student


@pytest.mark.parametrize("sc,greedy", [(SamplingConfig(temperature=0.7, top_k=5, max_new_tokens=9), False),
                                       (SamplingConfig(temperature=1.3, top_p=0.8, max_new_tokens=7), False),
                                       (SamplingConfig(max_new_tokens=6), True)])
def test_generator_logprobs_equal_a_full_forward(sc, greedy):
    model, tok = build_student(ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2), seed=3)
    dtok = DialogueTokenizer(tok)
    be = TransformersBackend(model, tok, dtok.eot)
    prompts = [tok.encode("abc"), tok.encode("hello there"), tok.encode("x")]
    out = be.generate(prompts, sc, greedy=greedy, generator_seed=11)
    tau = 1.0 if greedy else sc.temperature
    model.set_attn_implementation("sdpa")
    for p, c in zip(prompts, out):
        assert 1 <= len(c.ids) <= sc.max_new_tokens and len(c.logprobs) == len(c.ids)
        ids = torch.tensor([p + c.ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(p) - 1:-1].double()
        want = torch.log_softmax(logits / tau, -1).gather(-1, torch.tensor(c.ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float64), want, atol=1e-4), (c.logprobs, want)
        if greedy:
            assert c.ids == logits.argmax(-1).tolist()
