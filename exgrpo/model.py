"""Student models: a tiny Llama- or Qwen2-shaped student built from a config (the demo), any Hugging Face causal LM
from a path, LoRA through peft, Liger-Kernel's model patches, and the policy's "hidden states + lm_head"
view that the fused kernels take (never the [tokens x vocab] logits). ``ModelConfig`` and the real shapes
(``PRESETS``) are in ``exgrpo.config``."""
from __future__ import annotations

import copy
import dataclasses
import tempfile
from dataclasses import dataclass

import torch
import transformers

from exgrpo.attention import IMPL, packed_model_kwargs, use_packed_attention
from exgrpo.config import PRESETS, ModelConfig
from exgrpo.tokenizer import arithmetic_tokenizer, byte_tokenizer
from exgrpo_kernels.integrations import logit_options


def hf_config(cfg: ModelConfig, tok):
    """The transformers config of a random-init student (tiny Llama / Qwen2, or a preset's real shape). The vocabulary
    is the tokenizer's, or ``cfg.vocab_size`` rows when larger (the tokenizer's ids first)."""
    if cfg.preset is None:
        heads = cfg.hidden_size // cfg.head_dim
        cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[cfg.arch]
        return cls(vocab_size=max(len(tok), cfg.vocab_size or 0), hidden_size=cfg.hidden_size,
                   intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers, num_attention_heads=heads,
                   num_key_value_heads=heads, head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   tie_word_embeddings=cfg.tie_embeddings)
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
    if cfg.liger:
        _apply_liger(cfg)
    if cfg.path:
        tok = transformers.AutoTokenizer.from_pretrained(cfg.path)
        model = _load_4bit(cfg.path, cfg, device) if cfg.load_in_4bit else \
            transformers.AutoModelForCausalLM.from_pretrained(cfg.path, dtype=getattr(torch, cfg.dtype))
    else:
        tok = byte_tokenizer(cfg.tokenizer_style) if cfg.tokenizer == "byte" else arithmetic_tokenizer(cfg.tokenizer_style)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg, tok)).to(getattr(torch, cfg.dtype))
        if cfg.load_in_4bit:  # a built student: quantized as a checkpoint of it would be
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                model = _load_4bit(d, cfg, device)
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
    return (model if cfg.load_in_4bit else model.to(device)), tok


def _load_4bit(path: str, cfg: ModelConfig, device):
    """QLoRA's base: every linear layer but lm_head in NF4 with double quantization (bitsandbytes), computing in
    ``cfg.dtype``; embeddings, norms and lm_head (which the fused kernels read as a plain [V, H] weight) in it."""
    try:
        import bitsandbytes  # noqa: F401  (optional: QLoRA only)
    except ImportError as err:
        raise ImportError("ModelConfig.load_in_4bit=true needs bitsandbytes (pip install bitsandbytes)") from err
    dt = getattr(torch, cfg.dtype)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=dt, llm_int8_skip_modules=["lm_head"])
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dt, quantization_config=q,
                                                             device_map={"": str(torch.device(device))})


def is_4bit(model) -> bool:
    """Whether the model holds bitsandbytes 4-bit weights (a QLoRA base)."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


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
    """(softcap, logit_scale) of a transformers config: see exgrpo_kernels.integrations.logit_options."""
    return logit_options(config)


class PolicyHidden(torch.nn.Module):
    """A causal LM's hidden-state view for the fused kernels: no [N, V] logits.

    forward(batch) -> last hidden states [N, H] of a PackedBatch (one packed row, position ids restarting per
    sequence). forward(batch, loss_fn) -> loss_fn(hidden [N, H], LMHead (weight [V, H], bias, logit transform),
    batch): the loss computed inside the module's forward, so DDP and FSDP2 see one forward per micro-batch and
    under FSDP2 the lm_head weight is unsharded while the fused kernel reads it (its gradient is reduce-scattered
    like every other).

    Wrapping a model switches it to packed attention (``exgrpo.attention``): a packed row then never attends across
    a sequence border. A model whose attention implementation is changed afterwards is refused at the next forward
    (its packed sequences would leak into each other)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        use_packed_attention(base_causal_lm(model))

    @property
    def causal_lm(self):
        return base_causal_lm(self.model)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The [V, H] output weight."""
        return self.causal_lm.get_output_embeddings().weight

    def output_layer(self) -> LMHead:
        out = self.causal_lm.get_output_embeddings()
        softcap, scale = logit_transform_of(self.causal_lm.config)
        return LMHead(out.weight, getattr(out, "bias", None), softcap, scale)

    def forward(self, batch, loss_fn=None):
        """loss_fn(hidden [N, H], LMHead, batch): the loss or log-probs from the hidden states, inside this forward."""
        impl = self.causal_lm.config._attn_implementation
        if impl != IMPL:
            raise RuntimeError(f"PolicyHidden: the model's attention implementation is {impl!r}, not {IMPL!r}: packed "
                               f"sequences would attend across their borders (use_packed_attention(model) again)")
        decoder = getattr(self.causal_lm, self.causal_lm.base_model_prefix)
        h = decoder(**packed_model_kwargs(batch)).last_hidden_state[0]
        return h if loss_fn is None else loss_fn(h, self.output_layer(), batch)


def load_policy(model_cfg: ModelConfig, init: str | None, seed: int, device):
    """(model, tokenizer): the Hugging Face folder ``init`` when given (with the rest of ``model_cfg``: LoRA,
    checkpointing, ...), else the model ``model_cfg`` describes."""
    mc = dataclasses.replace(model_cfg, path=init) if init else model_cfg
    return build_student(mc, seed=seed, device=device)


def merged_state(model):
    """(name, tensor) pairs of the policy's weights in Hugging Face checkpoint naming (LoRA merged in), one at a
    time: a consumer that copies each tensor away (vLLM's reload) never holds a second full copy of the model. A
    yielded tensor may be a view of a live parameter (with LoRA merged in only until the iteration ends): copy it
    before drawing the next. FSDP2-sharded parameters are gathered one at a time (every rank must iterate: the
    gather is collective)."""
    def full(v):
        return v.full_tensor() if hasattr(v, "full_tensor") else v
    if is_4bit(model):  # QLoRA: merging into NF4 would requantize (lossy, drifting): dequantize and add instead
        yield from _dequantized_merged_state(model)
        return
    if hasattr(model, "merge_adapter"):  # peft: merge in place, stream, unmerge
        model.merge_adapter()
        try:
            for k, v in model.state_dict().items():
                if "lora_" not in k:
                    yield k.replace("base_model.model.", "").replace(".base_layer", ""), full(v).detach()
        finally:
            model.unmerge_adapter()
        return
    for k, v in base_causal_lm(model).state_dict().items():
        yield k, full(v).detach()


def _dequantized_merged_state(model):
    """A 4-bit base's weights dequantized to its compute dtype, each adapted layer's LoRA delta added (the model is
    not changed), in Hugging Face naming, one tensor at a time."""
    import bitsandbytes.functional as bnbf
    lora_of = {id(m.base_layer): m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            if "lora_" in name:
                continue
            w = bnbf.dequantize_4bit(p.data, p.quant_state) if type(p).__name__ == "Params4bit" else p.detach()
            lora = lora_of.get(id(mod))
            if lora is not None and pname == "weight" and not lora.merged:
                for a in lora.active_adapters:
                    if a in lora.lora_A:
                        w = w + lora.get_delta_weight(a).to(w.dtype)
            yield name.replace("base_model.model.", "").replace(".base_layer", ""), w


def merged_model(model):
    """A plain transformers model holding the policy's weights (LoRA merged, a 4-bit base dequantized): what is
    exported and what a colocated vLLM starts from. The model itself is not changed."""
    if is_4bit(model):
        base = base_causal_lm(model)
        cfg = copy.deepcopy(base.config)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        sd = {n: t.detach().clone() for n, t in merged_state(model)}
        plain = transformers.AutoModelForCausalLM.from_config(cfg, dtype=next(iter(sd.values())).dtype)
        missing, unexpected = plain.load_state_dict(sd, strict=False)
        if unexpected or [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]:
            raise RuntimeError(f"merged_model: missing {missing}, unexpected {unexpected}")
        return plain
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return base_causal_lm(model)
