"""The ExGRPO trainer: SFT warm-up (``sft``), ExGRPO (``train``) and evaluation (``evaluate``).

Read top to bottom: configs, then the SFT loop, then the ExGRPO loop (rollouts -> rewards with the DSU bonus ->
advantages -> GRPO loss and auxiliary SFT loss on packed micro-batches), then evaluation. Every log-prob and
loss goes through this project's kernels (fused_linear_logprobs, fused_linear_grpo_loss, grouped_advantages,
pack_sequences); generation goes through a backend (transformers here, vLLM in exgrpo.vllm_backend).
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

from exgrpo import checkpoint, distributed
from exgrpo.config import save_config
from exgrpo.data.answers import is_correct
from exgrpo.dialogue import DialogueTokenizer
from exgrpo.dsu import dsu_rewards
from exgrpo.generation import SamplingConfig, TransformersBackend, last_assistant_text, multi_turn_rollouts
from exgrpo.io import AppendLog
from exgrpo.model import ModelConfig, PolicyHidden, base_causal_lm, build_student
from exgrpo.packing import plan_micro_batches
from kernels import GRPOLossConfig, fused_linear_grpo_loss, fused_linear_logprobs, grouped_advantages, pack_sequences

# ================================================================================================ configs


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    max_nonfinite: int = 5  # steps with a non-finite loss or gradient are skipped; more than this stops the run

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True)
class SFTConfig:
    data: str = "runs/ei/d_ei.jsonl"  # D_EI dialogues (exgrpo ei)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out_dir: str = "runs/sft"
    epochs: int = 3  # paper ablation: 3
    max_steps: int | None = None
    batch_dialogues: int = 16  # global batch, in dialogues
    micro_batch_tokens: int = 8192  # packed tokens per forward/backward
    turns: str = "all"  # loss on all assistant turns, or "last"
    save_every: int = 0  # steps; 0: at the end only
    log_every: int = 1
    seed: int = 0
    bf16: bool = True  # autocast on CUDA
    progress: bool = True

    def __post_init__(self):
        if self.turns not in ("all", "last"):
            raise ValueError(f"SFTConfig.turns must be 'all' or 'last', got {self.turns!r}")
        if self.epochs < 1 or self.batch_dialogues < 1 or self.micro_batch_tokens < 1:
            raise ValueError("SFTConfig.epochs, batch_dialogues and micro_batch_tokens must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    data: str = "runs/ei/d_ei.jsonl"
    init: str | None = "runs/sft/final"  # the SFT model (policy start and frozen reference); None: model config
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=0))
    loss: GRPOLossConfig = field(default_factory=lambda: GRPOLossConfig(loss_type="dapo", beta=0.04, eps_low=0.2,
                                                                         eps_high=0.2, compute_entropy=True))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    out_dir: str = "runs/exgrpo"
    steps: int = 100
    questions_per_step: int = 8  # global
    G: int = 8  # trajectories per scenario
    k: int = 5  # probes in Scenario A
    k_partial: int = 2  # probes in Scenario B (k')
    delta: float = 0.5  # DSU bonus
    nu: float = 1.0
    dsu: bool = True  # False: ExGRPO without the bonus
    advantage_groups: str = "question"  # normalise over all 2G rollouts of a question, or per "scenario" (G each;
    #                                     that cancels the bonus: adding delta to every correct rollout of a group
    #                                     is an affine change that (r - mean) / std removes)
    aux_weight: float = 0.1  # lambda, auxiliary SFT loss on the probes' teacher rationales
    policy_turns: str = "all"  # "all" student turns or only the "final" answer turn
    updates_per_batch: int = 1  # > 1: old log-probs are computed before the first update
    micro_batch_tokens: int = 8192
    backend: str = "auto"  # auto (vllm where installed, else transformers) | transformers | vllm | vllm-server
    server_url: str = "http://127.0.0.1:8000/v1"  # vllm-server: the server (VLLM_SERVER_DEV_MODE=1,
    server_model: str = "student"  #                 --logprobs-mode processed_logprobs) and its served model name
    save_every: int = 0
    seed: int = 0
    bf16: bool = True
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
            raise ValueError("TrainConfig.updates_per_batch and questions_per_step must be >= 1, steps >= 0")


# ================================================================================================ shared pieces


def read_jsonl(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"no data at {path} (run `exgrpo ei` first)")
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def make_optimizer(model, oc: OptimConfig, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=oc.lr, weight_decay=oc.weight_decay, betas=(0.9, 0.95))

    def schedule(step):
        if step < oc.warmup_steps:
            return (step + 1) / (oc.warmup_steps + 1)
        t = (step - oc.warmup_steps) / max(1, total_steps - oc.warmup_steps)
        return oc.min_lr_ratio + (1 - oc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


class MetricsLog:
    """metrics.jsonl (append-only, cut back to the checkpoint on resume) and TensorBoard, main rank only."""

    def __init__(self, out_dir, resume_step: int):
        self.main = distributed.is_main()
        self.log = None
        self.tb = None
        if not self.main:
            return
        path = os.path.join(out_dir, "metrics.jsonl")
        if os.path.exists(path):  # drop steps after the checkpoint we resume from
            keep = [x for x in open(path) if x.strip() and json.loads(x)["step"] < resume_step]
            with open(path, "w") as f:
                f.writelines(keep)
        self.log = AppendLog(path, lambda r: r["step"])
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except ImportError:
            self.tb = None

    def write(self, rec: dict):
        if not self.main:
            return
        self.log.append(rec)
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self):
        if self.log:
            self.log.close()
        if self.tb:
            self.tb.close()


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def autocast(device, enabled):
    return torch.autocast("cuda", dtype=torch.bfloat16) if (enabled and device.type == "cuda") else torch.autocast(
        "cpu", enabled=False)


def micro_batches(lengths, max_tokens):
    """This rank's micro-batches (lists of indices); every rank runs the same count (DDP)."""
    plan = plan_micro_batches(lengths, max_tokens, truncate=True)
    k = int(distributed.all_max(plan.num_micro_batches))
    if k != plan.num_micro_batches:
        plan = plan_micro_batches(lengths, max_tokens, truncate=True, min_micro_batches=k)
    return plan.plan[0]


def optimizer_step(model, opt, sched, oc: OptimConfig, loss_ok: bool, state: dict) -> tuple[bool, float]:
    """Clip, check, step. A non-finite loss or gradient skips the step; too many stop the run."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = float(torch.nn.utils.clip_grad_norm_(params, oc.grad_clip))
    ok = loss_ok and math.isfinite(norm)
    if ok:
        opt.step()
    else:
        state["nonfinite"] = state.get("nonfinite", 0) + 1
        if state["nonfinite"] > oc.max_nonfinite:
            raise RuntimeError(f"{state['nonfinite']} steps with a non-finite loss or gradient "
                               f"(max_nonfinite={oc.max_nonfinite}): stopping")
    opt.zero_grad(set_to_none=True)
    sched.step()
    return ok, norm


def wrap_ddp(policy: PolicyHidden, device):
    if distributed.world() == 1:
        return policy
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(module, last: bool):
    import contextlib
    return module.no_sync() if (hasattr(module, "no_sync") and not last) else contextlib.nullcontext()


def save_final(out_dir, model, tok):
    """HF-format model (LoRA merged) and tokenizer under out_dir/final."""
    path = os.path.join(out_dir, "final")
    tmp = path + ".tmp"
    m = model
    if hasattr(model, "merge_and_unload"):
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
    rank, world, device = distributed.init()
    if distributed.is_main():
        save_config(cfg, cfg.out_dir)
    model, tok = load_policy(cfg.model, None, cfg.seed, device)
    dtok = DialogueTokenizer(tok)
    records = read_jsonl(cfg.data)
    data = [dtok.encode(r["messages"]).tensors(cfg.turns) for r in records]
    steps_per_epoch = math.ceil(len(data) / cfg.batch_dialogues)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    policy = PolicyHidden(model).train()
    ddp = wrap_ddp(policy, device)
    opt, sched = make_optimizer(model, cfg.optim, total)
    state = {"step": 0}
    ck = checkpoint.latest(cfg.out_dir) if resume else None
    if ck:
        state = _restore(ck, model, opt, sched)
    log = MetricsLog(cfg.out_dir, state["step"])
    bar = tqdm(range(state["step"], total), desc="sft", disable=not (cfg.progress and distributed.is_main()))
    for step in bar:
        t0 = time.time()
        epoch, pos = divmod(step, steps_per_epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
        batch_idx = order[pos * cfg.batch_dialogues:(pos + 1) * cfg.batch_dialogues][rank::world]
        seqs = [data[i] for i in batch_idx]
        n_local = sum(int(m[1:].sum()) for _, m in seqs)
        n_global = distributed.all_sum(n_local)
        total_loss, ok = 0.0, True
        mbs = micro_batches([len(s[0]) for s in seqs], cfg.micro_batch_tokens)
        for j, mb in enumerate(mbs):
            with no_sync(ddp, j == len(mbs) - 1):
                loss = _nll_loss(ddp, policy, [seqs[i] for i in mb], n_global, world, device, cfg.bf16)
                loss.backward()
            total_loss += float(loss.detach()) / world
            ok &= math.isfinite(float(loss.detach()))
        stepped, gnorm = optimizer_step(model, opt, sched, cfg.optim, ok, state)
        state["step"] = step + 1
        rec = {"step": step, "loss": distributed.all_sum(total_loss), "grad_norm": gnorm, "skipped": not stepped,
               "lr": sched.get_last_lr()[0], "tokens": n_global, "tokens_per_s": n_global / (time.time() - t0),
               "peak_mem_gib": peak_memory_gib(device)}
        if step % cfg.log_every == 0 or step == total - 1:
            log.write(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        _maybe_checkpoint(cfg, step, model, tok, state, opt, sched)
    return _finish(cfg, log, model, tok, total)


def _nll_loss(ddp, policy, seqs, n_global, world, device, bf16):
    """Sum of -log p over the masked tokens of these sequences / global count (x world: DDP averages)."""
    if not seqs:  # this rank has fewer sequences than micro-batches: a zero loss keeps DDP in step
        return sum(p.sum() for p in policy.parameters() if p.requires_grad) * 0.0
    b = pack_sequences([s[0] for s in seqs], token_mask=[s[1] for s in seqs]).to(device)
    with autocast(device, bf16):
        h = ddp(b)
    logp = fused_linear_logprobs(h, policy.lm_head, torch.where(b.loss_mask, b.targets, -100))
    return -(logp.sum()) / max(n_global, 1) * world


def _maybe_checkpoint(cfg, step, model, tok, state, opt, sched):
    if cfg.save_every and (step + 1) % cfg.save_every == 0 and distributed.is_main():
        checkpoint.save(cfg.out_dir, step + 1, model, tok, _trainer_state(state, opt, sched))


def _finish(cfg, log, model, tok, steps) -> dict:
    log.close()
    final = save_final(cfg.out_dir, model, tok) if distributed.is_main() else None
    distributed.barrier()
    return {"steps": steps, "final": final}


def _trainer_state(state, opt, sched):
    return {"state": dict(state), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}


def _restore(path, model, opt, sched) -> dict:
    from safetensors.torch import load_file
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
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
            raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
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


def train(cfg: TrainConfig, resume: bool = False, eval_sets=None) -> dict:
    rank, world, device = distributed.init()
    if distributed.is_main():
        save_config(cfg, cfg.out_dir)
    model, tok = load_policy(cfg.model, cfg.init, cfg.seed, device)
    ref, _ = load_policy(cfg.model, cfg.init, cfg.seed, device)  # the frozen reference: the same start
    ref.requires_grad_(False).eval()
    dtok = DialogueTokenizer(tok)
    questions = [r for r in read_jsonl(cfg.data) if r["probes"]]
    policy = PolicyHidden(model).train()
    ref_h = PolicyHidden(ref).eval()
    ddp = wrap_ddp(policy, device)
    opt, sched = make_optimizer(model, cfg.optim, cfg.steps)
    backend = make_backend(cfg, model, tok, dtok)
    state = {"step": 0}
    ck = checkpoint.latest(cfg.out_dir) if resume else None
    if ck:
        state = _restore(ck, model, opt, sched)
        backend.sync_weights(model)
    log = MetricsLog(cfg.out_dir, state["step"])
    bar = tqdm(range(state["step"], cfg.steps), desc="exgrpo", disable=not (cfg.progress and distributed.is_main()))
    for step in bar:
        t0 = time.time()
        # ---- 1. questions of this step (deterministic in the step: resume replays it exactly)
        rng = random.Random(f"{cfg.seed}-{step}")
        picked = rng.sample(range(len(questions)), min(cfg.questions_per_step, len(questions)))[rank::world]
        plan = [_scenarios(questions[i], cfg, random.Random(f"{cfg.seed}-{step}-{i}")) for i in picked]
        # ---- 2. rollouts: G trajectories of Scenario A and of Scenario B per question, turn by turn
        turns = [t for p in plan for t in [p["A"]] * cfg.G + [p["B"]] * cfg.G]
        dialogues = multi_turn_rollouts(backend, dtok, turns, cfg.sampling, seed=hash((cfg.seed, step, rank)) % 2**31)
        t_gen = time.time()
        # ---- 3. rewards: outcome of the final answer, DSU bonus, group advantages (group: the question's 2G rollouts)
        rewards, groups, stats = [], [], []
        for qi, p in enumerate(plan):
            ds = dialogues[qi * 2 * cfg.G:(qi + 1) * 2 * cfg.G]
            base = [float(is_correct(last_assistant_text(dtok, d), p["answer"], p["answer_type"])) for d in ds]
            r = dsu_rewards(base[:cfg.G], base[cfg.G:], delta=cfg.delta, nu=cfg.nu, enabled=cfg.dsu)
            rewards += r.total_a + r.total_b
            groups += [2 * qi] * cfg.G + [2 * qi + (cfg.advantage_groups == "scenario")] * cfg.G
            stats.append((r, base))
        adv = grouped_advantages(torch.tensor(rewards), torch.tensor(groups)) if rewards else torch.zeros(0)
        batch = _rollout_batch(dialogues, adv, cfg.policy_turns)
        aux = [dtok.encode(p["aux_messages"]).tensors("all") for p in plan] if cfg.aux_weight > 0 else []
        t_score = time.time()
        if hasattr(backend, "sleep"):
            backend.sleep()  # vLLM on CUDA frees its KV cache while we train
        # ---- 4. training phase: GRPO loss (+ lambda x aux SFT) on packed micro-batches
        m = _update(cfg, ddp, policy, ref_h, batch, aux, opt, sched, state, world, device)
        backend.sync_weights(model)
        state["step"] = step + 1
        t_end = time.time()
        # ---- 5. metrics and checkpoints
        n_tok = distributed.all_sum(sum(int(x.sum()) for x in batch.mask))
        resp = [sum(d.generated) / max(1, sum(r == "assistant" for r in d.roles)) for d in dialogues]
        rec = {"step": step, **m,
               "reward": _gmean([x for r, _ in stats for x in r.total_a + r.total_b]),
               "reward_base_A": _gmean([x for _, b in stats for x in b[:cfg.G]]),
               "reward_base_B": _gmean([x for _, b in stats for x in b[cfg.G:]]),
               "bonus_rate": _gmean([float(r.bonus > 0) for r, _ in stats]),
               "p_full": _gmean([r.p_full for r, _ in stats]), "p_partial": _gmean([r.p_partial for r, _ in stats]),
               "adv_abs_mean": _gmean(adv.abs().tolist()), "response_tokens": _gmean(resp),
               "tokens_per_s": n_tok / (t_end - t0), "time_gen_s": t_gen - t0, "time_score_s": t_score - t_gen,
               "time_train_s": t_end - t_score, "lr": sched.get_last_lr()[0], "peak_mem_gib": peak_memory_gib(device)}
        log.write(rec)
        bar.set_postfix(reward=f"{rec['reward_base_A']:.2f}")
        _maybe_checkpoint(cfg, step, model, tok, state, opt, sched)
    if hasattr(backend, "close"):
        backend.close()
    return _finish(cfg, log, model, tok, cfg.steps)


def _gmean(xs):
    return distributed.all_sum(sum(xs)) / max(1, distributed.all_sum(len(xs)))


def _scenarios(q: dict, cfg: TrainConfig, rng: random.Random) -> dict:
    """Scenario A: k probes then the question; Scenario B: the first k' of them then the question."""
    probes = list(q["probes"])
    rng.shuffle(probes)
    k = min(cfg.k, len(probes))
    kp = min(cfg.k_partial, k - 1)
    a = [p["question"] for p in probes[:k]] + [q["question"]]
    b = [p["question"] for p in probes[:kp]] + [q["question"]]
    aux = []
    for p in probes[:k]:
        aux += [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["rationale"]}]
    return {"A": a, "B": b, "answer": q["answer"], "answer_type": q["answer_type"], "aux_messages": aux}


def _rollout_batch(dialogues, adv, policy_turns) -> RolloutBatch:
    ids, mask, glp = [], [], []
    for d in dialogues:
        ids.append(torch.tensor(d.input_ids, dtype=torch.int64))
        mask.append(torch.tensor(d.token_mask("all" if policy_turns == "all" else "last"), dtype=torch.bool))
        glp.append(torch.tensor(d.logprobs, dtype=torch.float32))
    return RolloutBatch(ids, mask, glp, adv.float())


def _gen_logp_packed(gen, device):
    """The sequences' generator log-probs per token, [T_i] each -> packed [N] aligned with the targets
    (position i scores token i+1)."""
    return torch.cat([torch.cat([g[1:], g.new_zeros(1)]) for g in gen]).to(device)


def grpo_micro_batch_loss(ddp, policy, ref_h, seqs, adv, gen, loss_cfg, n_global, world, device, bf16, old=None):
    """GRPO loss of one packed micro-batch (x world: DDP averages gradients). seqs: [(ids, mask)], adv [s],
    gen: s tensors of generator log-probs per token. Returns (loss, metrics, per-token log-probs)."""
    b = pack_sequences([s[0] for s in seqs], token_mask=[s[1] for s in seqs]).to(device)
    ref_logp = None
    if loss_cfg.beta != 0:
        with torch.no_grad(), autocast(device, bf16):
            ref_logp = fused_linear_logprobs(ref_h(b), ref_h.lm_head, b.targets, temperature=loss_cfg.temperature)
    with autocast(device, bf16):
        h = ddp(b)
    gen_packed = _gen_logp_packed(gen, device)
    gen_arg = gen_packed if loss_cfg.gen_correction != "off" else None
    loss, metrics = fused_linear_grpo_loss(h, policy.lm_head, b.targets, b.seq_ids, adv.to(device), b.loss_mask,
                                           loss_cfg, old_logp=old, ref_logp=ref_logp, gen_logp=gen_arg,
                                           num_global_tokens=n_global)
    if gen_arg is None:  # mismatch between generator and trainer log-probs, logged every step
        with torch.no_grad():
            lp = fused_linear_logprobs(h.detach(), policy.lm_head.detach(), b.targets, temperature=loss_cfg.temperature)
            d = (lp - gen_packed).abs()[b.loss_mask]
            metrics["gen_logp_abs_diff_mean"] = d.mean() if d.numel() else d.new_zeros(())
            metrics["gen_logp_abs_diff_max"] = d.max() if d.numel() else d.new_zeros(())
    return loss * world, metrics


def _update(cfg, ddp, policy, ref_h, batch: RolloutBatch, aux, opt, sched, state, world, device) -> dict:
    seqs = list(zip(batch.ids, batch.mask))
    n_global = distributed.all_sum(sum(int(m[1:].sum()) for m in batch.mask))
    all_zero = distributed.all_sum(float(batch.advantages.abs().sum())) == 0
    mbs = micro_batches([len(s[0]) for s in seqs], cfg.micro_batch_tokens)
    out = {"loss": 0.0, "aux_loss": 0.0, "skipped_zero_adv": all_zero}
    sums = {}
    n_aux = distributed.all_sum(sum(int(m[1:].sum()) for _, m in aux)) if aux else 0
    for update in range(cfg.updates_per_batch):
        olds = None
        if cfg.updates_per_batch > 1 and update == 0:  # old log-probs, before the first update
            with torch.no_grad():
                olds = []
                for mb in mbs:
                    b = pack_sequences([seqs[i][0] for i in mb]).to(device) if mb else None
                    olds.append(fused_linear_logprobs(policy(b), policy.lm_head, b.targets,
                                                      temperature=cfg.loss.temperature) if mb else None)
            state["_old"] = olds
        olds = state.get("_old")
        ok = True
        if not all_zero:
            for j, mb in enumerate(mbs):
                with no_sync(ddp, j == len(mbs) - 1 and not aux):
                    if not mb:
                        loss = sum(p.sum() for p in policy.parameters() if p.requires_grad) * 0.0
                        metrics = {}
                    else:
                        loss, metrics = grpo_micro_batch_loss(
                            ddp, policy, ref_h, [seqs[i] for i in mb], batch.advantages[mb], [batch.gen_logp[i] for i in mb],
                            cfg.loss, n_global, world, device, cfg.bf16, old=None if olds is None else olds[j])
                    loss.backward()
                out["loss"] += float(loss.detach()) / world
                ok &= math.isfinite(float(loss.detach()))
                for k, v in metrics.items():
                    w = float(metrics.get("num_tokens", 1))
                    if k == "gen_logp_abs_diff_max":
                        sums[k] = max(sums.get(k, 0.0), float(v))
                    else:
                        sums[k] = sums.get(k, 0.0) + float(v) * (w if k != "num_tokens" else 1)
        if aux:  # lambda x SFT on the probes' teacher rationales
            amb = micro_batches([len(s[0]) for s in aux], cfg.micro_batch_tokens)
            for j, mb in enumerate(amb):
                with no_sync(ddp, j == len(amb) - 1):
                    loss = _nll_loss(ddp, policy, [aux[i] for i in mb], n_aux, world, device, cfg.bf16) * cfg.aux_weight
                    loss.backward()
                out["aux_loss"] += float(loss.detach()) / world / cfg.aux_weight
                ok &= math.isfinite(float(loss.detach()))
        if all_zero and update == 0:  # no policy gradient: still log the generator/trainer mismatch
            with torch.no_grad():
                for mb in (m for m in mbs if m):
                    b = pack_sequences([seqs[i][0] for i in mb], token_mask=[seqs[i][1] for i in mb]).to(device)
                    lp = fused_linear_logprobs(policy(b), policy.lm_head, b.targets, temperature=cfg.loss.temperature)
                    d = (lp - _gen_logp_packed([batch.gen_logp[i] for i in mb], device)).abs()[b.loss_mask]
                    if d.numel():
                        sums["gen_logp_abs_diff_mean"] = sums.get("gen_logp_abs_diff_mean", 0.0) + float(d.sum())
                        sums["gen_logp_abs_diff_max"] = max(sums.get("gen_logp_abs_diff_max", 0.0), float(d.max()))
                        sums["num_tokens"] = sums.get("num_tokens", 0.0) + d.numel()
        if all_zero and not aux:
            opt.zero_grad(set_to_none=True)
            sched.step()
            continue
        stepped, gnorm = optimizer_step(policy, opt, sched, cfg.optim, ok, state)
        out.update(grad_norm=gnorm, skipped_nonfinite=not stepped)
    state.pop("_old", None)
    n = max(1.0, sums.get("num_tokens", 0.0))
    for k, v in sums.items():
        if k == "gen_logp_abs_diff_max":
            out[k] = distributed.all_max(v)
        elif k != "num_tokens":
            out[k] = distributed.all_sum(v) / max(1.0, distributed.all_sum(n))
    out["loss"] = distributed.all_sum(out["loss"])
    out["aux_loss"] = distributed.all_sum(out["aux_loss"])
    return out


def make_backend(cfg: TrainConfig, model, tok, dtok):
    backend = cfg.backend
    if backend == "auto":
        import importlib.util
        backend = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    if backend == "vllm":
        from exgrpo.vllm_backend import VLLMBackend
        return VLLMBackend.from_model(model, tok, dtok.eot, seed=cfg.seed)
    if backend == "vllm-server":
        from exgrpo.vllm_backend import VLLMServerBackend
        be = VLLMServerBackend(cfg.server_url, cfg.server_model, tok, dtok.eot)
        be.sync_weights(model)  # the server starts from the policy's weights
        return be
    return TransformersBackend(model, tok, dtok.eot)


# ================================================================================================ evaluation


def evaluate(model, tok, examples, *, batch_size: int = 64, max_new_tokens: int = 96, backend=None) -> dict:
    """Greedy accuracy per data set: the student answers each question directly (no probes)."""
    dtok = DialogueTokenizer(tok)
    backend = backend or TransformersBackend(model, tok, dtok.eot, batch_size=batch_size)
    sc = SamplingConfig(max_new_tokens=max_new_tokens)
    res: dict = {}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        ds = multi_turn_rollouts(backend, dtok, [[e.question] for e in chunk], sc, greedy=True)
        for e, d in zip(chunk, ds):
            r = res.setdefault(e.dataset, [0, 0])
            r[0] += is_correct(last_assistant_text(dtok, d), e.answer, e.answer_type)
            r[1] += 1
    return {k: {"accuracy": c / n, "correct": c, "n": n} for k, (c, n) in res.items()}
