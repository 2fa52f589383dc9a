"""Student models: a tiny Llama-shaped student built from a config (the demo), any Hugging Face causal LM
from a path, LoRA through peft, Liger-Kernel's model patches, and the policy's "hidden states + lm_head"
view that the fused kernels take (never the [tokens x vocab] logits)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

from exgrpo.attention import packed_model_kwargs, use_packed_attention
from exgrpo_kernels.integrations._hf import logit_options


# Shapes of real students, built with random weights and the project's byte tokenizer (no download): for GPU
# smoke tests, benchmarks and the memory planner. The vocabulary keeps its real size (the byte ids are its first
# rows), so the fused loss sees the real [tokens x V] work.
PRESETS = {
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(arch="qwen2", hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                       num_kv_heads=4, head_dim=128, vocab_size=152064, tie_word_embeddings=False),
    "gemma-7b": dict(arch="gemma", hidden_size=3072, intermediate_size=24576, num_layers=28, num_heads=16,
                     num_kv_heads=16, head_dim=256, vocab_size=256000, tie_word_embeddings=True),
}


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # a Hugging Face folder; None: build a random-init student from the fields below
    preset: str | None = None  # a real shape with random weights (qwen2.5-0.5b | qwen2.5-1.5b | qwen2.5-7b | gemma-7b)
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    head_dim: int = 64  # 64 so vLLM's CPU attention takes it
    max_position_embeddings: int = 4096
    tokenizer: str = "byte"  # a built student's tokenizer: byte (one token per byte) | arithmetic (BPE of the built-in domain)
    tokenizer_style: str = "chatml"  # chat template: chatml | llama3
    dtype: str = "float32"  # parameter dtype: float32 (master weights; bf16 autocast on CUDA) | bfloat16
    tie_embeddings: bool = False  # a built student: lm_head shares the input embedding matrix
    lora_rank: int = 0  # > 0: train LoRA adapters (peft) instead of all weights
    lora_alpha: int = 64
    liger: bool = False  # Liger-Kernel RMSNorm / SwiGLU / RoPE patches (GPU)
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"ModelConfig.preset must be one of {sorted(PRESETS)} or None, got {self.preset!r}")
        if self.hidden_size % self.head_dim:
            raise ValueError(f"ModelConfig.hidden_size {self.hidden_size} is not a multiple of head_dim {self.head_dim}")
        if self.tokenizer not in ("byte", "arithmetic"):
            raise ValueError(f"ModelConfig.tokenizer must be 'byte' or 'arithmetic', got {self.tokenizer!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ModelConfig.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.lora_rank < 0:
            raise ValueError(f"ModelConfig.lora_rank must be >= 0, got {self.lora_rank}")


def hf_config(cfg: ModelConfig, tok):
    """The transformers config of a random-init student (tiny Llama, or a preset's real shape)."""
    if cfg.preset is None:
        heads = cfg.hidden_size // cfg.head_dim
        return transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=heads, num_key_value_heads=heads, head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_position_embeddings, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=cfg.tie_embeddings)
    p = PRESETS[cfg.preset]
    cls = {"qwen2": transformers.Qwen2Config, "gemma": transformers.GemmaConfig, "llama": transformers.LlamaConfig}[p["arch"]]
    return cls(vocab_size=p["vocab_size"], hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
               num_hidden_layers=p["num_layers"], num_attention_heads=p["num_heads"],
               num_key_value_heads=p["num_kv_heads"], head_dim=p["head_dim"],
               max_position_embeddings=cfg.max_position_embeddings, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               tie_word_embeddings=p["tie_word_embeddings"])


def build_student(cfg: ModelConfig, seed: int = 0, device="cpu"):
    """(model, tokenizer). The model uses packed (varlen) attention for training; generation switches to sdpa."""
    from exgrpo.tokenizer import arithmetic_tokenizer, byte_tokenizer
    if cfg.liger:
        _apply_liger(cfg)
    if cfg.path:
        tok = transformers.AutoTokenizer.from_pretrained(cfg.path)
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.path, dtype=getattr(torch, cfg.dtype))
    else:
        tok = byte_tokenizer(cfg.tokenizer_style) if cfg.tokenizer == "byte" else arithmetic_tokenizer(cfg.tokenizer_style)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg, tok)).to(getattr(torch, cfg.dtype))
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
    arch = (PRESETS[cfg.preset]["arch"] if cfg.preset else "llama") if cfg.path is None else \
        transformers.AutoConfig.from_pretrained(cfg.path).model_type
    fn = getattr(lk, f"apply_liger_kernel_to_{arch}", None)
    if fn is None:
        raise ValueError(f"ModelConfig.liger: Liger-Kernel has no patch for architecture {arch!r}")
    fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


def base_causal_lm(model):
    """The transformers CausalLM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class LMHead:
    """The output layer as the fused kernels take it: weight [V, H], bias [V] or None, and the logit transform the
    model applies after it (read from the Hugging Face config: Gemma-2/3 ``final_logit_softcapping``, Cohere's
    ``logit_scale``, and the multipliers other families use), so that log-probs equal the model's own."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    logit_scale: float = 1.0

    def kwargs(self) -> dict:
        return {"bias": self.bias, "softcap": self.softcap, "logit_scale": self.logit_scale}


def logit_transform_of(config) -> tuple[float | None, float]:
    """(softcap, logit_scale) of a transformers config: see exgrpo_kernels.integrations._hf.logit_options."""
    return logit_options(config)


class PolicyHidden(torch.nn.Module):
    """forward(batch) -> last hidden states [N, H] of a PackedBatch; ``lm_head`` is the [V, H] weight.

    forward(batch, head) -> head(hidden [N, H], LMHead (weight [V, H], bias, logit transform), batch): the loss computed
    inside the module's forward. DDP and FSDP2 then see one forward per micro-batch, and under FSDP2 the
    lm_head weight is unsharded while the fused kernel reads it (its gradient is reduce-scattered like every
    other). The loss kernels take hidden states and the weight directly: no [N, V] logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def causal_lm(self):
        return base_causal_lm(self.model)

    @property
    def lm_head(self) -> torch.Tensor:
        """The [V, H] output weight."""
        return self.causal_lm.get_output_embeddings().weight

    def head(self) -> LMHead:
        out = self.causal_lm.get_output_embeddings()
        softcap, scale = logit_transform_of(self.causal_lm.config)
        return LMHead(out.weight, getattr(out, "bias", None), softcap, scale)

    def forward(self, batch, head=None):
        """head(hidden [N, H], LMHead, batch): the loss or log-probs from the hidden states, inside this forward."""
        decoder = getattr(self.causal_lm, self.causal_lm.base_model_prefix)
        h = decoder(**packed_model_kwargs(batch)).last_hidden_state[0]
        return h if head is None else head(h, self.head(), batch)
