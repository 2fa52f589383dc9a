"""The training micro-steps shared by SFT and ExGRPO: one micro-batch loop (plan -> pack -> forward with the
loss inside the module -> backward, gradient sync on the last), the token NLL (SFT and the auxiliary loss), the
GRPO loss with reference and old log-probs, and one policy update (``grpo_update``).

Every loss runs through this project's fused kernels (``fused_linear_nll_loss``, ``fused_linear_grpo_loss``,
``fused_linear_logprobs``) on packed micro-batches, inside ``StepContext.autocast()``: under bf16 autocast the
decoder and the vocabulary GEMMs run in bf16 with fp32 accumulation, and the gradients land in the parameters'
dtype. Losses are scaled by the global token count (and by the world size: DDP averages gradients), so they do
not depend on how the global batch is split into micro-batches and ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import contextlib

from exgrpo import distributed
from exgrpo.config import PRECISIONS
from exgrpo.microbatch import plan_micro_batches
from exgrpo.offload import OffloadActivations
from exgrpo_kernels import (GRPOLossConfig, PackedBatch, fused_linear_grpo_loss, fused_linear_logprobs,
                            fused_linear_nll_loss, pack_sequences)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """"auto": bf16 autocast on CUDA, none on the CPU; "bf16": bf16 autocast on any device; "fp32": none."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclass
class StepContext:
    """What every micro-step needs.

    policy:  the trained model's hidden-state view (``exgrpo.model.PolicyHidden``)
    module:  what runs the forward: ``policy`` itself, or its DDP / FSDP2 wrapper
    ref:     the frozen reference policy's view (None: no KL term, or LoRA with adapters disabled, see
             ``reference_logprobs``)
    """

    policy: torch.nn.Module
    module: torch.nn.Module
    device: torch.device
    world: int = 1
    autocast_dtype: torch.dtype | None = None
    kernel_backend: str = "auto"  # auto | triton | native | torch, for every fused kernel call
    micro_batch_tokens: int = 8192
    ref: torch.nn.Module | None = None
    ref_from_adapters_off: bool = False  # LoRA: the reference is the policy with its adapters disabled
    timer: object = None  # a metrics.PhaseTimer receiving the update's phases (ref, old, policy, aux, optim), or None
    activation_offload: bool = False  # the forward's saved tensors to host memory (exgrpo.offload)
    last_offload: OffloadActivations | None = None  # activation_offload: the last micro-batch's hooks (counters)

    def phase(self, name: str):
        return self.timer(name) if self.timer is not None else contextlib.nullcontext()

    def offload(self):
        """The micro-batch forward's context: activation offloading when on (kept as last_offload for its counters)."""
        if not self.activation_offload:
            return contextlib.nullcontext()
        self.last_offload = OffloadActivations()
        return self.last_offload

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)


@dataclass
class MicroStats:
    """Sums over the micro-batches of one loss (this rank)."""

    loss: float = 0.0  # sum of the micro-batch losses / world (the global loss after all_sum)
    finite: bool = True
    metric_sums: dict = field(default_factory=dict)  # token-weighted sums; "num_tokens"; maxima for *_max

    def add_metrics(self, m: dict):
        n = float(m.get("num_tokens", 0.0))
        for k, v in m.items():
            v = float(v)
            if k.endswith("_max"):
                self.metric_sums[k] = max(self.metric_sums.get(k, 0.0), v)
            elif k == "num_tokens":
                self.metric_sums[k] = self.metric_sums.get(k, 0.0) + v
            else:
                self.metric_sums[k] = self.metric_sums.get(k, 0.0) + v * n

    def global_metrics(self) -> dict:
        """Token-weighted means over all ranks (maxima for *_max)."""
        n = distributed.all_sum(self.metric_sums.get("num_tokens", 0.0))
        out = {}
        for k, v in sorted(self.metric_sums.items()):
            if k.endswith("_max"):
                out[k] = distributed.all_max(v)
            elif k != "num_tokens":
                out[k] = distributed.all_sum(v) / max(1.0, n)
        return out


# ================================================================================================ the loop


def micro_batches(lengths, max_tokens: int) -> list[list[int]]:
    """This rank's micro-batches (lists of indices); every rank gets the same count (DDP / FSDP need the same
    number of forward/backward passes on each rank)."""
    plan = plan_micro_batches(lengths, max_tokens, truncate=True)
    k = int(distributed.all_max(plan.num_micro_batches))
    if k != plan.num_micro_batches:
        plan = plan_micro_batches(lengths, max_tokens, truncate=True, min_micro_batches=k)
    return plan.plan[0]


def global_plan(lengths, max_tokens: int) -> list[list[int]]:
    """This rank's micro-batches of a batch every rank holds whole (indices into it): all ranks' sequences planned
    together (LPT over ranks, balanced tokens), the same number of micro-batches on every rank."""
    plan = plan_micro_batches(lengths, max_tokens, num_ranks=distributed.world(), truncate=True)
    return plan.plan[distributed.rank()]


def backward_micro_batches(ctx: StepContext, lengths, loss_of, *, sync_last: bool = True, scale: float = 1.0,
                           plan: list[list[int]] | None = None) -> MicroStats:
    """The one micro-batch loop of the trainer.

    lengths: the token count of each item; loss_of(indices) -> (loss tensor, metrics dict) for a micro-batch
    (indices may be empty on a rank with fewer items than micro-batches: loss_of must still run the module's
    forward so that every rank takes part in the gradient sync). Each loss x ``scale`` is backpropagated;
    gradients are synchronised on the last micro-batch only if ``sync_last``. ``plan``: this rank's micro-batches
    (default: its own items planned alone, the count agreed over ranks).
    """
    stats = MicroStats()
    mbs = plan if plan is not None else micro_batches(lengths, ctx.micro_batch_tokens)
    for j, mb in enumerate(mbs):
        with distributed.sync_context(ctx.module, sync_last and j == len(mbs) - 1):
            with ctx.offload():
                loss, metrics = loss_of(mb)
            (loss * scale).backward()
        v = float(loss.detach())
        stats.loss += v / ctx.world
        stats.finite &= math.isfinite(v)
        if metrics:
            stats.add_metrics(metrics)
    return stats


def pack(seqs, device) -> PackedBatch:
    """seqs: [(ids [T_i] int64, mask [T_i] bool)] -> one PackedBatch on device."""
    return pack_sequences([s[0] for s in seqs], token_mask=[s[1] for s in seqs]).to(device)


def _dummy() -> list:
    """One 2-token sequence with nothing trained: the forward of a rank that has no sequence for a micro-batch."""
    return [(torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.bool))]


def dummy_batch(device) -> PackedBatch:
    return pack(_dummy(), device)


def per_token_packed(values, device) -> torch.Tensor:
    """Per-sequence per-token values, [T_i] each (value of token i) -> packed [N] aligned with the targets:
    position i carries the value of token i + 1 (what position i predicts); 0 at each last position."""
    return torch.cat([torch.cat([v[1:], v.new_zeros(1)]) for v in values]).to(device)


# ================================================================================================ losses


def nll_micro_loss(ctx: StepContext, seqs, num_global_tokens: float) -> tuple[torch.Tensor, dict]:
    """Token NLL of the masked tokens of ``seqs`` ([(ids, mask)]), / the global count (x world: DDP averages).
    An empty ``seqs`` gives a zero loss that still runs the forward."""
    b = pack(seqs or _dummy(), ctx.device)

    def loss_fn(h, lm, b):
        t = torch.where(b.loss_mask, b.targets, -100)
        return fused_linear_nll_loss(h, lm.weight, t, num_global_tokens=max(float(num_global_tokens), 1.0),
                                     backend=ctx.kernel_backend, **lm.kwargs()) * ctx.world

    with ctx.autocast():
        loss = ctx.module(b, loss_fn)
    return loss, {}


def policy_logprobs(ctx: StepContext, model: torch.nn.Module, seqs, temperature: float,
                    plan: list[list[int]] | None = None) -> list[torch.Tensor]:
    """log softmax(z / tau) of every token of each sequence under ``model`` (no grad), per sequence:
    [T_i] fp32 each, value at token i = log p(token i | tokens < i), 0 for the first token. Batched by
    micro-batch (``plan``: this rank's, indices into seqs; others stay None); independent of how the sequences are
    later packed. Every planned micro-batch runs a forward, an empty one too (FSDP2's gathers are collective)."""
    out: list[torch.Tensor] = [None] * len(seqs)
    for mb in plan if plan is not None else micro_batches([len(s[0]) for s in seqs], ctx.micro_batch_tokens):
        b = pack([seqs[i] for i in mb] or _dummy(), ctx.device)

        def loss_fn(h, lm, b):
            return fused_linear_logprobs(h, lm.weight, b.targets, temperature=temperature, backend=ctx.kernel_backend,
                                         **lm.kwargs())

        with torch.no_grad(), ctx.autocast():
            lp = model(b, loss_fn).float()
        if not mb:
            continue
        cu = b.cu_seqlens.tolist()
        for k, i in enumerate(mb):
            pos = lp[cu[k]:cu[k + 1]]  # position t predicts token t + 1
            out[i] = torch.cat([pos.new_zeros(1), pos[:-1]]).cpu()
    return out


@dataclass
class GRPOInputs:
    """The sequences of one update (this rank). S sequences; T_i tokens each.

    seqs:       S pairs (ids [T_i] int64, mask [T_i] bool: the tokens the policy loss covers)
    advantages: [S] fp32
    gen_logp:   S tensors [T_i] fp32, the generator's log-prob of each token (0 where not generated)
    old_logp:   S tensors [T_i] fp32 of the policy before the first update (updates_per_batch > 1), or None
    ref_logp:   S tensors [T_i] fp32 of the reference policy (beta > 0), or None
    num_global_tokens, num_global_seqs: loss tokens and sequences of the global batch (all ranks); set by
                grpo_update (None: this rank's)
    turn_ids:   S tensors [T_i] int64, the assistant turn of each token (-1 outside), or None
    turn_advantages: S tensors [n_turns_i] fp32, one advantage per assistant turn (per-turn credit), or None: then
                every token of sequence i has advantages[i]
    token_advantages: S tensors [T_i] fp32, one advantage per token (on-policy distillation), or None
    """

    seqs: list
    advantages: torch.Tensor
    gen_logp: list
    old_logp: list | None = None
    ref_logp: list | None = None
    num_global_tokens: float | None = None
    num_global_seqs: float | None = None
    turn_ids: list | None = None
    turn_advantages: list | None = None
    token_advantages: list | None = None

    def has_advantage(self) -> bool:
        """Whether any sequence, turn or token carries a non-zero advantage (else there is no policy gradient)."""
        if self.token_advantages is not None:
            return any(bool(t.abs().sum() > 0) for t in self.token_advantages)
        return float(self.advantages.abs().sum()) != 0

    def segments(self, idx: list[int], device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(segment id of each packed position [N] or None, advantages per segment): with per-token advantages every
        position is its own segment (credited with the token it predicts); with per-turn advantages each assistant
        turn is (a position is credited with the turn of the token it predicts); otherwise the sequences themselves
        (None: the packed batch's seq_ids)."""
        if self.token_advantages is not None:
            adv = per_token_packed([self.token_advantages[i] for i in idx], device).float()
            return torch.arange(adv.shape[0], device=device), adv
        if self.turn_advantages is None:
            return None, self.advantages[idx].to(device)
        segs, advs, base = [], [], 0
        for i in idx:
            tid = self.turn_ids[i]
            target_turn = torch.cat([tid[1:], tid.new_full((1,), -1)]).clamp(min=0)
            n = max(1, len(self.turn_advantages[i]))
            segs.append(target_turn.clamp(max=n - 1) + base)
            a = self.turn_advantages[i]
            advs.append(a if len(a) else a.new_zeros(1))
            base += n
        return torch.cat(segs).to(device), torch.cat(advs).float().to(device)


def _global_scale(cfg: GRPOLossConfig, b: PackedBatch, x: GRPOInputs, num_global_tokens: float) -> float:
    """The kernel normalises the per-sequence aggregations (grpo, sapo, dr_grpo, luspo) by the micro-batch's
    sequences and "bnpo" by its tokens; this factor makes the sum over micro-batches and ranks the loss of the global
    batch (the loss depends only on the global batch). dapo, cispo and vespo are normalised by num_global_tokens in
    the kernel already."""
    if cfg.aggregation in ("seq_mean", "constant", "seq_sum"):
        return b.num_seqs / float(x.num_global_seqs or len(x.seqs))
    if cfg.aggregation == "token_mean":
        n = int((b.loss_mask & (b.targets != -100)).sum())
        return n / max(1.0, float(num_global_tokens))
    return 1.0


def grpo_micro_loss(ctx: StepContext, x: GRPOInputs, idx: list[int], cfg: GRPOLossConfig,
                    num_global_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """GRPO loss of the micro-batch ``idx`` of ``x`` (x world, and scaled so that the micro-batches of the
    global batch add up to its loss), with its metrics. The generator/trainer log-prob mismatch is reported
    whether or not the generator correction is on."""
    if not idx:
        return nll_micro_loss(ctx, [], 1.0)[0] * 0.0, {}
    num_global_tokens = num_global_tokens or x.num_global_tokens or sum(int(m[1:].sum()) for _, m in x.seqs)
    seqs = [x.seqs[i] for i in idx]
    b = pack(seqs, ctx.device)
    scale = _global_scale(cfg, b, x, num_global_tokens) * ctx.world
    pick = lambda vals: None if vals is None else per_token_packed([vals[i] for i in idx], ctx.device)  # noqa: E731
    gen, old, ref = pick(x.gen_logp), pick(x.old_logp), pick(x.ref_logp)
    seg, adv = x.segments(idx, ctx.device)
    cfg = cfg if cfg.backend != "auto" else cfg.replace(backend=ctx.kernel_backend)

    def loss_fn(h, lm, b):  # gen_logp always given: the kernel reports the generator/trainer mismatch from its own
        #                     log-probs (no second pass); it weights the loss only when gen_correction is on
        loss, m = fused_linear_grpo_loss(h, lm.weight, b.targets, b.seq_ids if seg is None else seg, adv, b.loss_mask,
                                         cfg, old_logp=old, ref_logp=ref if cfg.beta != 0 else None, gen_logp=gen,
                                         num_global_tokens=num_global_tokens, **lm.kwargs())
        return loss * scale, m

    with ctx.autocast():
        return ctx.module(b, loss_fn)


def reference_logprobs(ctx: StepContext, seqs, temperature: float, plan) -> list[torch.Tensor]:
    """The frozen reference's log-probs: its own model, or (LoRA) the policy with its adapters disabled."""
    if ctx.ref_from_adapters_off:
        with ctx.policy.model.disable_adapter():
            return policy_logprobs(ctx, ctx.module, seqs, temperature, plan)
    return policy_logprobs(ctx, ctx.ref, seqs, temperature, plan)


def mismatch_only(ctx: StepContext, x: GRPOInputs, temperature: float, plan) -> MicroStats:
    """The generator/trainer log-prob mismatch without a backward (a step whose advantages are all zero)."""
    stats = MicroStats()
    lp = policy_logprobs(ctx, ctx.module, x.seqs, temperature, plan)
    for (_, mask), l, g in zip(x.seqs, lp, x.gen_logp):
        if l is None:
            continue
        d = (l - g).abs()[mask.bool()]
        if d.numel():
            stats.add_metrics({"gen_logp_abs_diff_mean": d.mean(), "gen_logp_abs_diff_max": d.max(),
                               "num_tokens": d.numel()})
    return stats


# ================================================================================================ one update


@dataclass
class UpdateResult:
    """One ExGRPO step's training phase (all ranks reduced)."""

    loss: float
    aux_loss: float
    skipped_zero_adv: bool
    grad_norm: float | None = None
    skipped_nonfinite: bool = False
    metrics: dict = field(default_factory=dict)  # kl, clip fractions, ratio_mean, entropy, gen mismatch

    def record(self) -> dict:
        out = {"loss": self.loss, "aux_loss": self.aux_loss, "skipped_zero_adv": self.skipped_zero_adv}
        if self.grad_norm is not None:
            out.update(grad_norm=self.grad_norm, skipped_nonfinite=self.skipped_nonfinite)
        return {**out, **self.metrics}


def global_token_count(masks) -> float:
    """Tokens a loss covers over all ranks: the mask shifted onto the positions that predict a trained token."""
    return distributed.all_sum(sum(int(m[1:].sum()) for m in masks))


def gather_batch(x: GRPOInputs, aux: list) -> tuple[GRPOInputs, list]:
    """Every rank's sequences (in rank order), so that the micro-batches of all ranks are planned together."""
    if distributed.world() == 1:
        return x, aux
    parts = distributed.all_gather_object((x.seqs, x.advantages, x.gen_logp, x.turn_ids, x.turn_advantages, aux,
                                           x.token_advantages))
    cat = lambda i: [v for p in parts for v in p[i]]  # noqa: E731
    has_turns = parts[0][3] is not None
    g = GRPOInputs(seqs=cat(0), advantages=torch.cat([p[1] for p in parts]), gen_logp=cat(2),
                   turn_ids=cat(3) if has_turns else None, turn_advantages=cat(4) if has_turns else None,
                   token_advantages=cat(6) if parts[0][6] is not None else None)
    return g, cat(5)


def grpo_update(ctx: StepContext, x: GRPOInputs, aux: list, loss_cfg: GRPOLossConfig, optimizer_step, *,
                aux_weight: float = 0.0, updates: int = 1) -> UpdateResult:
    """``updates`` policy updates on one batch: reference log-probs once (beta > 0), old log-probs before the first
    update when there are several, the GRPO loss (+ aux_weight x NLL of ``aux`` [(ids, mask)]), then
    ``optimizer_step(finite) -> (stepped, grad_norm)``. The sequences of all ranks are planned
    together: each rank trains its share of the global batch (balanced tokens), whichever rank generated them.
    ``ctx.timer`` (a ``metrics.PhaseTimer``, optional) receives the phases ref, old, policy, aux and optim.

    A batch whose advantages are all zero (every group tied) has no policy gradient: its backward is skipped
    (the mismatch is still measured); with no auxiliary loss there is then no optimizer step either."""
    phase = ctx.phase
    x, aux = gather_batch(x, aux)
    x.num_global_tokens = float(sum(int(m[1:].sum()) for _, m in x.seqs))
    x.num_global_seqs = float(len(x.seqs))
    n_aux = float(sum(int(m[1:].sum()) for _, m in aux)) if aux else 0.0
    all_zero = not x.has_advantage()
    plan = global_plan([len(s[0]) for s in x.seqs], ctx.micro_batch_tokens)
    aux_plan = global_plan([len(s[0]) for s in aux], ctx.micro_batch_tokens) if aux else None
    if loss_cfg.beta != 0 and not all_zero:
        with phase("ref"):
            x.ref_logp = reference_logprobs(ctx, x.seqs, loss_cfg.temperature, plan)
    if updates > 1 and not all_zero:
        with phase("old"):
            x.old_logp = policy_logprobs(ctx, ctx.module, x.seqs, loss_cfg.temperature, plan)
    lengths = [len(s[0]) for s in x.seqs]
    res = UpdateResult(loss=0.0, aux_loss=0.0, skipped_zero_adv=all_zero)
    stats = MicroStats()
    for update in range(updates):
        finite = True
        if not all_zero:
            with phase("policy"):
                pol = backward_micro_batches(ctx, lengths, lambda mb: grpo_micro_loss(ctx, x, mb, loss_cfg),
                                             sync_last=not aux, plan=plan)
            finite &= pol.finite
            res.loss += distributed.all_sum(pol.loss)
            if update == 0:
                stats = pol
        elif update == 0:
            with phase("policy"):
                stats = mismatch_only(ctx, x, loss_cfg.temperature, plan)
        if aux:  # lambda x SFT on the probes' teacher rationales
            with phase("aux"):
                a = backward_micro_batches(ctx, [len(s[0]) for s in aux],
                                           lambda mb: nll_micro_loss(ctx, [aux[i] for i in mb], n_aux),
                                           scale=aux_weight, plan=aux_plan)
            finite &= a.finite
            res.aux_loss += distributed.all_sum(a.loss)
        with phase("optim"):
            if all_zero and not aux:
                optimizer_step(None)
                continue
            stepped, res.grad_norm = optimizer_step(finite)
        res.skipped_nonfinite = not stepped
    res.metrics = stats.global_metrics()
    return res


def sft_backward(ctx: StepContext, seqs, global_batch: bool = False) -> MicroStats:
    """Backward of the NLL of one SFT batch, normalised by the global token count. ``seqs``: this rank's share, or
    (``global_batch``) the whole global batch, held by every rank and planned over all of them."""
    lengths = [len(s[0]) for s in seqs]
    if global_batch:
        n_global = float(sum(int(m[1:].sum()) for _, m in seqs))
        plan = global_plan(lengths, ctx.micro_batch_tokens)
    else:
        n_global, plan = global_token_count(m for _, m in seqs), None
    stats = backward_micro_batches(ctx, lengths, lambda mb: nll_micro_loss(ctx, [seqs[i] for i in mb], n_global), plan=plan)
    stats.metric_sums["num_tokens"] = n_global
    return stats


def offload_record(ctx: StepContext) -> dict:
    """The metrics of activation offloading (empty when off): the last micro-batch's offloaded tensors and the host
    memory they held at most (GiB)."""
    h = ctx.last_offload
    if not ctx.activation_offload or h is None:
        return {}
    return {"offload_tensors": float(h.offloaded), "offload_host_gib": h.host_bytes_peak / 2**30}


def step_context(cfg, policy, device, ref=None) -> StepContext:
    """The micro-step context of a run config (SFTConfig or TrainConfig): the policy wrapped for the data
    parallelism of ``cfg.parallel`` (sharded in place under FSDP2: build the optimizer after this), a frozen
    reference sharded the same way."""
    module = distributed.wrap(policy, cfg.parallel, cfg.fsdp, device)
    if cfg.parallel == "fsdp2":
        if ref is not None:
            distributed.wrap(ref, "fsdp2", cfg.fsdp, device)
        # FSDP2 initialises lazily at the first forward, which must go through the root: run it here, before any
        # generation calls the inner causal LM (that would make each layer a root of its own)
        with torch.no_grad():
            for m in (module, ref):
                if m is not None:
                    m(dummy_batch(device))
    return StepContext(policy=policy, module=module, device=device, world=distributed.world(),
                       autocast_dtype=autocast_dtype(cfg.precision, device), kernel_backend=cfg.kernel_backend,
                       micro_batch_tokens=cfg.micro_batch_tokens, ref=ref,
                       activation_offload=cfg.model.activation_offload)
