"""A packed forward (one row, position ids restarting, exgrpo_varlen attention) of small random-init
Llama, Qwen2 and Gemma models equals running each sequence alone, for log-probs and gradients."""
import pytest
import torch
import transformers
from exgrpo_kernels import fused_linear_logprobs, pack_sequences

from exgrpo.attention import IMPL, block_causal_mask, cu_seqlens_from_position_ids, packed_model_kwargs, use_packed_attention


def tiny(arch):
    common = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    cfg = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "gemma": transformers.GemmaConfig}[arch](**common, **({"head_dim": 16} if arch == "gemma" else {}))
    torch.manual_seed(0)
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "gemma": transformers.GemmaForCausalLM}[arch]
    return model_cls(cfg).double()


def per_seq_logprobs(model, seqs):
    out = []
    for x in seqs:
        h = model.model(input_ids=x[None]).last_hidden_state[0]
        t = torch.cat([x[1:], x.new_tensor([-100])])
        out.append(fused_linear_logprobs(h, model.lm_head.weight, t, backend="torch"))
    return torch.cat(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_packed_forward_and_grads_equal_per_sequence(arch):
    model = tiny(arch)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 301, (n,), generator=g) for n in (7, 1, 19, 12, 3)]
    ref = per_seq_logprobs(model, seqs)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    use_packed_attention(model)
    assert model.config._attn_implementation == IMPL
    b = pack_sequences(seqs, backend="torch")
    h = model.model(**packed_model_kwargs(b)).last_hidden_state[0]
    lp = fused_linear_logprobs(h, model.lm_head.weight, b.targets, backend="torch")
    assert torch.allclose(lp, ref, atol=1e-6, rtol=1e-6), (lp - ref).abs().max()
    lp.sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-7, rtol=1e-5), n  # log-probs are fp32

    # without cu_seq_lens the boundaries come from position_ids alone
    h2 = model.model(input_ids=b.input_ids[None], position_ids=b.position_ids[None]).last_hidden_state[0]
    assert torch.allclose(h2, h, atol=1e-12)


def test_plain_attention_leaks_across_borders_so_the_test_can_fail():
    # the same packed row with ordinary causal attention is NOT equal: the test above has teeth
    model = tiny("llama")
    seqs = [torch.arange(5), torch.arange(5, 11)]
    ref = per_seq_logprobs(model, seqs)
    b = pack_sequences(seqs, backend="torch")
    h = model.model(input_ids=b.input_ids[None]).last_hidden_state[0]
    lp = fused_linear_logprobs(h, model.lm_head.weight, b.targets, backend="torch")
    assert not torch.allclose(lp, ref, atol=1e-6)


def test_float32_and_bf16_within_tolerance():
    model = tiny("qwen2").float()
    seqs = [torch.randint(0, 301, (n,)) for n in (9, 4, 13)]
    ref = per_seq_logprobs(model, seqs)
    use_packed_attention(model)
    b = pack_sequences(seqs, backend="torch")
    for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        m = model.to(dt)
        h = m.model(**packed_model_kwargs(b)).last_hidden_state[0]
        lp = fused_linear_logprobs(h, m.lm_head.weight, b.targets, backend="torch")
        assert (lp - ref).abs().max() < tol * ref.abs().max(), dt


def test_mask_and_cu_seqlens_helpers():
    cu, mx = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 0, 1]]))
    assert cu.tolist() == [0, 3, 4, 6] and mx == 3
    m = block_causal_mask(cu, 6, "cpu")
    assert m[2, 0] and not m[3, 2] and not m[5, 3] and m[5, 4] and not m[0, 1]
    mw = block_causal_mask(cu, 6, "cpu", sliding_window=2)
    assert not mw[2, 0] and mw[2, 1]


@pytest.mark.parametrize("window", [None, 5])
def test_bucketed_sdpa_equals_one_call_per_sequence(window):
    # lengths that make several buckets (and empty / one-token sequences); float64 forward and every gradient
    from exgrpo.attention import bucketed_sdpa, length_buckets
    g = torch.Generator().manual_seed(3)
    lengths = [int(n) for n in torch.randint(0, 40, (23,), generator=g)] + [0, 1, 2]
    assert len(length_buckets(lengths)) > 2
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    H, N, D = 3, bounds[-1], 8
    q, k, v = (torch.randn(H, N, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = bucketed_sdpa(q, k, v, bounds, scale=0.3, sliding_window=window)
    ref = torch.full((N, H, D), float("nan"), dtype=torch.float64)
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            m = block_causal_mask(torch.tensor([0, e - s]), e - s, "cpu", window)
            o = torch.nn.functional.scaled_dot_product_attention(q[None, :, s:e], k[None, :, s:e], v[None, :, s:e],
                                                                 attn_mask=m, scale=0.3)
            ref[s:e] = o[0].transpose(0, 1)
    assert not ref.isnan().any()  # every position of the reference written
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    w = torch.randn(N, H, D, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((out * w).sum(), (q, k, v))
    gb = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_policy_hidden_on_a_plain_model_is_right_or_refuses():
    """A user's own Hugging Face model (never switched to packed attention) wrapped in PolicyHidden: the wrapper
    switches it, so packed sequences equal per-sequence runs; switched away afterwards, the forward refuses."""
    from exgrpo.model import PolicyHidden
    model = tiny("llama")
    assert model.config._attn_implementation == "sdpa"
    seqs = [torch.randint(0, 301, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 9, 4)]
    ref = per_seq_logprobs(model, seqs)
    p = PolicyHidden(model)
    b = pack_sequences(seqs, backend="torch")
    lp = fused_linear_logprobs(p(b), p.lm_head_weight, b.targets, backend="torch")
    assert torch.allclose(lp, ref, atol=1e-8)
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="packed sequences would attend across their borders"):
        p(b)
