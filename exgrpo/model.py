"""Student models: a tiny Llama-shaped student built from a config (the demo), any Hugging Face causal LM
from a path, LoRA through peft, Liger-Kernel's model patches, and the policy's "hidden states + lm_head"
view that the fused kernels take (never the [tokens x vocab] logits)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

from exgrpo.attention import packed_model_kwargs, use_packed_attention


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # a Hugging Face folder; None: build the tiny student below
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    head_dim: int = 64  # 64 so vLLM's CPU attention takes it
    max_position_embeddings: int = 4096
    tokenizer_style: str = "chatml"
    dtype: str = "float32"  # float32 | bfloat16
    lora_rank: int = 0  # > 0: train LoRA adapters (peft) instead of all weights
    lora_alpha: int = 64
    liger: bool = False  # Liger-Kernel RMSNorm / SwiGLU / RoPE patches (GPU)
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.hidden_size % self.head_dim:
            raise ValueError(f"ModelConfig.hidden_size {self.hidden_size} is not a multiple of head_dim {self.head_dim}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ModelConfig.dtype must be float32 or bfloat16, got {self.dtype!r}")


def build_student(cfg: ModelConfig, seed: int = 0, device="cpu"):
    """(model, tokenizer). The model uses packed (varlen) attention for training; generation switches to sdpa."""
    from exgrpo.tokenizer import byte_tokenizer
    if cfg.liger:
        _apply_liger(cfg)
    if cfg.path:
        tok = transformers.AutoTokenizer.from_pretrained(cfg.path)
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.path, dtype=getattr(torch, cfg.dtype))
    else:
        tok = byte_tokenizer(cfg.tokenizer_style)
        heads = cfg.hidden_size // cfg.head_dim
        mc = transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=heads, num_key_value_heads=heads, head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_position_embeddings, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(mc).to(getattr(torch, cfg.dtype))
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"]))
    use_packed_attention(base_causal_lm(model))
    return model.to(device), tok


def _apply_liger(cfg: ModelConfig):
    """Liger-Kernel's Triton patches for supported architectures (their loss patches stay off: our kernels do it)."""
    import liger_kernel.transformers as lk
    arch = "llama" if cfg.path is None else transformers.AutoConfig.from_pretrained(cfg.path).model_type
    fn = getattr(lk, f"apply_liger_kernel_to_{arch}", None)
    if fn is None:
        raise ValueError(f"ModelConfig.liger: Liger-Kernel has no patch for architecture {arch!r}")
    fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


def base_causal_lm(model):
    """The transformers CausalLM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class PolicyHidden(torch.nn.Module):
    """forward(batch) -> last hidden states [N, H] of a PackedBatch; ``lm_head`` is the [V, H] weight.

    Wrapping the CausalLM this way lets DDP see one forward while the loss kernels take hidden states and the
    lm_head weight directly."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def causal_lm(self):
        return base_causal_lm(self.model)

    @property
    def lm_head(self) -> torch.Tensor:
        return self.causal_lm.get_output_embeddings().weight

    def forward(self, batch):
        decoder = getattr(self.causal_lm, self.causal_lm.base_model_prefix)
        return decoder(**packed_model_kwargs(batch)).last_hidden_state[0]
