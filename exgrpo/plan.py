"""`exgrpo plan`: the memory one GPU needs for a training setup, term by term, and whether it fits a card.

From a model's shape (a preset, a Hugging Face folder's config.json, or the fields of ModelConfig), LoRA or not, the
parallel layout and world size, the micro-batch, the loss's memory mode and the colocated vLLM's share. The terms:

- weights, gradients, optimizer state: fp32 master weights (4 B/param), fp32 gradients (4), AdamW moments (8) for
  every trained parameter; FSDP2 divides all of them by the world size, DDP does not. LoRA: the base weights in the
  model's dtype, frozen (no gradient, no moments); the adapters trained as above.
- FSDP2's gathered layers: the layer being computed and the one prefetched, and the root (embeddings, head), in
  the gather dtype (FSDPConfig.param_dtype, fp32 by default).
- QLoRA (model.load_in_4bit): the decoder's linear weights in NF4 with double quantization (0.516 B/param), the
  embeddings, norms and lm_head in the model's dtype.
- reference policy (KL, beta > 0): a second copy of the weights in the compute dtype (sharded like the policy); none
  with LoRA (the policy with its adapters disabled).
- activations of one micro-batch: the tensors a Llama-style decoder layer saves for its backward, per token:
  each RMSNorm keeps its input and its normalised input in fp32 (8 H each); the projections keep their input, once
  per norm in the weights' dtype, or under bf16 autocast of fp32 weights one bf16 cast per projection (5 x 2 H);
  attention keeps q, k, v, its output and the output's reshaped copy ((3 q + 2 kv) x b, b = 2 under bf16, 4 in
  fp32; flash-attn, torch varlen and the CPU's per-sequence SDPA never materialise [len x len]); the MLP keeps
  4 I x b. With gradient checkpointing only each layer's input (4 H) plus one layer recomputed. Activation offload
  (model.activation_offload) keeps what the layers save in host memory (reported apart) and one layer's worth on
  the device (with checkpointing: one layer input besides the recomputed layer). Under bf16 autocast
  of fp32 weights, every layer's bf16 weight copies stay alive until the backward (2 B/param, whole layers even
  under FSDP2, which gathers them first; one layer with checkpointing; none when FSDP2 gathers in bf16).
- the fused loss: one [chunk, V] logits tile, the fp32 grad-weight accumulator in fast mode when the head trains,
  a bf16 copy of an fp32 head under autocast; low-memory mode: a vocabulary slab and an fp32 grad-hidden.
- vLLM: its share of the card while it generates (gpu_memory_utilization), which must hold its own copy of the
  weights (merged, dequantized; bf16 under bf16 autocast, else the weights' dtype) and at least 1 GiB of KV cache;
  during the training phase, asleep at level 2, a residual (1 GiB assumed); level 1 keeps nothing of the weights
  on the GPU either but pins host memory.
- AdamW's step: about two parameter-sized fp32 temporaries (foreach implementation).
- async_steps=n (server mode), host memory on rank 0: up to n + 2 copies of the merged weights as held (a tied
  matrix under both names, as pushed): the last pushed, kept for a re-push after a restart, and those waiting
  behind the rollouts generated ahead (reported apart).
- attention=math (SDPA's math path, when a user forces it): the [heads, len, len] probabilities saved per sequence
  and layer.
- CUDA context and allocator slack: 1.5 GiB.

The terms do not all peak together. The training phase's peak is the static memory (weights, moments, reference,
FSDP2's gathered layers) plus the gradients (alive across the micro-batches of a step) plus the larger of: one
micro-batch's forward/backward (activations, attention scores, the autocast weight copies, the fused loss) and the
optimizer step's temporaries. This was checked against the exact peak of live tensor bytes of two SFT steps on the
CPU, fp32 and bf16 autocast, with and without checkpointing (tests/test_plan.py; README).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from exgrpo.config import PRESETS, ModelConfig, PlanConfig, card_gib

GIB = 1 << 30
# NF4 with double quantization: 4 bits a weight, an 8-bit absmax per 64 weights, an fp32 constant per 256 absmaxes
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
VLLM_MIN_KV = 1 * GIB  # the least KV cache a colocated vLLM is given room for beside its weights
# the terms alive only during one micro-batch's forward and backward
MICRO_BATCH_TERMS = ("activations", "attention scores", "bf16 weight copies", "fused loss")


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        q = self.heads * self.head_dim
        return self.hidden * q * 2 + self.hidden * self.kv * 2 + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def params(self) -> int:
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def lora_params(self, r: int) -> int:
        q = self.heads * self.head_dim
        per = r * ((self.hidden + q) * 2 + (self.hidden + self.kv) * 2 + 2 * (self.hidden + self.intermediate)
                   + (self.intermediate + self.hidden))
        return self.layers * per


def shape_of(mc: ModelConfig, vocab: int | None = None) -> Shape:
    if mc.path:
        c = json.load(open(os.path.join(mc.path, "config.json")))
        c = c.get("text_config", c)
        h = c["hidden_size"]
        heads = c["num_attention_heads"]
        return Shape(c["vocab_size"], h, c["intermediate_size"], c["num_hidden_layers"], heads,
                     c.get("num_key_value_heads", heads), c.get("head_dim") or h // heads,
                     bool(c.get("tie_word_embeddings", False)))
    if mc.preset:
        p = PRESETS[mc.preset]
        return Shape(p["vocab_size"], p["hidden_size"], p["intermediate_size"], p["num_layers"], p["num_heads"],
                     p["num_kv_heads"], p["head_dim"], p["tie_word_embeddings"])
    heads = mc.hidden_size // mc.head_dim
    return Shape(vocab or 259, mc.hidden_size, mc.intermediate_size, mc.num_layers, heads, heads, mc.head_dim,
                 mc.tie_embeddings)


def activation_bytes_per_token(s: Shape, b: int, base_b: int, checkpointing: bool,
                               offload: bool = False) -> tuple[float, float]:
    """(device, host) bytes a micro-batch's tokens keep for the backward, summed over layers (see the module
    docstring). Offloaded: what the layers save goes to host memory as it is saved, and one layer's worth is on
    the device at a time (the one computed or brought back); with checkpointing that is each layer's input.

    b: bytes of the compute dtype (2: bf16 autocast or bf16 weights, 4: fp32); base_b: bytes of the weights."""
    q = s.heads * s.head_dim
    autocast_casts = b == 2 and base_b == 4  # each projection casts its fp32 input to bf16 and saves the cast
    proj_inputs = 5 * 2 * s.hidden if autocast_casts else 2 * base_b * s.hidden
    layer = 2 * 8 * s.hidden + proj_inputs + b * (3 * q + 2 * s.kv) + 4 * b * s.intermediate
    final = 8 * s.hidden + (2 * s.hidden if autocast_casts else 0)  # the final norm; the loss's bf16 input
    saved = s.layers * 4 * s.hidden if checkpointing else s.layers * layer  # kept across the whole forward
    if offload:  # the final norm's saved tensors travel too; on the device one layer's worth at a time
        return (4 * s.hidden if checkpointing else 0) + layer, saved + final
    return saved + (layer if checkpointing else 0) + final, 0.0


def plan(cfg: PlanConfig, vocab: int | None = None) -> dict:
    """Per-GPU memory in GiB by term, for the training phase and the generation phase, and whether each fits."""
    s = shape_of(cfg.model, vocab)
    P = s.params()
    W = cfg.world_size if cfg.parallel == "fsdp2" else 1
    b = 2 if cfg.precision == "bf16" else 4
    base_b = 2 if cfg.model.dtype == "bfloat16" else 4
    lora = cfg.model.lora_rank > 0
    t = {}
    if lora and cfg.model.load_in_4bit:  # QLoRA: the decoder's linear weights in NF4, the rest in the model's dtype
        A = s.lora_params(cfg.model.lora_rank)
        linear = s.layers * (s.layer_params() - 2 * s.hidden)
        t["weights (frozen base, NF4 linears)"] = (linear * NF4_BYTES + (P - linear) * base_b) / W
        t["LoRA adapters, grads, AdamW"] = A * 16 / W
        trained_head = False
    elif lora:
        A = s.lora_params(cfg.model.lora_rank)
        t["weights (frozen base)"] = P * base_b / W
        t["LoRA adapters, grads, AdamW"] = A * 16 / W
        trained_head = False
    else:
        t["weights (fp32 master)"] = P * 4 / W
        t["gradients"] = P * 4 / W
        t["AdamW moments"] = P * 8 / W
        trained_head = True
    if cfg.cpu_offload and cfg.parallel == "fsdp2":
        for k in list(t):
            t[k] = 0.0
    fsdp = cfg.parallel == "fsdp2" and W > 1
    gather_b = 2 if cfg.fsdp_param_dtype == "bfloat16" else base_b
    if fsdp:
        t["FSDP2 gathered layers (current + prefetched)"] = (2 * s.layer_params() + s.vocab * s.hidden) * gather_b
    if cfg.beta > 0 and not lora:
        t["reference policy"] = P * b / W
    offload = cfg.model.activation_offload
    act, host = activation_bytes_per_token(s, b, base_b, cfg.model.gradient_checkpointing, offload)
    t["activations"] = cfg.micro_batch_tokens * act
    host_offload = cfg.micro_batch_tokens * host
    if b == 2 and gather_b == 4 and not lora:  # autocast's bf16 copies of the (gathered) layers, saved for the backward
        saved_layers = 1 if cfg.model.gradient_checkpointing or offload else s.layers
        if offload and not cfg.model.gradient_checkpointing:
            host_offload += (s.layers - 1) * s.layer_params() * 2  # saved tensors too: they travel
        t["bf16 weight copies (autocast)"] = saved_layers * s.layer_params() * 2
    if cfg.attention == "math":  # [heads, len, len] probabilities saved per sequence and layer
        per_layer = (cfg.micro_batch_tokens // max(1, cfg.seq_len)) * s.heads * cfg.seq_len ** 2 * b
        t["attention scores (math SDPA)"] = per_layer * (1 if cfg.model.gradient_checkpointing else s.layers)
    if not (cfg.cpu_offload and cfg.parallel == "fsdp2"):  # AdamW's foreach step: ~2 parameter-sized temporaries
        t["optimizer step temporaries"] = (s.lora_params(cfg.model.lora_rank) if lora else P) * 8 / W
    V, H = s.vocab, s.hidden
    if cfg.memory_mode == "fast":
        chunk = min(4096, max(16, int((max(512 << 20, V * H * 2) if trained_head else 256 << 20) // (V * b))))
        loss = min(chunk, cfg.micro_batch_tokens) * V * b + (V * H * 4 if trained_head else 0)
    else:
        slab = max(128, (128 << 20) // max(1, cfg.micro_batch_tokens * b))
        loss = cfg.micro_batch_tokens * min(slab, V) * b + cfg.micro_batch_tokens * H * 4
    if b == 2 and base_b == 4:
        loss += V * H * 2  # the bf16 copy of an fp32 head under autocast
    t["fused loss (logits tile, fp32 grad-weight accumulator)"] = loss
    t["CUDA context, allocator slack"] = 1.5 * GIB
    card = card_gib(cfg.card) * GIB
    vllm_gen = cfg.vllm_gpu_memory_utilization * card
    vllm_train = (1.0 * GIB if cfg.vllm_gpu_memory_utilization > 0 else 0.0)
    step = t.get("optimizer step temporaries", 0.0)
    micro = sum(v for k, v in t.items() if k.startswith(MICRO_BATCH_TERMS))
    static = sum(v for k, v in t.items()) - step - micro
    train_total = static + max(micro, step) + vllm_train  # the step runs after the micro-batches' memory is freed
    # generating: the policy's weights stay; activations, loss buffers and gradients are free
    gen_total = (sum(v for k, v in t.items() if not k.startswith(MICRO_BATCH_TERMS + ("gradients",
                                                                                        "optimizer step")))
                 + vllm_gen)
    # inside its share vLLM holds its own copy of the (merged, dequantized) weights in their dtype, and a KV cache
    vllm_weights = P * min(b, base_b) if cfg.vllm_gpu_memory_utilization > 0 else 0.0  # bf16 under bf16 autocast
    vllm_ok = cfg.vllm_gpu_memory_utilization == 0 or vllm_weights + VLLM_MIN_KV <= vllm_gen
    # async_steps=n: rank 0's host copies of the merged weights (as held; a tied matrix under both names), the
    # pushed one kept for a re-push and up to n + 1 staged behind the rollouts generated ahead
    copy = (P + (s.vocab * s.hidden if s.tied else 0)) * base_b
    host_async = (cfg.async_steps + 2) * copy if cfg.async_steps else 0.0
    gib = {k: v / GIB for k, v in t.items()}
    return {"params": P, "per_gpu_gib": gib, "vllm_training_phase_gib": vllm_train / GIB,
            "vllm_generation_phase_gib": vllm_gen / GIB, "vllm_weights_gib": vllm_weights / GIB,
            "vllm_share_holds_weights": vllm_ok, "training_phase_gib": train_total / GIB,
            "generation_phase_gib": gen_total / GIB, "card_gib": card / GIB, "host_offload_gib": host_offload / GIB,
            "host_async_copy_gib": copy / GIB, "host_async_gib": host_async / GIB,
            "fits": train_total <= card and gen_total <= card and vllm_ok}


def render(cfg: PlanConfig, p: dict) -> str:
    mc = cfg.model
    name = mc.preset or mc.path or f"h{mc.hidden_size} x{mc.num_layers}"
    lines = [f"{name}: {p['params'] / 1e9:.2f} B parameters; {cfg.parallel} on {cfg.world_size} GPU(s), "
             f"{('QLoRA' if mc.load_in_4bit else 'LoRA') + ' r=' + str(mc.lora_rank) if mc.lora_rank else 'full fine-tune'}, "
             f"{cfg.precision}, "
             f"{cfg.micro_batch_tokens} tokens per micro-batch, loss {cfg.memory_mode}"
             f"{', gradient checkpointing' if mc.gradient_checkpointing else ''}"
             f"{', activation offload' if mc.activation_offload else ''}", ""]
    for k, v in p["per_gpu_gib"].items():
        lines.append(f"  {k:52s} {v:8.2f} GiB")
    lines.append(f"  {'vLLM (asleep during training / generating)':52s} {p['vllm_training_phase_gib']:8.2f} / "
                 f"{p['vllm_generation_phase_gib']:.2f} GiB")
    if p["vllm_weights_gib"]:
        lines.append(f"  {'  of which vLLM weights (+ >= 1 GiB KV cache)':52s} {p['vllm_weights_gib']:8.2f} GiB")
    lines.append(f"  {'training phase':52s} {p['training_phase_gib']:8.2f} GiB")
    if mc.activation_offload:
        lines.append(f"  {'  + host memory (offloaded activations)':52s} {p['host_offload_gib']:8.2f} GiB")
    if cfg.async_steps:
        lines.append(f"  {f'  + host memory, rank 0 (async_steps={cfg.async_steps} weight copies)':52s} "
                     f"{p['host_async_gib']:8.2f} GiB")
    lines.append(f"  {'generation phase':52s} {p['generation_phase_gib']:8.2f} GiB")
    verdict = "fits" if p["fits"] else "does NOT fit"
    why = "" if p["vllm_share_holds_weights"] else (
        f": vLLM's share ({p['vllm_generation_phase_gib']:.1f} GiB) cannot hold its weights and a KV cache; raise "
        f"vllm_gpu_memory_utilization")
    lines.append(f"  -> {verdict} a {p['card_gib']:.0f} GiB card ({cfg.card}){why}")
    return "\n".join(lines)
