"""`exgrpo sft`: the SFT warm-up on D_EI, read top to bottom.

Per step: this step's examples (a permutation per epoch, deterministic in the step, so a resume replays it), the
token NLL of their assistant turns on packed micro-batches normalised by the global token count, one guarded
optimizer step, metrics and checkpoints. The model the warm-up ends with is the ExGRPO policy's start and its
frozen reference.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from exgrpo import checkpoint, distributed
from exgrpo.config import SFTConfig, save_config
from exgrpo.dialogue import DialogueTokenizer
from exgrpo.io import read_jsonl
from exgrpo.metrics import MetricsLog, peak_memory_gib
from exgrpo.model import PolicyHidden, load_policy
from exgrpo.optim import NonFiniteGuard, make_optimizer, optimizer_step
from exgrpo.steps import offload_record, sft_backward, step_context


def sft(cfg: SFTConfig, resume: bool = False) -> dict:
    """Run the warm-up; returns {"steps": total steps, "final": the Hugging Face folder of the model (rank 0)}."""
    distributed.check_launch(cfg.parallel, cfg.batch_dialogues, "batch_dialogues")
    _, _, device = distributed.init()
    if distributed.is_main():
        save_config(cfg, cfg.out_dir)
    records = read_jsonl(cfg.data)
    model, tok = load_policy(cfg.model, None, cfg.seed, device)
    dtok = DialogueTokenizer(tok)
    data = [dtok.encode(m).tensors(cfg.turns) for m in sft_examples(records, cfg.format)]
    steps_per_epoch = math.ceil(len(data) / cfg.batch_dialogues)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else cfg.max_steps
    policy = PolicyHidden(model).train()
    ctx = step_context(cfg, policy, device)
    opt, sched = make_optimizer(model, cfg.optim, total)
    state, guard = {"step": 0}, NonFiniteGuard(cfg.optim.max_nonfinite)
    ck = checkpoint.latest(cfg.out_dir) if resume else None
    if ck:
        state = checkpoint.restore(ck, cfg.parallel, model, opt, sched)
        guard.count = state.get("nonfinite", 0)
    log = MetricsLog(cfg.out_dir, state["step"])
    bar = tqdm(range(state["step"], total), desc="sft", disable=not (cfg.progress and distributed.is_main()))
    for step in bar:
        t0 = time.time()
        # ---- this step's examples: a permutation per epoch; every rank plans the whole global batch's micro-batches
        #      and takes its own (balanced tokens, not just counts)
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
               "peak_mem_gib": peak_memory_gib(device), **offload_record(ctx)}
        if step % cfg.log_every == 0 or step == total - 1:
            log.write(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        checkpoint.maybe_save(cfg, step, checkpoint.Run(model, tok, opt, sched), state)
    log.close()
    final = checkpoint.save_final(cfg, model, tok, rebuild=lambda: load_policy(cfg.model, None, cfg.seed, "cpu")[0])
    return {"steps": total, "final": final}


def sft_examples(records, fmt: str) -> list[list[dict]]:
    """The SFT training conversations of D_EI records. "pairs" (paper Eq. 3): each probe with the teacher's
    rationale, alone, and the original question with the teacher's rationale (the condition evaluated);
    "dialogue": each record's multi-turn dialogue (probes then the question, every answer in context);
    "pairs+dialogue": both (the question asked directly is trained, and so are the multi-turn contexts that
    ExGRPO's rollouts put the student in)."""
    if fmt == "dialogue":
        return [r["messages"] for r in records]
    if fmt == "pairs+dialogue":
        return sft_examples(records, "pairs") + sft_examples(records, "dialogue")
    out = []
    for r in records:
        for p in r["probes"]:
            out.append([{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["rationale"]}])
        out.append([{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["rationale"]}])
    return out
