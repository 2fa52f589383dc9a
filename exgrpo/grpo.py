"""`exgrpo train`: ExGRPO, GRPO over multi-turn probe dialogues with the Dialogue Structure Utility bonus.

The loop, read top to bottom (``train_steps``): per step, the step's questions (deterministic in the step, so a
resume replays it); the rollouts (the student answers every user turn: Scenario A's k probes then the question,
Scenario B's first k'; or the independent / direct modes, ``exgrpo.rollouts``); the rewards, the DSU bonus and the
group advantages (``exgrpo.rewards``); the training phase (reference log-probs once, then the GRPO loss and the
auxiliary SFT loss on packed micro-batches, one guarded optimizer step: ``exgrpo.steps.grpo_update``); the weight
sync to the generator; metrics (with every phase's wall time), samples, periodic evaluation and checkpoints.
"""
from __future__ import annotations

import importlib.util
import random
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tqdm import tqdm

from exgrpo import checkpoint, distill, distributed
from exgrpo.config import GenBackend, TrainConfig, save_config
from exgrpo.dialogue import DialogueTokenizer
from exgrpo.evaluate import eval_examples, evaluate
from exgrpo.generation import GenerationBackend, TransformersBackend, multi_turn_rollouts
from exgrpo.io import read_jsonl
from exgrpo.metrics import MetricsLog, PhaseTimer, global_mean, peak_memory_gib
from exgrpo.model import PolicyHidden, load_policy
from exgrpo.optim import NonFiniteGuard, make_optimizer, optimizer_step
from exgrpo.rewards import load_reward_fns, score_rollouts
from exgrpo.rollouts import (Collected, build_prompts, informative_questions, keep_questions, rollout_batch,
                             sample_records, scenarios)
from exgrpo.steps import autocast_dtype, grpo_update, offload_record, step_context


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run ExGRPO; returns {"steps", "final": the Hugging Face folder of the trained policy (rank 0)}."""
    steps = train_steps(cfg, resume)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def train_steps(cfg: TrainConfig, resume: bool = False):
    """The training loop as a generator: yields each step's metric record; its return value is train()'s."""
    distributed.check_launch(cfg.parallel, cfg.questions_per_step, "questions_per_step")
    rank, world, device = distributed.init()
    if distributed.is_main():
        save_config(cfg, cfg.out_dir)
    questions = [r for r in read_jsonl(cfg.data) if r["probes"] or cfg.mode in ("direct", "opd")]
    reward_fns = load_reward_fns(cfg.rewards)
    held_out = eval_examples(cfg.eval_data) if cfg.eval_every else []
    model, tok = load_policy(cfg.model, cfg.init, cfg.seed, device)
    ref = None
    if cfg.loss.beta != 0 and cfg.model.lora_rank == 0:  # the frozen reference: the same start
        ref = PolicyHidden(load_policy(cfg.model, cfg.init, cfg.seed, device)[0].requires_grad_(False).eval()).eval()
    dtok = DialogueTokenizer(tok)
    teacher = distill.make_teacher(cfg, tok, device)  # on-policy distillation (mode=opd, opd_coef), or None
    policy = PolicyHidden(model).train()
    ctx = step_context(cfg, policy, device, ref=ref)
    # with LoRA the reference is the policy with its adapters disabled: one copy of the weights
    ctx.ref_from_adapters_off = cfg.loss.beta != 0 and cfg.model.lora_rank > 0
    opt, sched = make_optimizer(model, cfg.optim, cfg.steps)
    backend = make_backend(cfg, model, tok, dtok, fsdp_root=ctx.module if cfg.parallel == "fsdp2" else None)
    state, guard = {"step": 0}, NonFiniteGuard(cfg.optim.max_nonfinite)
    ck = checkpoint.latest(cfg.out_dir) if resume else None
    if ck:
        state = checkpoint.restore(ck, cfg.parallel, model, opt, sched)
        guard.count = state.get("nonfinite", 0)
        backend.sync_weights(model)
    log = MetricsLog(cfg.out_dir, state["step"])

    def collect(step: int, timer: PhaseTimer) -> Collected:
        """Steps 1-3 of ``step`` on this rank: its questions, rollouts, rewards and advantages."""
        # ---- 1. questions of this step (deterministic in the step: resume replays it exactly); dynamic sampling
        #         (filter_groups=resample) takes the next ones of the same order, round after round
        rng = random.Random(f"{cfg.seed}-{step}")
        order = rng.sample(range(len(questions)), min(cfg.questions_per_step, len(questions)))
        if cfg.filter_groups == "resample":  # the rest, in a fixed order after the step's own questions
            order += rng.sample(sorted(set(range(len(questions))) - set(order)), len(questions) - len(order))
        share = len(order[:cfg.questions_per_step][rank::world])  # this rank's questions in the step
        kept, n_zero, n_seen, version = [], 0, 0, gen_version[0]
        for rnd in range(cfg.filter_max_rounds if cfg.filter_groups == "resample" else 1):
            picked = order[rnd * cfg.questions_per_step:(rnd + 1) * cfg.questions_per_step][rank::world]
            plan = [scenarios(questions[i], cfg, random.Random(f"{cfg.seed}-{step}-{i}")) for i in picked]
            # ---- 2. rollouts: the student answers every user turn (dialogue: G x Scenario A + G x Scenario B per
            #         question; independent: G x each probe and G x the question; direct: G x the question)
            prompts = build_prompts(plan, cfg)
            with timer("gen"):
                dialogues = multi_turn_rollouts(backend, dtok, [p.turns for p in prompts], cfg.sampling,
                                                seed=(cfg.seed * 1_000_003 + step) * 64 + rank + rnd * 7_919_000_003)
            # ---- 3. rewards (outcome; DSU bonus; per-turn with probe_rewards) and group advantages; filter_groups
            #         drops the questions whose rollouts carry no advantage (all rewards equal: nothing to learn)
            with timer("score"):
                scored = score_rollouts(cfg, prompts, dialogues, dtok,
                                        random.Random(f"perm-{cfg.seed}-{step}-{rank}" + (f"-{rnd}" if rnd else "")),
                                        reward_fns)
                live = list(range(len(plan)))
                if cfg.filter_groups != "off":
                    live = informative_questions(prompts, scored)
                    n_zero, n_seen = n_zero + len(plan) - len(live), n_seen + len(plan)
                    live = live[:max(0, share - sum(len(k[0]) for k in kept))]
                kept.append((live, *keep_questions(prompts, dialogues, scored, live)))
            if rnd == 0:  # the step's own questions: their rewards are the logged ones, their probes the aux loss's
                first, aux_plan = (prompts, dialogues, scored), plan
            if cfg.filter_groups != "resample" or not distributed.all_sum(sum(len(k[0]) for k in kept) < share):
                break
        with timer("score"):
            turn_adv = None if kept[0][5] is None else [a for k in kept for a in k[5]]
            batch = rollout_batch([d for k in kept for d in k[2]], torch.cat([k[4] for k in kept]), turn_adv,
                                  cfg.policy_turns, cfg.mask_truncated_completions)
            aux = [dtok.encode(p.aux_messages).tensors("all") for p in aux_plan] if cfg.aux_weight > 0 else []
        return Collected(batch, aux, first, rnd + 1, n_zero, n_seen, sum(len(k[0]) for k in kept), timer.times,
                         version)

    # async_steps=n (server mode): the rollouts of the next n steps are generated in a background thread while
    # this one trains; each step's push is queued behind them in the same thread, so the rollouts of step s are
    # generated on the weights after step s - n (staleness n; the first n steps' on the start's), never a mix
    background = ThreadPoolExecutor(max_workers=1) if cfg.async_steps else None
    barrier = distributed.side_barrier() if background is not None else None
    gen_version = [state.get("weights_version", 0)]  # the weights the generator holds (its pushes run in order)
    ahead = deque()  # futures of collect(s) for the steps after this one, in order
    for c in _saved_rollouts(state.pop("pending", None), rank):  # a resumed async run: saved with the checkpoint
        ahead.append(Future())
        ahead[-1].set_result(c)
    push = None  # the last queued push

    def collect_after(pushed, step):  # in the background thread: a push that failed fails the rollouts behind it
        if pushed is not None:
            pushed.result()
        return collect(step, PhaseTimer(torch.device("cpu")))

    def push_staged(staged, version: int):
        backend.push(staged, barrier)
        gen_version[0] = version

    bar = tqdm(range(state["step"], cfg.steps), desc="exgrpo", disable=not (cfg.progress and distributed.is_main()))
    for step in bar:
        t_wall = time.perf_counter()
        generated_ahead = bool(ahead)
        c = ahead.popleft().result() if generated_ahead else collect(step, PhaseTimer(device))
        t_wait = time.perf_counter() - t_wall if generated_ahead else 0.0
        while background is not None and step + len(ahead) < min(step + cfg.async_steps, cfg.steps - 1):
            ahead.append(background.submit(collect_after, push, step + len(ahead) + 1))
        timer = ctx.timer = PhaseTimer(device)
        timer.times.update(c.times)
        batch, aux, (prompts, dialogues, scored) = c.batch, c.aux, c.first
        opd = {}
        if teacher is not None:  # ---- on-policy distillation: the teacher scores every sampled token
            with timer("teacher"):
                t_lp = teacher.logprobs(ctx, list(zip(batch.ids, batch.mask)))
                base = batch.advantages * 0 if cfg.mode == "opd" else batch.advantages
                batch.token_advantages, opd = distill.token_advantages(batch.mask, batch.gen_logp, t_lp, base,
                                                                       1.0 if cfg.mode == "opd" else cfg.opd_coef)
        backend.sleep()  # vLLM on CUDA frees its memory while we train
        # ---- 4. training phase: reference log-probs once, then GRPO loss (+ lambda x aux SFT) on packed micro-batches
        upd = grpo_update(ctx, batch.inputs(), aux, cfg.loss,
                          lambda ok: optimizer_step(model, opt, sched, cfg.optim, ok, guard),
                          aux_weight=cfg.aux_weight, updates=cfg.updates_per_batch)
        with timer("sync"):  # async: only the copy of the weights here; the push runs behind the queued rollouts
            if background is None:
                backend.sync_weights(model)
                gen_version[0] += 1
            else:
                push = background.submit(push_staged, backend.stage(model), state.get("weights_version", 0) + 1)
        state.update(step=step + 1, nonfinite=guard.count, weights_version=state.get("weights_version", 0) + 1)
        # ---- 5. metrics, samples, evaluation and checkpoints
        n_tok = distributed.all_sum(sum(int(m.sum()) for m in batch.mask))
        resp = [sum(d.generated) / max(1, sum(r == "assistant" for r in d.roles)) for d in dialogues]
        rewards = {k: global_mean(v) for k, v in sorted(scored.metrics.items())}
        t_step = sum(timer.times.values()) if background is None else time.perf_counter() - t_wall
        if cfg.filter_groups != "off":
            rewards.update(frac_zero_adv_questions=distributed.all_sum(c.n_zero) / max(1.0, distributed.all_sum(c.n_seen)),
                           sampling_rounds=float(c.rounds), trained_questions=distributed.all_sum(c.trained))
        if background is not None:  # this step's rollouts, generated while earlier steps trained
            gen = c.times.get("gen", 0.0) + c.times.get("score", 0.0) if generated_ahead else 0.0
            rewards.update(time_gen_hidden_s=max(0.0, gen - t_wait), time_gen_wait_s=t_wait,
                           staleness=global_mean([float(state["weights_version"] - 1 - c.weights_version)]))
        rewards.update({k: distributed.all_sum(v) / world for k, v in opd.items()})
        if hasattr(backend, "connection_errors"):  # a generation server: its faults so far (retried)
            rewards.update(server_connection_errors=float(backend.connection_errors),
                           server_repushes=float(backend.restarts), server_push_mb=backend.last_push_bytes / 2**20)
        rec = {"step": step, **upd.record(), **{k: v for k, v in rewards.items() if v is not None},
               "adv_abs_mean": global_mean(batch.advantages.abs().tolist()), "response_tokens": global_mean(resp),
               "tokens_per_s": n_tok / t_step, "time_step_s": t_step, **timer.record(),
               "lr": sched.get_last_lr()[0], "peak_mem_gib": peak_memory_gib(device), **offload_record(ctx)}
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            if push is not None:  # the generator on this step's weights, nothing else in flight
                push.result()
            with timer("eval"):
                rec.update(_evaluation(model, tok, held_out, cfg, backend))
            rec["time_eval_s"] = timer.times["eval"]
        log.write(rec)
        log.write_samples(step, sample_records(cfg.log_samples, prompts, dialogues, scored.rewards, dtok)
                          if cfg.log_samples else [])
        bar.set_postfix(reward=f"{rec.get('reward_question', 0.0):.2f}")
        checkpoint.maybe_save(cfg, step, checkpoint.Run(model, tok, opt, sched),  # with the rollouts generated ahead
                              {**state, "pending": lambda: distributed.all_gather_object([f.result() for f in ahead])}
                              if ahead else state)
        yield rec
    if background is not None:
        background.shutdown()
        if push is not None:
            push.result()  # the last push's error, if any
    log.close()
    final = checkpoint.save_final(cfg, model, tok, rebuild=lambda: load_policy(cfg.model, cfg.init, cfg.seed, "cpu")[0])
    backend.close()  # last: under torchrun a colocated vLLM's shutdown ends the process group
    return {"steps": cfg.steps, "final": final}


def _saved_rollouts(pending, rank: int) -> list:
    """This rank's rollouts saved with an async checkpoint (every rank's list, in rank order; a run of async_steps=1
    saved one Collected per rank)."""
    if pending is None:
        return []
    mine = pending[rank]
    return list(mine) if isinstance(mine, (list, tuple)) else [mine]


def _evaluation(model, tok, examples, cfg: TrainConfig, backend) -> dict:
    """Greedy accuracy on the held-out examples, per data set (eval/<name>) and their mean (eval_accuracy). Rank 0
    evaluates (through the trainer's own generator where it is vLLM: every rank has one); under FSDP2 with the
    transformers backend every rank takes part (the sharded model's forwards are collective). Every rank gets rank
    0's values."""
    res = {}
    local = isinstance(backend, TransformersBackend)  # its forwards are the sharded model's under FSDP2
    collective = local and cfg.parallel == "fsdp2" and distributed.world() > 1
    if collective or distributed.is_main():
        gen = backend if collective or not local else None
        acc = evaluate(model, tok, examples, batch_size=128, max_new_tokens=cfg.sampling.max_new_tokens, backend=gen)
        res = {f"eval/{k}": v["accuracy"] for k, v in sorted(acc.items())}
        res["eval_accuracy"] = sum(res.values()) / max(1, len(res))
    return distributed.all_gather_object(res)[0]


def make_backend(cfg: TrainConfig, model, tok, dtok, fsdp_root=None) -> GenerationBackend:
    """The generation backend ``cfg.backend`` names (auto: vLLM where installed, else transformers). vLLM is a heavy
    optional dependency: its module is imported only when chosen."""
    backend = cfg.backend
    if backend == GenBackend.AUTO:
        backend = GenBackend.VLLM if importlib.util.find_spec("vllm") is not None else GenBackend.TRANSFORMERS
    if backend == GenBackend.VLLM:
        from exgrpo.vllm_backend import EngineConfig, VLLMBackend
        dev = next(model.parameters()).device
        bf16 = autocast_dtype(cfg.precision, dev) == torch.bfloat16  # generate in the dtype the trainer computes in
        return VLLMBackend.from_model(model, tok, dtok.eot, EngineConfig(seed=cfg.seed, sleep_level=cfg.vllm_sleep_level,
                                                                         dtype="bfloat16" if bf16 else "auto",
                                                                         gpu_memory_utilization=cfg.vllm_gpu_memory_utilization))
    if backend == GenBackend.VLLM_SERVER:
        from exgrpo.vllm_backend import ServerOptions, VLLMServerBackend
        be = VLLMServerBackend(cfg.server_url, cfg.server_model, tok, dtok.eot,
                               ServerOptions(api_key_env=cfg.server_api_key_env,
                                             weight_transfer=cfg.server_weight_transfer,
                                             transfer_host=cfg.server_transfer_host))
        be.collective_gather = cfg.parallel == "fsdp2" and distributed.world() > 1
        be.keep_staged = cfg.async_steps > 0  # the model moves on while pushes wait: push from copies
        be.sync_weights(model)  # the server starts from the policy's weights
        return be
    dev = next(model.parameters()).device
    return TransformersBackend(model, tok, dtok.eot, autocast_dtype=autocast_dtype(cfg.precision, dev),
                               sync_ranks=cfg.parallel == "fsdp2" and distributed.world() > 1, fsdp_root=fsdp_root)
