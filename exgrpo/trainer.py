"""The ExGRPO trainer: SFT warm-up (``sft``), ExGRPO (``train``) and evaluation (``evaluate``).

Read top to bottom: configs, then the SFT loop, then the ExGRPO loop (rollouts -> rewards with the DSU bonus ->
advantages -> GRPO loss and auxiliary SFT loss on packed micro-batches), then evaluation. The micro-steps
(packing, the fused losses, the micro-batch loop, one policy update) are in ``exgrpo.steps``; generation goes
through a ``GenerationBackend`` (transformers here, vLLM in exgrpo.vllm_backend).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import resource
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from exgrpo import checkpoint, distributed, parallel
from exgrpo.parallel import FSDPConfig
from exgrpo.config import save_config
from exgrpo.data.answers import is_correct
from exgrpo.dialogue import DialogueTokenizer
from exgrpo.dsu import dsu_rewards
from exgrpo.generation import (GenerationBackend, SamplingConfig, TransformersBackend, assistant_texts, assistant_turn_ids,
                               last_assistant_text, multi_turn_rollouts)
from exgrpo.io import AppendLog
from exgrpo.model import ModelConfig, PolicyHidden, build_student
from exgrpo.steps import PRECISIONS, GRPOInputs, StepContext, autocast_dtype, grpo_update, sft_backward
from exgrpo_kernels import GRPOLossConfig, grouped_advantages

# ================================================================================================ configs


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW, betas 0.9 / 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 10  # linear warm-up, then cosine decay (transformers' schedule)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm
    max_nonfinite: int = 5  # steps with a non-finite loss or gradient are skipped; more than this stops the run

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def _check_common(name, cfg):
    if cfg.parallel not in parallel.PARALLEL:
        raise ValueError(f"{name}.parallel must be one of {parallel.PARALLEL}, got {cfg.parallel!r}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"{name}.precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.kernel_backend not in ("auto", "triton", "torch", "native"):
        raise ValueError(f"{name}.kernel_backend must be 'auto', 'triton', 'torch' or 'native', got "
                         f"{cfg.kernel_backend!r}")
    if cfg.micro_batch_tokens < 1:
        raise ValueError(f"{name}.micro_batch_tokens must be >= 1, got {cfg.micro_batch_tokens}")


@dataclass(frozen=True)
class SFTConfig:
    data: str = "runs/ei/d_ei.jsonl"  # D_EI dialogues (exgrpo ei)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out_dir: str = "runs/sft"  # run folder: config.yaml, metrics.jsonl, tb/, checkpoints/, final/
    format: str = "pairs"  # pairs: every (probe -> rationale) and (question -> rationale) alone (paper Eq. 3) | dialogue
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
        if self.turns not in ("all", "last"):
            raise ValueError(f"SFTConfig.turns must be 'all' or 'last', got {self.turns!r}")
        if self.format not in ("pairs", "dialogue"):
            raise ValueError(f"SFTConfig.format must be 'pairs' or 'dialogue', got {self.format!r}")
        if self.epochs < 1 or self.batch_dialogues < 1:
            raise ValueError(f"SFTConfig.epochs and batch_dialogues must be >= 1, got {self.epochs}, {self.batch_dialogues}")
        _check_common("SFTConfig", self)


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
    mode: str = "dialogue"  # dialogue: Scenarios A/B | independent: each probe and the question its own prompt and group
    delta: float = 0.5  # DSU bonus
    nu: float = 1.0  # the bonus fires when P_full > nu * P_partial
    dsu: bool = True  # False: the same dialogues with the bonus off (delta = 0)
    probe_rewards: bool = False  # reward each student turn the domain can check, with per-turn advantages
    perm_samples: int = 16  # label permutations per question for the bonus's chance firing rate (bonus_rate_perm)
    advantage_groups: str = "question"  # normalise over all 2G rollouts of a question, or per "scenario" (G each;
    #                                     that cancels the bonus: adding delta to every correct rollout of a group
    #                                     is an affine change that (r - mean) / std removes)
    aux_weight: float = 0.1  # lambda, auxiliary SFT loss on the probes' teacher rationales
    policy_turns: str = "all"  # "all" student turns or only the "final" answer turn
    updates_per_batch: int = 1  # > 1: old log-probs are computed before the first update
    micro_batch_tokens: int = 8192  # packed tokens per forward/backward
    backend: str = "auto"  # generation: auto (vllm where installed, else transformers) | transformers | vllm | vllm-server
    server_url: str = "http://127.0.0.1:8000/v1"  # vllm-server: the server (VLLM_SERVER_DEV_MODE=1,
    server_model: str = "student"  #                 --logprobs-mode processed_logprobs) and its served model name
    save_every: int = 0  # steps between checkpoints; 0: at the end only
    log_samples: int = 2  # rollout dialogues per scenario written to samples.jsonl each step (0: none)
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on the CPU) | bf16 | fp32
    kernel_backend: str = "auto"  # fused kernels: auto | triton | native | torch
    parallel: str = "ddp"  # data parallelism under torchrun: ddp | fsdp2
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    vllm_sleep_level: int = 2  # colocated vLLM on CUDA during the training phase: 1 offload weights | 2 drop them
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
        if self.policy_turns not in ("all", "final"):
            raise ValueError(f"TrainConfig.policy_turns must be 'all' or 'final', got {self.policy_turns!r}")
        if self.advantage_groups not in ("question", "scenario"):
            raise ValueError(f"TrainConfig.advantage_groups must be 'question' or 'scenario', got {self.advantage_groups!r}")
        if self.backend not in ("auto", "transformers", "vllm", "vllm-server"):
            raise ValueError(f"TrainConfig.backend must be 'auto', 'transformers', 'vllm' or 'vllm-server', "
                             f"got {self.backend!r}")
        if self.updates_per_batch < 1 or self.questions_per_step < 1 or self.steps < 0:
            raise ValueError(f"TrainConfig.updates_per_batch and questions_per_step must be >= 1 and steps >= 0, got "
                             f"{self.updates_per_batch}, {self.questions_per_step}, {self.steps}")
        if self.k_partial_mode not in ("fixed", "random"):
            raise ValueError(f"TrainConfig.k_partial_mode must be 'fixed' or 'random', got {self.k_partial_mode!r}")
        if self.mode not in ("dialogue", "independent"):
            raise ValueError(f"TrainConfig.mode must be 'dialogue' or 'independent', got {self.mode!r}")
        if self.probe_rewards and (self.loss.loss_type == "grpo" or self.loss.importance_sampling != "token"):
            raise ValueError("TrainConfig.probe_rewards gives each turn its own advantage: it needs a token-level loss "
                             f"(loss.loss_type dapo, bnpo or dr_grpo, loss.importance_sampling token), got "
                             f"{self.loss.loss_type!r} / {self.loss.importance_sampling!r}")
        if self.sampling.temperature != self.loss.temperature:
            raise ValueError(f"TrainConfig.sampling.temperature ({self.sampling.temperature}) and loss.temperature "
                             f"({self.loss.temperature}) must agree: the trainer's log-probs must be those of the "
                             f"distribution the rollouts were sampled from")
        _check_common("TrainConfig", self)


# ================================================================================================ shared pieces


def read_jsonl(path, field_name: str = "data"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{field_name}: no such file {path} (run `exgrpo ei` first)")
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def make_optimizer(model, oc: OptimConfig, total_steps: int):
    """AdamW over the trainable parameters; torch's schedulers: linear warm-up from lr / (warmup + 1) (the first
    step already learns), then cosine decay to lr * min_lr_ratio at ``total_steps``."""
    from torch.optim import lr_scheduler as S
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=oc.lr, weight_decay=oc.weight_decay, betas=(0.9, 0.95))
    w = min(oc.warmup_steps, max(0, total_steps - 1))
    cosine = S.CosineAnnealingLR(opt, T_max=max(1, total_steps - w), eta_min=oc.lr * oc.min_lr_ratio)
    if w == 0:
        return opt, cosine
    warm = S.LinearLR(opt, start_factor=1.0 / (w + 1), end_factor=1.0, total_iters=w)
    return opt, S.SequentialLR(opt, [warm, cosine], milestones=[w])


class MetricsLog:
    """metrics.jsonl and samples.jsonl (append-only, cut back to the checkpoint on resume) and TensorBoard,
    main rank only."""

    def __init__(self, out_dir, resume_step: int):
        self.main = distributed.is_main()
        self.log = self.samples = self.tb = None
        if not self.main:
            return
        self.log = self._open(os.path.join(out_dir, "metrics.jsonl"), resume_step)
        self.samples = self._open(os.path.join(out_dir, "samples.jsonl"), resume_step, key=lambda r: (r["step"], r["i"]))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except ImportError:
            self.tb = None

    @staticmethod
    def _open(path, resume_step, key=lambda r: r["step"]):
        if os.path.exists(path):  # drop steps after the checkpoint we resume from
            keep = [x for x in open(path) if x.strip() and json.loads(x)["step"] < resume_step]
            with open(path, "w") as f:
                f.writelines(keep)
        return AppendLog(path, key)

    def write(self, rec: dict):
        if not self.main:
            return
        self.log.append(rec)
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    def write_samples(self, step: int, samples: list[dict]):
        """A few full rollout dialogues of a step (bounded: each text cut to 4000 characters)."""
        if not self.main or not samples:
            return
        self.samples.extend({"step": step, "i": i, **s} for i, s in enumerate(samples))
        if self.tb is not None:
            md = "\n\n---\n\n".join(f"**{s['scenario']}** reward {s['reward']:.2f}\n\n```\n{s['text']}\n```"
                                      for s in samples)
            self.tb.add_text("rollouts", md, step)

    def close(self):
        for x in (self.log, self.samples, self.tb):
            if x is not None:
                x.close()


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


@dataclass
class NonFiniteGuard:
    """Counts steps skipped for a non-finite loss or gradient; more than ``limit`` stop the run."""

    limit: int
    count: int = 0

    def record_skip(self):
        self.count += 1
        if self.count > self.limit:
            raise RuntimeError(f"{self.count} steps with a non-finite loss or gradient (max_nonfinite={self.limit}): "
                               f"stopping")


def optimizer_step(model, opt, sched, oc: OptimConfig, loss_ok: bool | None, guard: NonFiniteGuard):
    """Clip, check, step. ``loss_ok`` None: nothing was backpropagated (the schedule still advances). A non-finite
    loss or gradient skips the step. Returns (stepped, grad_norm or None)."""
    if loss_ok is None:
        opt.zero_grad(set_to_none=True)
        sched.step()
        return False, None
    params = [p for p in model.parameters() if p.requires_grad]
    norm = parallel.clip_grad_norm(params, oc.grad_clip)
    ok = loss_ok and math.isfinite(norm)
    if ok:
        opt.step()
    else:
        guard.record_skip()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return ok, norm


def step_context(cfg, policy: PolicyHidden, device, ref: PolicyHidden | None = None) -> StepContext:
    """The micro-step context: the policy wrapped for the data parallelism of ``cfg.parallel`` (sharded in place
    under FSDP2: build the optimizer after this), a frozen reference sharded the same way."""
    module = parallel.wrap(policy, cfg.parallel, cfg.fsdp, device)
    if cfg.parallel == "fsdp2":
        if ref is not None:
            parallel.wrap(ref, "fsdp2", cfg.fsdp, device)
        # FSDP2 initialises lazily at the first forward, which must go through the root: run it here, before any
        # generation calls the inner causal LM (that would make each layer a root of its own)
        from exgrpo.steps import dummy_batch
        with torch.no_grad():
            for m in (module, ref):
                if m is not None:
                    m(dummy_batch(device))
    return StepContext(policy=policy, module=module, device=device, world=distributed.world(),
                       autocast_dtype=autocast_dtype(cfg.precision, device), kernel_backend=cfg.kernel_backend,
                       micro_batch_tokens=cfg.micro_batch_tokens, ref=ref)


def save_final(out_dir, model, tok, state_dict=None, rebuild=None):
    """HF-format model (LoRA merged) and tokenizer under out_dir/final. Sharded models pass their gathered
    ``state_dict`` and ``rebuild()`` (an unsharded copy of the architecture to load it into)."""
    path = os.path.join(out_dir, "final")
    tmp = path + ".tmp"
    m = model
    if state_dict is not None:
        m = rebuild()
        m.load_state_dict(state_dict)
        if hasattr(m, "merge_and_unload"):
            m = m.merge_and_unload()
    elif hasattr(model, "merge_and_unload"):
        import copy
        m = copy.deepcopy(model).merge_and_unload()
    m.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    import shutil
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def load_policy(model_cfg: ModelConfig, init: str | None, seed: int, device):
    mc = dataclasses.replace(model_cfg, path=init) if init else model_cfg
    return build_student(mc, seed=seed, device=device)


# ================================================================================================ SFT warm-up


def sft(cfg: SFTConfig, resume: bool = False) -> dict:
    parallel.check_launch(cfg.parallel, cfg.batch_dialogues, "batch_dialogues")
    rank, world, device = distributed.init()
    if distributed.is_main():
        save_config(cfg, cfg.out_dir)
    records = read_jsonl(cfg.data)
    model, tok = load_policy(cfg.model, None, cfg.seed, device)
    dtok = DialogueTokenizer(tok)
    data = [dtok.encode(m).tensors(cfg.turns) for m in sft_examples(records, cfg.format)]
    steps_per_epoch = math.ceil(len(data) / cfg.batch_dialogues)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    policy = PolicyHidden(model).train()
    ctx = step_context(cfg, policy, device)
    opt, sched = make_optimizer(model, cfg.optim, total)
    state, guard = {"step": 0}, NonFiniteGuard(cfg.optim.max_nonfinite)
    ck = checkpoint.latest(cfg.out_dir) if resume else None
    if ck:
        state = _restore(ck, cfg, model, opt, sched)
        guard.count = state.get("nonfinite", 0)
    log = MetricsLog(cfg.out_dir, state["step"])
    bar = tqdm(range(state["step"], total), desc="sft", disable=not (cfg.progress and distributed.is_main()))
    for step in bar:
        t0 = time.time()
        # ---- this step's examples: a permutation per epoch (deterministic: resume replays it); every rank plans
        #      the whole global batch's micro-batches and takes its own (balanced tokens, not just counts)
        epoch, pos = divmod(step, steps_per_epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
        seqs = [data[i] for i in order[pos * cfg.batch_dialogues:(pos + 1) * cfg.batch_dialogues]]
        # ---- NLL of the assistant turns, packed micro-batches, normalised by the global token count
        stats = sft_backward(ctx, seqs, global_batch=True)
        stepped, gnorm = optimizer_step(model, opt, sched, cfg.optim, stats.finite, guard)
        state.update(step=step + 1, nonfinite=guard.count)
        n_global = stats.metric_sums["num_tokens"]
        rec = {"step": step, "loss": distributed.all_sum(stats.loss), "grad_norm": gnorm, "skipped": not stepped,
               "lr": sched.get_last_lr()[0], "tokens": n_global, "tokens_per_s": n_global / (time.time() - t0),
               "peak_mem_gib": peak_memory_gib(device)}
        if step % cfg.log_every == 0 or step == total - 1:
            log.write(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        _maybe_checkpoint(cfg, step, model, tok, state, opt, sched)
    return _finish(cfg, log, model, tok, total)


def sft_examples(records, fmt: str) -> list[list[dict]]:
    """The SFT training conversations of D_EI records. "pairs" (paper Eq. 3): each probe with the teacher's
    rationale, alone, and the original question with the teacher's rationale (the condition evaluated);
    "dialogue": each record's multi-turn dialogue (probes then the question, every answer in context)."""
    if fmt == "dialogue":
        return [r["messages"] for r in records]
    out = []
    for r in records:
        for p in r["probes"]:
            out.append([{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["rationale"]}])
        out.append([{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["rationale"]}])
    return out


def _maybe_checkpoint(cfg, step, model, tok, state, opt, sched):
    if cfg.save_every and (step + 1) % cfg.save_every == 0:
        parallel.save(cfg.out_dir, step + 1, cfg.parallel, model, tok, opt, sched, state)


def _finish(cfg, log, model, tok, steps) -> dict:
    log.close()
    if cfg.parallel == "fsdp2":
        sd = parallel.full_state_dict(model)  # collective
        init = getattr(cfg, "init", None)
        final = save_final(cfg.out_dir, model, tok, state_dict=sd,
                           rebuild=lambda: load_policy(cfg.model, init, cfg.seed, "cpu")[0]) if distributed.is_main() else None
    else:
        final = save_final(cfg.out_dir, model, tok) if distributed.is_main() else None
    distributed.barrier()
    return {"steps": steps, "final": final}


def _restore(path, cfg, model, opt, sched) -> dict:
    parallel.check_layout(path, cfg.parallel)
    try:
        if cfg.parallel == "fsdp2":
            return parallel.load_fsdp2(path, model, opt, sched)
        return _restore_unchecked(path, model, opt, sched)
    except (OSError, RuntimeError, KeyError, EOFError, ValueError) as e:
        raise ValueError(f"--resume: checkpoint {path} is unreadable or from another setup: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


def _restore_unchecked(path, model, opt, sched) -> dict:
    from safetensors.torch import load_file
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    if not files:
        raise ValueError("no model weights (*.safetensors) in it")
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(path, f)))
    target = model
    if hasattr(model, "get_base_model"):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, sd)
    else:
        missing, unexpected = target.load_state_dict(sd, strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m or not model.config.tie_word_embeddings]:
            raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    st = checkpoint.load_state(path)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    checkpoint.set_rng_state(st["rng"])
    return dict(st["state"])


# ================================================================================================ ExGRPO


@dataclass
class RolloutBatch:
    """The training sequences of one step (this rank). S sequences; T_i tokens each.

    ids:        S tensors [T_i] int64, the dialogue tokens
    mask:       S tensors [T_i] bool, the tokens the policy loss covers (student turns)
    gen_logp:   S tensors [T_i] fp32, generator log-prob of each token (0 where not generated)
    advantages: [S] fp32
    """

    ids: list
    mask: list
    gen_logp: list
    advantages: torch.Tensor
    turn_ids: list | None = None  # S tensors [T_i] int64: assistant turn of each token (-1 outside), with turn_advantages
    turn_advantages: list | None = None  # S tensors [n_turns_i] fp32: per-turn credit (probe_rewards)

    def inputs(self) -> GRPOInputs:
        return GRPOInputs(seqs=list(zip(self.ids, self.mask)), advantages=self.advantages, gen_logp=self.gen_logp,
                          turn_ids=self.turn_ids, turn_advantages=self.turn_advantages)


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    parallel.check_launch(cfg.parallel, cfg.questions_per_step, "questions_per_step")
    rank, world, device = distributed.init()
    if distributed.is_main():
        save_config(cfg, cfg.out_dir)
    questions = [r for r in read_jsonl(cfg.data) if r["probes"]]
    model, tok = load_policy(cfg.model, cfg.init, cfg.seed, device)
    ref = None
    if cfg.loss.beta != 0 and cfg.model.lora_rank == 0:
        ref, _ = load_policy(cfg.model, cfg.init, cfg.seed, device)  # the frozen reference: the same start
        ref = PolicyHidden(ref.requires_grad_(False).eval()).eval()
    dtok = DialogueTokenizer(tok)
    policy = PolicyHidden(model).train()
    ctx = step_context(cfg, policy, device, ref=ref)
    # with LoRA the reference is the policy with its adapters disabled: one copy of the weights
    ctx.ref_from_adapters_off = cfg.loss.beta != 0 and cfg.model.lora_rank > 0
    opt, sched = make_optimizer(model, cfg.optim, cfg.steps)
    backend = make_backend(cfg, model, tok, dtok, fsdp_root=ctx.module if cfg.parallel == "fsdp2" else None)
    state, guard = {"step": 0}, NonFiniteGuard(cfg.optim.max_nonfinite)
    ck = checkpoint.latest(cfg.out_dir) if resume else None
    if ck:
        state = _restore(ck, cfg, model, opt, sched)
        guard.count = state.get("nonfinite", 0)
        backend.sync_weights(model)
    log = MetricsLog(cfg.out_dir, state["step"])
    bar = tqdm(range(state["step"], cfg.steps), desc="exgrpo", disable=not (cfg.progress and distributed.is_main()))
    for step in bar:
        t0 = time.time()
        # ---- 1. questions of this step (deterministic in the step: resume replays it exactly)
        rng = random.Random(f"{cfg.seed}-{step}")
        picked = rng.sample(range(len(questions)), min(cfg.questions_per_step, len(questions)))[rank::world]
        plan = [scenarios(questions[i], cfg, random.Random(f"{cfg.seed}-{step}-{i}")) for i in picked]
        # ---- 2. rollouts: the student answers every user turn (dialogue: G x Scenario A + G x Scenario B per question;
        #         independent: G x each probe and G x the question, each on its own)
        prompts = build_prompts(plan, cfg)
        dialogues = multi_turn_rollouts(backend, dtok, [p.turns for p in prompts], cfg.sampling,
                                        seed=(cfg.seed * 1_000_003 + step) * 64 + rank)
        t_gen = time.time()
        # ---- 3. rewards (outcome; DSU bonus; per-turn with probe_rewards) and group advantages
        scored = score_rollouts(cfg, prompts, dialogues, dtok, random.Random(f"perm-{cfg.seed}-{step}-{rank}"))
        batch = _rollout_batch(dialogues, scored, cfg.policy_turns)
        aux = [dtok.encode(p["aux_messages"]).tensors("all") for p in plan] if cfg.aux_weight > 0 else []
        t_score = time.time()
        backend.sleep()  # vLLM on CUDA frees its memory while we train
        # ---- 4. training phase: reference log-probs once, then GRPO loss (+ lambda x aux SFT) on packed micro-batches
        upd = grpo_update(ctx, batch.inputs(), aux, cfg.loss, cfg.aux_weight, cfg.updates_per_batch,
                          lambda ok: optimizer_step(model, opt, sched, cfg.optim, ok, guard))
        backend.sync_weights(model)
        state.update(step=step + 1, nonfinite=guard.count)
        t_end = time.time()
        # ---- 5. metrics, samples and checkpoints
        n_tok = distributed.all_sum(sum(int(m.sum()) for m in batch.mask))
        resp = [sum(d.generated) / max(1, sum(r == "assistant" for r in d.roles)) for d in dialogues]
        rec = {"step": step, **upd.record(), **{k: _gmean(v) for k, v in sorted(scored.metrics.items())},
               "adv_abs_mean": _gmean(batch.advantages.abs().tolist()), "response_tokens": _gmean(resp),
               "tokens_per_s": n_tok / (t_end - t0), "time_gen_s": t_gen - t0, "time_score_s": t_score - t_gen,
               "time_train_s": t_end - t_score, "lr": sched.get_last_lr()[0], "peak_mem_gib": peak_memory_gib(device)}
        log.write(rec)
        log.write_samples(step, _samples(cfg, prompts, dialogues, scored.rewards, dtok))
        bar.set_postfix(reward=f"{rec['reward_question']:.2f}")
        _maybe_checkpoint(cfg, step, model, tok, state, opt, sched)
    backend.close()
    return _finish(cfg, log, model, tok, cfg.steps)


def _gmean(xs):
    return distributed.all_sum(sum(xs)) / max(1, distributed.all_sum(len(xs)))


def scenarios(q: dict, cfg: TrainConfig, rng: random.Random) -> dict:
    """k probes of the question (shuffled); Scenario A poses all k, then the question; Scenario B the first k'."""
    probes = list(q["probes"])
    rng.shuffle(probes)
    k = min(cfg.k, len(probes))
    kp = rng.randrange(0, k) if cfg.k_partial_mode == "random" else min(cfg.k_partial, k - 1)
    aux = []
    for p in probes[:k]:
        aux += [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["rationale"]}]
    return {"question": q["question"], "answer": q["answer"], "answer_type": q["answer_type"], "probes": probes[:k],
            "k_partial": kp, "aux_messages": aux}


@dataclass
class Prompt:
    """One trajectory to roll out: its user turns, and what each assistant turn's answer should be."""

    question: int  # index of its question in the step's plan
    scenario: str  # "A" | "B" (dialogue mode) | "probe" | "question" (independent mode)
    turns: list  # user messages, in order
    answers: list  # [(answer, answer_type)] per assistant turn; the last is the question's
    probe_ids: list  # per assistant turn: the index of its probe in the question's list, or -1 for the question


def build_prompts(plan: list[dict], cfg: TrainConfig) -> list[Prompt]:
    out = []
    for qi, p in enumerate(plan):
        q = (p["answer"], p["answer_type"])
        if cfg.mode == "independent":
            for j, pr in enumerate(p["probes"]):
                out += [Prompt(qi, "probe", [pr["question"]], [(pr["answer"], pr["answer_type"])], [j])] * cfg.G
            out += [Prompt(qi, "question", [p["question"]], [q], [-1])] * cfg.G
            continue
        for scen, n in (("A", len(p["probes"])), ("B", p["k_partial"])):
            probes = p["probes"][:n]
            out += [Prompt(qi, scen, [x["question"] for x in probes] + [p["question"]],
                           [(x["answer"], x["answer_type"]) for x in probes] + [q], list(range(n)) + [-1])] * cfg.G
    return out


@dataclass
class Scored:
    """Rewards and advantages of one step's rollouts (this rank).

    rewards:        [S] total reward of each trajectory (its final answer, + the bonus)
    advantages:     [S] sequence advantages (used when turn_advantages is None)
    turn_advantages: S lists, one advantage per assistant turn (probe_rewards), or None
    metrics:        name -> list of values, averaged over ranks for the log
    """

    rewards: list
    advantages: torch.Tensor
    turn_advantages: list | None
    metrics: dict


def score_rollouts(cfg: TrainConfig, prompts: list[Prompt], dialogues, dtok, rng: random.Random) -> Scored:
    """Outcome rewards of the final answers (and of each checkable turn with probe_rewards), the DSU bonus in
    dialogue mode, and group advantages. Groups: dialogue mode, a question's 2G rollouts (both scenarios: the bonus
    must survive normalisation) or per scenario (advantage_groups); per-turn credit, each probe's answers across
    the trajectories that asked it, and the final answers; independent mode, each prompt's G samples."""
    texts = [assistant_texts(dtok, d) for d in dialogues]
    correct = [[float(is_correct(t, a, at)) for t, (a, at) in zip(ts, p.answers)] for ts, p in zip(texts, prompts)]
    final = [c[-1] for c in correct]
    metrics: dict = {"reward_question": [], "reward_probes": [x for c in correct for x in c[:-1]]}
    total = list(final)
    seq_group = [0] * len(prompts)
    n_q = max((p.question for p in prompts), default=-1) + 1
    by_q = [[i for i, p in enumerate(prompts) if p.question == q] for q in range(n_q)]
    for qi, idx in enumerate(by_q):
        if cfg.mode == "independent":
            for i in idx:
                seq_group[i] = 2 * (qi * 64 + (prompts[i].probe_ids[0] + 1))
            metrics["reward_question"] += [final[i] for i in idx if prompts[i].scenario == "question"]
            metrics["reward_probes"] += [final[i] for i in idx if prompts[i].scenario == "probe"]
            continue
        ia = [i for i in idx if prompts[i].scenario == "A"]
        ib = [i for i in idx if prompts[i].scenario == "B"]
        base_a, base_b = [final[i] for i in ia], [final[i] for i in ib]
        r = dsu_rewards(base_a, base_b, delta=cfg.delta, nu=cfg.nu, enabled=cfg.dsu)
        for i, v in zip(ia + ib, r.total_a + r.total_b):
            total[i] = v
            seq_group[i] = 2 * qi + (cfg.advantage_groups == "scenario" and prompts[i].scenario == "B")
        metrics["reward_question"] += base_a + base_b
        metrics.setdefault("reward_base_A", []).extend(base_a)
        metrics.setdefault("reward_base_B", []).extend(base_b)
        metrics.setdefault("bonus_rate", []).append(float(r.p_full > cfg.nu * r.p_partial))  # the gate (dsu on or off)
        metrics.setdefault("bonus_rate_perm", []).append(perm_firing(base_a + base_b, len(base_a), cfg, rng))
        metrics.setdefault("p_full", []).append(r.p_full)
        metrics.setdefault("p_partial", []).append(r.p_partial)
    metrics["reward"] = list(total)
    adv = grouped_advantages(torch.tensor(total), torch.tensor(seq_group)) if total else torch.zeros(0)
    turn_adv = None
    if cfg.probe_rewards:
        vals, groups, where = [], [], []
        for i, p in enumerate(prompts):
            for j, pid in enumerate(p.probe_ids):
                last = j == len(p.probe_ids) - 1
                vals.append(total[i] if last else correct[i][j])
                groups.append(seq_group[i] * 1000 + (999 if last else pid))
                where.append((i, j))
        ta = grouped_advantages(torch.tensor(vals), torch.tensor(groups)).tolist() if vals else []
        turn_adv = [[0.0] * len(p.probe_ids) for p in prompts]
        for (i, j), v in zip(where, ta):
            turn_adv[i][j] = v
    return Scored(total, adv, turn_adv, metrics)


def perm_firing(base: list, n_a: int, cfg: TrainConfig, rng: random.Random) -> float:
    """How often the bonus would fire with the scenario labels shuffled among the question's 2G rollouts: its
    chance rate when the scenarios do not differ (the baseline for bonus_rate)."""
    fired = 0
    for _ in range(cfg.perm_samples):
        x = list(base)
        rng.shuffle(x)
        a, b = x[:n_a], x[n_a:]
        fired += (sum(a) / len(a)) > cfg.nu * (sum(b) / len(b))
    return fired / max(1, cfg.perm_samples)


def _rollout_batch(dialogues, scored: Scored, policy_turns) -> RolloutBatch:
    ids, mask, glp, turns = [], [], [], []
    for d in dialogues:
        ids.append(torch.tensor(d.input_ids, dtype=torch.int64))
        mask.append(torch.tensor(d.token_mask("all" if policy_turns == "all" else "last"), dtype=torch.bool))
        glp.append(torch.tensor(d.logprobs, dtype=torch.float32))
        turns.append(torch.tensor(assistant_turn_ids(d), dtype=torch.int64))
    ta = None if scored.turn_advantages is None else [torch.tensor(t, dtype=torch.float32) for t in scored.turn_advantages]
    return RolloutBatch(ids, mask, glp, scored.advantages.float(), turn_ids=turns if ta is not None else None,
                        turn_advantages=ta)


def _samples(cfg: TrainConfig, prompts, dialogues, rewards, dtok) -> list[dict]:
    """The first ``log_samples`` rollouts of each scenario (or prompt kind) of the first question of this rank."""
    if not cfg.log_samples or not prompts:
        return []
    out, seen = [], {}
    for p, d, r in zip(prompts, dialogues, rewards):
        if p.question != 0 or seen.get(p.scenario, 0) >= cfg.log_samples:
            continue
        seen[p.scenario] = seen.get(p.scenario, 0) + 1
        out.append({"scenario": p.scenario, "reward": r, "answer": p.answers[-1][0],
                    "text": dtok.tok.decode(d.input_ids)[:4000]})
    return out


def make_backend(cfg: TrainConfig, model, tok, dtok, fsdp_root=None) -> GenerationBackend:
    backend = cfg.backend
    if backend == "auto":
        import importlib.util
        backend = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    if backend == "vllm":
        from exgrpo.vllm_backend import VLLMBackend
        return VLLMBackend.from_model(model, tok, dtok.eot, seed=cfg.seed, sleep_level=cfg.vllm_sleep_level)
    if backend == "vllm-server":
        from exgrpo.vllm_backend import VLLMServerBackend
        be = VLLMServerBackend(cfg.server_url, cfg.server_model, tok, dtok.eot)
        be.sync_weights(model)  # the server starts from the policy's weights
        return be
    dev = next(model.parameters()).device
    return TransformersBackend(model, tok, dtok.eot, autocast_dtype=autocast_dtype(cfg.precision, dev),
                               sync_ranks=cfg.parallel == "fsdp2" and distributed.world() > 1, fsdp_root=fsdp_root)


# ================================================================================================ evaluation


def evaluate(model, tok, examples, *, batch_size: int = 64, max_new_tokens: int = 96,
             backend: GenerationBackend | None = None, answers: list | None = None) -> dict:
    """Greedy accuracy per data set: the student answers each question directly (no probes). With vLLM every
    question of every data set goes in one batched request; with transformers, batches of ``batch_size``.
    ``answers``: a list that receives each example's generated answer text, in order."""
    dtok = DialogueTokenizer(tok)
    backend = backend or TransformersBackend(model, tok, dtok.eot, batch_size=batch_size)
    sc = SamplingConfig(max_new_tokens=max_new_tokens)
    step = len(examples) if not isinstance(backend, TransformersBackend) else batch_size
    res: dict = {}
    for i in range(0, len(examples), max(1, step)):
        chunk = examples[i:i + step]
        ds = multi_turn_rollouts(backend, dtok, [[e.question] for e in chunk], sc, greedy=True)
        for e, d in zip(chunk, ds):
            text = last_assistant_text(dtok, d)
            if answers is not None:
                answers.append(text)
            r = res.setdefault(e.dataset, [0, 0])
            r[0] += is_correct(text, e.answer, e.answer_type)
            r[1] += 1
    return {k: {"accuracy": c / n, "correct": c, "n": n} for k, (c, n) in res.items()}
