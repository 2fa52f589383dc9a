"""Every config of the project, in one place: one frozen dataclass per command (``SFTConfig``, ``TrainConfig``,
``EvalConfig``, ``EIConfig``, ``PlanConfig``, ``DemoConfig``), composed of the component configs (``ModelConfig``,
``SamplingConfig``, ``OptimConfig``, ``FSDPConfig``, ``ChatConfig``, and the kernels' ``GRPOLossConfig``).

Each field's comment is its meaning (``exgrpo <command> --help`` prints it). Every check runs when the config is
built and names the field and the value. This module is a leaf: it imports no trainer code, so any module may
import it.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

from exgrpo.data.loaders import SPECS
from exgrpo.rules import RULE_NAMES, get_rules
from exgrpo_kernels import GRPOLossConfig
from exgrpo_kernels import KERNEL_BACKENDS

__all__ = ["PRESETS", "CARDS", "ARMS", "GenBackend", "PARALLEL", "PRECISIONS", "ModelConfig", "SamplingConfig",
           "OptimConfig", "FSDPConfig", "SFTConfig", "TrainConfig", "EvalConfig", "ChatConfig", "EIConfig",
           "PlanConfig", "DemoConfig", "card_gib", "check_data_names", "DEFAULT_ARMS", "FULL_ARMS"]


class GenBackend(str, enum.Enum):
    """Generation backends: ``auto`` (vLLM where installed, else transformers), the trainer's own model through
    transformers, a colocated vLLM engine, or a separate ``vllm serve``."""

    AUTO = "auto"
    TRANSFORMERS = "transformers"
    VLLM = "vllm"
    VLLM_SERVER = "vllm-server"


GEN_BACKENDS = tuple(b.value for b in GenBackend)
PARALLEL = ("ddp", "fsdp2")
WEIGHT_TRANSFERS = ("file", "gloo", "nccl")  # how server mode's weights reach the server
PRECISIONS = ("auto", "bf16", "fp32")
TRAIN_MODES = ("dialogue", "independent", "direct", "opd")

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
ARCHS = ("llama", "qwen2")
CARDS = {"h100": 80.0, "h200": 141.0, "a100-80": 80.0, "a100-40": 40.0, "l40s": 48.0, "4090": 24.0}


def check_data_names(field_name: str, names) -> None:
    for n in names:
        if n != "arithmetic" and n not in SPECS:
            raise ValueError(f"{field_name}: unknown data set {n!r}; known: arithmetic, {', '.join(sorted(SPECS))}")


def card_gib(card: str) -> float:
    if card in CARDS:
        return CARDS[card]
    try:
        return float(card)
    except ValueError:
        raise ValueError(f"PlanConfig.card must be one of {sorted(CARDS)} or a size in GiB, got {card!r}") from None


def _one_of(owner: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name} must be one of {tuple(allowed)}, got {value!r}")


# ================================================================================================ components


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # a Hugging Face folder; None: build a random-init student from the fields below
    preset: str | None = None  # a real shape with random weights (qwen2.5-0.5b | qwen2.5-1.5b | qwen2.5-7b | gemma-7b)
    arch: str = "llama"  # a built student's architecture: llama | qwen2 (q/k/v biases)
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    head_dim: int = 64  # 64 so vLLM's CPU attention takes it
    vocab_size: int | None = None  # a built student's output rows (None: the tokenizer's size); larger pads the
    #                                vocabulary to a real model's (151936: Qwen2.5's), the tokenizer's ids first
    max_position_embeddings: int = 4096
    tokenizer: str = "byte"  # a built student's tokenizer: byte (one token per byte) | arithmetic (BPE of the built-in domain)
    tokenizer_style: str = "chatml"  # chat template: chatml | llama3
    dtype: str = "float32"  # parameter dtype: float32 (master weights; bf16 autocast on CUDA) | bfloat16
    tie_embeddings: bool = False  # a built student: lm_head shares the input embedding matrix
    lora_rank: int = 0  # > 0: train LoRA adapters (peft) instead of all weights
    lora_alpha: int = 64
    liger: bool = False  # Liger-Kernel RMSNorm / SwiGLU / RoPE patches (GPU)
    gradient_checkpointing: bool = False
    activation_offload: bool = False  # the micro-batch forward's saved tensors (with checkpointing: each layer's
    #                                   input) kept in host memory until the backward (exgrpo/offload.py)
    load_in_4bit: bool = False  # QLoRA: the base's linear layers in NF4 (bitsandbytes, double quantization), LoRA
    #                             adapters on top (needs lora_rank > 0); embeddings, norms and lm_head stay in dtype

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"ModelConfig.preset must be one of {sorted(PRESETS)} or None, got {self.preset!r}")
        _one_of("ModelConfig", "arch", self.arch, ARCHS)
        if self.hidden_size % self.head_dim:
            raise ValueError(f"ModelConfig.hidden_size {self.hidden_size} is not a multiple of head_dim {self.head_dim}")
        _one_of("ModelConfig", "tokenizer", self.tokenizer, ("byte", "arithmetic"))
        _one_of("ModelConfig", "dtype", self.dtype, ("float32", "bfloat16"))
        if self.lora_rank < 0:
            raise ValueError(f"ModelConfig.lora_rank must be >= 0, got {self.lora_rank}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"ModelConfig.vocab_size must be >= 1 or None, got {self.vocab_size}")
        if self.load_in_4bit and self.lora_rank < 1:
            raise ValueError(f"ModelConfig.load_in_4bit=true trains LoRA adapters on the frozen 4-bit base: set "
                             f"lora_rank > 0 (got {self.lora_rank})")


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 96  # per assistant turn

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"SamplingConfig.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW, betas 0.9 / 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 10  # linear warm-up from lr / (warmup + 1), then cosine decay (torch's schedulers)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio (1.0: a constant rate after the warm-up)
    grad_clip: float = 1.0  # max global gradient norm
    max_nonfinite: int = 5  # steps with a non-finite loss or gradient are skipped; more than this stops the run

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class FSDPConfig:
    param_dtype: str = "float32"  # dtype parameters are gathered in for compute (bfloat16: bf16 compute, fp32 master)
    reduce_dtype: str = "float32"  # dtype of the gradient reduce-scatter
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in host memory
    reshard_after_forward: bool = True  # free gathered layers after their forward (ZeRO-3); False: keep (ZeRO-2)

    def __post_init__(self):
        for name in ("param_dtype", "reduce_dtype"):
            _one_of("FSDPConfig", name, getattr(self, name), ("float32", "bfloat16"))


@dataclass(frozen=True)
class ChatConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "teacher"
    api_key_env: str = "OPENAI_API_KEY"  # the variable holding the key (empty / unset: "EMPTY")
    max_concurrency: int = 8
    max_retries: int = 5  # the openai client's retries of 408/409/429/5xx/timeouts (its backoff, Retry-After honoured)
    timeout_s: float = 120.0
    temperature: float = 0.0
    max_tokens: int = 512

    def __post_init__(self):
        if self.max_concurrency < 1:
            raise ValueError(f"ChatConfig.max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"ChatConfig.max_retries must be >= 0, got {self.max_retries}")
        if not self.timeout_s > 0:
            raise ValueError(f"ChatConfig.timeout_s must be > 0, got {self.timeout_s}")


def _check_run(name: str, cfg) -> None:
    """The fields SFTConfig and TrainConfig share."""
    _one_of(name, "parallel", cfg.parallel, PARALLEL)
    _one_of(name, "precision", cfg.precision, PRECISIONS)
    _one_of(name, "kernel_backend", cfg.kernel_backend, KERNEL_BACKENDS)
    if cfg.micro_batch_tokens < 1:
        raise ValueError(f"{name}.micro_batch_tokens must be >= 1, got {cfg.micro_batch_tokens}")
    if cfg.model.load_in_4bit and cfg.parallel == "fsdp2":
        raise ValueError(f"{name}: model.load_in_4bit=true (QLoRA) runs with parallel=ddp, not fsdp2 (bitsandbytes' "
                         f"4-bit weights are not sharded here)")


# ================================================================================================ commands


@dataclass(frozen=True)
class SFTConfig:
    data: str = "runs/ei/d_ei.jsonl"  # D_EI dialogues (exgrpo ei)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out_dir: str = "runs/sft"  # run folder: config.yaml, metrics.jsonl, tb/, checkpoints/, final/
    format: str = "pairs"  # pairs: every (probe -> rationale) and (question -> rationale) alone (paper Eq. 3) |
    #                        dialogue: the multi-turn dialogues | pairs+dialogue: both
    epochs: int = 3  # paper ablation: 3
    max_steps: int | None = None  # stop after this many steps (default: epochs over the data)
    batch_dialogues: int = 16  # global batch, in training examples (pairs, or dialogues with format=dialogue)
    micro_batch_tokens: int = 8192  # packed tokens per forward/backward
    turns: str = "all"  # loss on all assistant turns, or "last"
    save_every: int = 0  # steps between checkpoints; 0: at the end only
    log_every: int = 1  # steps between metric records
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on the CPU) | bf16 (autocast anywhere) | fp32
    kernel_backend: str = "auto"  # fused kernels: auto (Triton on CUDA; C++ on the CPU, else torch) | triton | native | torch
    parallel: str = "ddp"  # data parallelism under torchrun: ddp | fsdp2 (sharded weights, grads, optimizer state)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    progress: bool = True  # progress bar

    def __post_init__(self):
        _one_of("SFTConfig", "turns", self.turns, ("all", "last"))
        _one_of("SFTConfig", "format", self.format, ("pairs", "dialogue", "pairs+dialogue"))
        if self.epochs < 1 or self.batch_dialogues < 1:
            raise ValueError(f"SFTConfig.epochs and batch_dialogues must be >= 1, got {self.epochs}, {self.batch_dialogues}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"SFTConfig.max_steps must be >= 0 or None, got {self.max_steps}")
        _check_run("SFTConfig", self)


@dataclass(frozen=True)
class TrainConfig:
    data: str = "runs/ei/d_ei.jsonl"  # D_EI (exgrpo ei): questions with their probes and rationales
    init: str | None = "runs/sft/final"  # the SFT model (policy start and frozen reference); None: model config
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=0))
    loss: GRPOLossConfig = field(default_factory=lambda: GRPOLossConfig(loss_type="dapo", beta=0.04, eps_low=0.2,
                                                                         eps_high=0.2, compute_entropy=True))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    out_dir: str = "runs/exgrpo"  # run folder
    steps: int = 100  # optimizer steps (one batch of questions each)
    questions_per_step: int = 8  # global
    G: int = 8  # trajectories per scenario
    k: int = 5  # probes in Scenario A
    k_partial: int = 2  # probes in Scenario B (k'); 0: the question asked directly (the evaluated condition)
    k_partial_mode: str = "fixed"  # fixed: k' = k_partial | random: k' drawn in [0, k) per question ("random truncation")
    mode: str = "dialogue"  # dialogue: Scenarios A/B | independent: each probe and the question its own prompt and
    #                         group | direct: the question alone, G samples (plain GRPO, the "SFT + RL" baseline) |
    #                         opd: on-policy distillation (the question alone; per-token advantage l_teacher - l)
    teacher: str = ""  # on-policy distillation: the teacher, a Hugging Face folder (same tokenizer as the student),
    teacher_url: str = ""  # or an OpenAI-compatible server that returns prompt_logprobs (vLLM), with its model name
    teacher_model: str = "teacher"
    opd_coef: float = 0.0  # per-token advantage + opd_coef x (l_teacher - l_student) in any mode (mode=opd: 1, alone)
    delta: float = 0.5  # DSU bonus
    nu: float = 1.0  # the bonus fires when P_full > nu * P_partial
    dsu: bool = True  # False: the same dialogues with the bonus off (delta = 0)
    probe_rewards: bool = False  # reward each student turn the domain can check, with per-turn advantages
    perm_samples: int = 16  # label permutations per question for the bonus's chance firing rate (bonus_rate_perm)
    advantage_groups: str = "question"  # normalise over all 2G rollouts of a question, or per "scenario" (G each;
    #                                     that cancels the bonus: adding delta to every correct rollout of a group
    #                                     is an affine change that (r - mean) / std removes)
    rewards: tuple[str, ...] = ("answer",)  # reward functions of the final answer, summed: answer (the outcome
    #                                          reward R_base) and/or module:function (TRL's signature, see rewards.py)
    reward_weights: tuple[float, ...] = ()  # one weight per reward function (empty: all 1)
    filter_groups: str = "off"  # dynamic sampling: questions whose rollouts all got the same reward (zero advantage)
    #                             are dropped before the training phase ("skip") or replaced by fresh questions until
    #                             the step has questions_per_step informative ones ("resample", DAPO) | off
    filter_max_rounds: int = 4  # resample: generation rounds per step at most (the first included)
    mask_truncated_completions: bool = False  # student turns cut off at max_new_tokens are left out of the loss
    overlong_buffer: int = 0  # DAPO's soft overlong punishment of the final answer over the last overlong_buffer
    #                           tokens before sampling.max_new_tokens: reward - factor * (len - (L - buffer)) / buffer
    overlong_penalty_factor: float = 1.0  # (0 buffer: off)
    aux_weight: float = 0.1  # lambda, auxiliary SFT loss on the probes' teacher rationales
    policy_turns: str = "all"  # "all" student turns or only the "final" answer turn
    updates_per_batch: int = 1  # > 1: old log-probs are computed before the first update
    micro_batch_tokens: int = 8192  # packed tokens per forward/backward
    backend: str = "auto"  # generation: auto (vllm where installed, else transformers) | transformers | vllm | vllm-server
    server_url: str = "http://127.0.0.1:8000/v1"  # vllm-server: the server (VLLM_SERVER_DEV_MODE=1,
    server_model: str = "student"  #                 --logprobs-mode processed_logprobs) and its served model name
    server_api_key_env: str = "VLLM_API_KEY"  # vllm-server: the environment variable holding the server's --api-key
    server_weight_transfer: str = "file"  # vllm-server: how weights reach it: file (safetensors on a path both read)
    #                                       | gloo | nccl (a process group with its workers; the server runs
    #                                       --weight-transfer-config '{"backend": "gloo"}' or nccl)
    server_transfer_host: str = "127.0.0.1"  # gloo / nccl: this trainer's address, as the server's workers reach it
    async_steps: int = 0  # n >= 1: the rollouts of the next n steps generated while a step trains, step s's on the
    #                       weights after step s - n (backend=vllm-server; staleness n, the generator correction
    #                       sees the behaviour log-probs; each push queued behind them, from a host copy of the
    #                       weights); 0: generate, then train
    save_every: int = 0  # steps between checkpoints; 0: at the end only
    eval_every: int = 0  # steps between greedy evaluations on eval_data (0: none); logged as eval_accuracy
    eval_data: str = ""  # arithmetic:N:SEED[:OPS] (built-in held-in test questions) or a JSONL of examples
    log_samples: int = 2  # rollout dialogues per scenario written to samples.jsonl each step (0: none)
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on the CPU) | bf16 | fp32
    kernel_backend: str = "auto"  # fused kernels: auto | triton | native | torch
    parallel: str = "ddp"  # data parallelism under torchrun: ddp | fsdp2
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    vllm_sleep_level: int = 2  # colocated vLLM on CUDA during the training phase: 1 offload weights | 2 drop them
    vllm_gpu_memory_utilization: float | None = None  # colocated vLLM's share of the card (its weights + KV cache;
    #                                                    None: 0.3 on CUDA, 0.2 on the CPU); exgrpo plan sizes it
    progress: bool = True

    def __post_init__(self):
        if self.G < 2:
            raise ValueError(f"TrainConfig.G must be >= 2 (group advantages need two trajectories), got {self.G}")
        if not 0 <= self.k_partial < self.k:
            raise ValueError(f"TrainConfig.k_partial (k') must be in [0, k={self.k}), got {self.k_partial}")
        if self.nu < 1:
            raise ValueError(f"TrainConfig.nu must be >= 1, got {self.nu}")
        if self.delta < 0:
            raise ValueError(f"TrainConfig.delta must be >= 0, got {self.delta}")
        _one_of("TrainConfig", "policy_turns", self.policy_turns, ("all", "final"))
        _one_of("TrainConfig", "advantage_groups", self.advantage_groups, ("question", "scenario"))
        _one_of("TrainConfig", "backend", self.backend, GEN_BACKENDS)
        _one_of("TrainConfig", "server_weight_transfer", self.server_weight_transfer, WEIGHT_TRANSFERS)
        if not isinstance(self.async_steps, int) or self.async_steps < 0:
            raise ValueError(f"TrainConfig.async_steps must be an integer >= 0 (0: on policy; n: the rollouts of the "
                             f"next n steps generated while a step trains), got {self.async_steps!r}")
        if self.async_steps and self.backend != "vllm-server":
            raise ValueError(f"TrainConfig.async_steps={self.async_steps} generates on a separate server while the "
                             f"trainer trains: backend must be vllm-server, got {self.backend!r}")
        if self.async_steps and self.filter_groups == "resample":
            raise ValueError(f"TrainConfig.async_steps={self.async_steps} does not combine with filter_groups=resample "
                             f"(its rounds agree across ranks mid-generation); use skip or off")
        u = self.vllm_gpu_memory_utilization
        if u is not None and not 0 < u < 1:
            raise ValueError(f"TrainConfig.vllm_gpu_memory_utilization must be in (0, 1) or None, got {u}")
        if self.updates_per_batch < 1 or self.questions_per_step < 1 or self.steps < 0:
            raise ValueError(f"TrainConfig.updates_per_batch and questions_per_step must be >= 1 and steps >= 0, got "
                             f"{self.updates_per_batch}, {self.questions_per_step}, {self.steps}")
        _one_of("TrainConfig", "k_partial_mode", self.k_partial_mode, ("fixed", "random"))
        _one_of("TrainConfig", "mode", self.mode, TRAIN_MODES)
        if self.probe_rewards and (self.loss.aggregation in ("seq_mean", "seq_sum")
                                   or self.loss.importance_sampling != "token"
                                   or self.loss.needs_sequence_pass(has_old=True)):
            raise ValueError("TrainConfig.probe_rewards gives each turn its own advantage: it needs a token-level loss "
                             f"(loss.loss_type dapo, bnpo, dr_grpo or cispo, loss.importance_sampling token), got "
                             f"{self.loss.loss_type!r} / {self.loss.importance_sampling!r}")
        if self.sampling.temperature != self.loss.temperature:
            raise ValueError(f"TrainConfig.sampling.temperature ({self.sampling.temperature}) and loss.temperature "
                             f"({self.loss.temperature}) must agree: the trainer's log-probs must be those of the "
                             f"distribution the rollouts were sampled from")
        if not self.rewards:
            raise ValueError("TrainConfig.rewards must name at least one reward function")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"TrainConfig.reward_weights has {len(self.reward_weights)} weights for "
                             f"{len(self.rewards)} reward functions {self.rewards}")
        if (self.mode == "opd" or self.opd_coef) and not (self.teacher or self.teacher_url):
            raise ValueError("TrainConfig.mode=opd / opd_coef need a teacher: teacher=<model folder> or "
                             "teacher_url=<OpenAI-compatible server>")
        if self.opd_coef < 0:
            raise ValueError(f"TrainConfig.opd_coef must be >= 0, got {self.opd_coef}")
        if (self.mode == "opd" or self.opd_coef) and (self.probe_rewards or self.loss.aggregation in
                                                      ("seq_mean", "seq_sum") or self.loss.needs_sequence_pass(True)):
            raise ValueError("TrainConfig.mode=opd / opd_coef give every token its own advantage: they need a "
                             "token-level loss (loss.loss_type dapo, bnpo, dr_grpo or cispo, importance_sampling token) "
                             "and no probe_rewards")
        _one_of("TrainConfig", "filter_groups", self.filter_groups, ("off", "skip", "resample"))
        if self.filter_max_rounds < 1:
            raise ValueError(f"TrainConfig.filter_max_rounds must be >= 1, got {self.filter_max_rounds}")
        if not 0 <= self.overlong_buffer < self.sampling.max_new_tokens:
            raise ValueError(f"TrainConfig.overlong_buffer must be in [0, sampling.max_new_tokens="
                             f"{self.sampling.max_new_tokens}), got {self.overlong_buffer}")
        if self.overlong_penalty_factor < 0:
            raise ValueError(f"TrainConfig.overlong_penalty_factor must be >= 0, got {self.overlong_penalty_factor}")
        if self.eval_every < 0:
            raise ValueError(f"TrainConfig.eval_every must be >= 0, got {self.eval_every}")
        if self.eval_every and not self.eval_data:
            raise ValueError("TrainConfig.eval_every > 0 needs eval_data (arithmetic:N:SEED or a JSONL file)")
        _check_run("TrainConfig", self)


@dataclass(frozen=True)
class EvalConfig:
    model: str = "runs/exgrpo/final"  # the model folder to evaluate
    data: tuple[str, ...] = ("arithmetic",)  # data set names, or arithmetic (held-in and reversal splits)
    data_root: str | None = None  # folder of <name>/ folders (default ../shared/data)
    split: str = "test"
    limit: int | None = 200  # examples per data set
    arith_ops: int = 2  # operations per arithmetic problem (the demo trains on 1)
    seed: int = 0
    out: str | None = None  # JSON file for the results (default <model>/eval.json)
    max_new_tokens: int = 96
    backend: str = "auto"  # generation: auto (vllm where installed) | transformers | vllm

    def __post_init__(self):
        check_data_names("EvalConfig.data", self.data)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"EvalConfig.limit must be >= 1 or null, got {self.limit}")
        _one_of("EvalConfig", "backend", self.backend, ("auto", "transformers", "vllm"))


@dataclass(frozen=True)
class EIConfig:
    data: tuple[str, ...] = ("arithmetic",)  # data set names (exgrpo.data.loaders) or "arithmetic"
    data_root: str | None = None  # folder of <name>/ folders (default ../shared/data)
    arith_ops: int = 2  # operations per problem of the built-in arithmetic domain
    split: str = "train"
    limit: int | None = 200  # examples per data set
    teacher: str = "symbolic"  # symbolic (arithmetic only) | openai | transformers
    teacher_noise: float = 0.0  # symbolic teacher: probability that a probe's rationale ends in a wrong answer
    teacher_chat: ChatConfig = field(default_factory=ChatConfig)
    teacher_model_path: str | None = None  # for teacher=transformers
    student_model_path: str | None = None  # difficulty filter (Eq. 2); None: filter off
    rules: tuple[str, ...] = RULE_NAMES
    rules_per_example: int = 10  # k rules sampled per example
    tau_hard: int = 1  # drop questions whose kept probes the student answers fewer than this many of
    out_dir: str = "runs/ei"
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        check_data_names("EIConfig.data", self.data)
        get_rules(self.rules)
        if not 1 <= self.rules_per_example <= len(self.rules):
            raise ValueError(f"EIConfig.rules_per_example must be in [1, {len(self.rules)}], got {self.rules_per_example}")
        _one_of("EIConfig", "teacher", self.teacher, ("symbolic", "openai", "transformers"))
        if self.teacher == "symbolic" and any(d != "arithmetic" for d in self.data):
            raise ValueError("EIConfig.teacher='symbolic' only knows the built-in 'arithmetic' data")
        if self.tau_hard < 0:
            raise ValueError(f"EIConfig.tau_hard must be >= 0, got {self.tau_hard}")
        if self.batch_size < 1:
            raise ValueError(f"EIConfig.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class PlanConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="qwen2.5-7b"))
    parallel: str = "fsdp2"  # ddp | fsdp2
    world_size: int = 8  # GPUs
    precision: str = "bf16"  # bf16 (autocast, fp32 master weights) | fp32
    micro_batch_tokens: int = 8192  # packed tokens per forward/backward
    memory_mode: str = "fast"  # the fused loss: fast | low_memory
    beta: float = 0.04  # KL weight: > 0 needs the reference policy
    vllm_gpu_memory_utilization: float = 0.3  # the colocated vLLM's share of the card while it generates; 0: none
    vllm_sleep_level: int = 2
    card: str = "h100"  # h100 | h200 | a100-80 | a100-40 | l40s | 4090, or a size in GiB ("96")
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: sharded weights, grads and optimizer state in host memory
    attention: str = "flash"  # flash (flash-attn / torch varlen: no [T x T]) | math (SDPA's math path, the CPU's)
    seq_len: int = 1024  # typical packed sequence length (the math path saves [heads, len, len] scores per sequence)
    fsdp_param_dtype: str = "float32"  # FSDPConfig.param_dtype: the dtype FSDP2 gathers layers in (bfloat16: no casts)
    async_steps: int = 0  # TrainConfig.async_steps (server mode): rank 0's host copies of the weights awaiting a push

    def __post_init__(self):
        _one_of("PlanConfig", "parallel", self.parallel, PARALLEL)
        if not isinstance(self.async_steps, int) or self.async_steps < 0:
            raise ValueError(f"PlanConfig.async_steps must be an integer >= 0, got {self.async_steps!r}")
        if self.world_size < 1:
            raise ValueError(f"PlanConfig.world_size must be >= 1, got {self.world_size}")
        _one_of("PlanConfig", "precision", self.precision, ("bf16", "fp32"))
        _one_of("PlanConfig", "attention", self.attention, ("flash", "math"))
        _one_of("PlanConfig", "memory_mode", self.memory_mode, ("fast", "low_memory"))
        _one_of("PlanConfig", "fsdp_param_dtype", self.fsdp_param_dtype, ("float32", "bfloat16"))
        card_gib(self.card)


# ================================================================================================ the demo

ARMS = {  # name -> the demo's TrainConfig overrides (sft_more is continued SFT; cold_* start from the untrained student)
    "rl": dict(mode="direct", dsu=False, aux_weight=0.0),  # plain GRPO on the question asked directly: "SFT + RL"
    "rl_ei": dict(mode="direct", dsu=False, aux_weight=0.0),  # the same on D_EI's questions only
    "rl_dialogue": dict(G=4, dsu=False, aux_weight=0.0),  # the probe dialogues, outcome reward only
    "rl_aux": dict(G=4, dsu=False),  # + the auxiliary SFT loss
    "exgrpo": dict(G=4, k=1, questions_per_step=4, steps=100),  # + the DSU bonus: the full method (one probe, half
    #                              the questions a step, 100 steps: a dialogue step costs about twice a direct one)
    "exgrpo_probe_rewards": dict(G=4, probe_rewards=True),
    "independent": dict(mode="independent"),  # the paper's "without r_dsu": every probe its own prompt and group
    "cold_rl": dict(mode="direct", dsu=False, aux_weight=0.0),
    "cold_rl_aux": dict(G=4, dsu=False),
}
DEFAULT_ARMS = ("sft_more", "rl", "exgrpo")
FULL_ARMS = ("sft_more", "rl", "rl_ei", "rl_dialogue", "rl_aux", "exgrpo", "exgrpo_probe_rewards", "independent")


def _demo_model() -> ModelConfig:
    return ModelConfig(hidden_size=128, intermediate_size=384, num_layers=3, head_dim=32, tokenizer="arithmetic")


def _demo_sft() -> SFTConfig:
    # to its plateau: 300 steps (~13 epochs of the (probe -> rationale) pairs of 250 questions), cosine to a tenth
    return SFTConfig(max_steps=300, batch_dialogues=32, progress=False, model=_demo_model(),
                     optim=OptimConfig(lr=2e-3, warmup_steps=10, min_lr_ratio=0.1))


def _demo_rl() -> TrainConfig:
    # G trajectories per question for every arm: 8 (direct) or 4 per scenario (dialogue: 2 x 4). beta 0 (TRL's default,
    # DAPO's choice): no reference pass, a third less time a step; lr 1e-4 (5e-5 learned about half as fast)
    return TrainConfig(steps=150, questions_per_step=8, G=8, k=2, k_partial=0, delta=0.5, nu=1.0, aux_weight=0.1,
                       optim=OptimConfig(lr=1e-4, warmup_steps=0, min_lr_ratio=1.0), model=_demo_model(),
                       loss=TrainConfig().loss.replace(beta=0.0, temperature=1.0),
                       sampling=SamplingConfig(temperature=1.0, max_new_tokens=24), backend="transformers",
                       progress=False, log_samples=1)


@dataclass(frozen=True)
class DemoConfig:
    """The built-in default: arithmetic domain, symbolic teacher, a small student, all on the CPU. ``sft`` and ``rl``
    are the SFTConfig / TrainConfig every seed and arm starts from (their data, init, out_dir and seed are set per
    seed; each arm applies its ARMS overrides to ``rl``)."""

    out_dir: str = "runs/demo"  # results.json, results.md, curves.png, and one folder per seed
    seeds: int = 4  # paired seeds (every arm of a seed starts from the same SFT checkpoint)
    workers: int = 2  # parallel processes (one torch thread each)
    quick: bool = False  # a few steps of everything (CI)
    arms: tuple[str, ...] = DEFAULT_ARMS  # besides sft (the warm-up itself); see ARMS
    full: bool = False  # every arm of the ablation (FULL_ARMS), about 3x the time
    cold_start: bool = False  # also cold_rl and cold_rl_aux (RL from the untrained student)
    n_train: int = 250  # EI questions per seed (teacher rationales and probes: the SFT data)
    n_rl_extra: int = 2250  # more training questions with only a gold answer, for the RL arms' pool
    n_eval: int = 300  # held-in test questions (and as many paraphrased, out of distribution)
    n_reversal: int = 100  # reversal questions (the floor check)
    n_probe_eval: int = 60  # held-in questions answered after 0, 1 and 2 probes
    n_ops: int = 1  # operations per problem
    rules_per_example: int = 2
    teacher_noise: float = 0.1  # probes whose rationale ends in a wrong answer: the consistency filter's catch
    tau_hard: int = 0  # difficulty filter against the untrained student (which solves nothing: 0 keeps the rest)
    model: ModelConfig = field(default_factory=_demo_model)
    sft: SFTConfig = field(default_factory=_demo_sft)  # the warm-up (its model: ``model``)
    sft_more_lr: float = 2e-4  # continued SFT (the sft_more arm): the warm-up's final rate, as many steps as an RL arm
    rl: TrainConfig = field(default_factory=_demo_rl)  # every RL arm (its model: ``model``)
    backend: str = "transformers"  # generation of the RL arms (rl.backend)

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS and a != "sft_more"]
        if unknown:
            raise ValueError(f"DemoConfig.arms: unknown arm(s) {unknown}; known: sft_more, {', '.join(ARMS)}")
        for name in ("seeds", "workers", "n_train", "n_eval"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")
        _one_of("DemoConfig", "backend", self.backend, GEN_BACKENDS)

    def resolved(self) -> DemoConfig:
        """The quick form (CI): a few steps of everything."""
        if not self.quick:
            return self
        return dataclasses.replace(
            self, seeds=1, n_train=24, n_rl_extra=16, n_eval=12, n_reversal=6, n_probe_eval=4,
            sft=dataclasses.replace(self.sft, epochs=1, max_steps=4),
            rl=dataclasses.replace(self.rl, steps=2, questions_per_step=2, G=2, eval_every=0,
                                   sampling=dataclasses.replace(self.rl.sampling, max_new_tokens=16)))

    def all_arms(self) -> list[str]:
        return list(FULL_ARMS if self.full else self.arms) + (["cold_rl", "cold_rl_aux"] if self.cold_start else [])
