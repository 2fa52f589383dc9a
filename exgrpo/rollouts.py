"""What one ExGRPO step rolls out: per question, the scenarios (Scenario A: k probes then the question; Scenario B:
the first k'), the prompts (one per trajectory), and the typed batch the training phase takes.

Modes (``TrainConfig.mode``): ``dialogue`` (Scenarios A and B, G trajectories each), ``independent`` (the paper's
"RL without r_dsu": each probe and the question their own prompt and group) and ``direct`` (the question alone:
plain GRPO, the "SFT + RL" baseline).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from exgrpo.config import TrainConfig
from exgrpo.dialogue import TokenizedDialogue
from exgrpo.generation import assistant_turn_ids
from exgrpo.steps import GRPOInputs


@dataclass(frozen=True)
class Plan:
    """One question of a step: its k probes (shuffled) and k', and the auxiliary SFT turns (the probes with the
    teacher's rationales)."""

    question: str
    answer: str
    answer_type: str
    probes: list  # [{"question", "rationale", "answer", "answer_type", ...}] x k
    k_partial: int
    aux_messages: list  # [user, assistant] x k


def scenarios(q: dict, cfg: TrainConfig, rng: random.Random) -> Plan:
    """k probes of the question (shuffled); Scenario A poses all k, then the question; Scenario B the first k'."""
    probes = list(q["probes"])
    rng.shuffle(probes)
    k = min(cfg.k, len(probes))
    kp = rng.randrange(0, k) if cfg.k_partial_mode == "random" else min(cfg.k_partial, k - 1)
    aux = []
    for p in probes[:k]:
        aux += [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["rationale"]}]
    return Plan(q["question"], q["answer"], q["answer_type"], probes[:k], kp, aux)


@dataclass(frozen=True)
class Prompt:
    """One trajectory to roll out: its user turns, and what each assistant turn's answer should be."""

    question: int  # index of its question in the step's plan
    scenario: str  # "A" | "B" (dialogue mode) | "probe" | "question" (independent and direct modes)
    turns: list  # user messages, in order
    answers: list  # [(answer, answer_type)] per assistant turn; the last is the question's
    probe_ids: list  # per assistant turn: the index of its probe in the question's list, or -1 for the question


def build_prompts(plan: list[Plan], cfg: TrainConfig) -> list[Prompt]:
    """G prompts per scenario (dialogue), per probe and for the question (independent), or for the question (direct),
    the G copies of a prompt next to each other."""
    out = []
    for qi, p in enumerate(plan):
        q = (p.answer, p.answer_type)
        if cfg.mode in ("independent", "direct", "opd"):
            for j, pr in enumerate(p.probes if cfg.mode == "independent" else []):
                out += [Prompt(qi, "probe", [pr["question"]], [(pr["answer"], pr["answer_type"])], [j])] * cfg.G
            out += [Prompt(qi, "question", [p.question], [q], [-1])] * cfg.G
            continue
        for scen, n in (("A", len(p.probes)), ("B", p.k_partial)):
            probes = p.probes[:n]
            out += [Prompt(qi, scen, [x["question"] for x in probes] + [p.question],
                           [(x["answer"], x["answer_type"]) for x in probes] + [q], list(range(n)) + [-1])] * cfg.G
    return out


@dataclass
class RolloutBatch:
    """The training sequences of one step (this rank). S sequences; T_i tokens each.

    ids:        S tensors [T_i] int64, the dialogue tokens
    mask:       S tensors [T_i] bool, the tokens the policy loss covers (student turns)
    gen_logp:   S tensors [T_i] fp32, generator log-prob of each token (0 where not generated)
    advantages: [S] fp32
    turn_ids:   S tensors [T_i] int64: assistant turn of each token (-1 outside), with turn_advantages
    turn_advantages: S tensors [n_turns_i] fp32: per-turn credit (probe_rewards), or None
    token_advantages: S tensors [T_i] fp32: per-token advantages (on-policy distillation), or None
    """

    ids: list
    mask: list
    gen_logp: list
    advantages: torch.Tensor
    turn_ids: list | None = None
    turn_advantages: list | None = None
    token_advantages: list | None = None

    def inputs(self) -> GRPOInputs:
        return GRPOInputs(seqs=list(zip(self.ids, self.mask)), advantages=self.advantages, gen_logp=self.gen_logp,
                          turn_ids=self.turn_ids, turn_advantages=self.turn_advantages,
                          token_advantages=self.token_advantages)


@dataclass
class Collected:
    """Steps 1-3 of one training step on this rank, ready for its training phase: what ``train_steps``'s
    ``collect`` returns (in the background with ``async_steps=1``; saved with a checkpoint when it is the next
    step's).

    batch:     the training sequences (RolloutBatch), all sampling rounds
    aux:       the auxiliary SFT sequences of the step's probes ([(ids, mask)], empty when aux_weight is 0)
    first:     (prompts, dialogues, scored) of the step's own questions (round 0): the logged rewards and samples
    rounds:    generation rounds run (dynamic sampling: > 1)
    n_zero, n_seen: questions whose rollouts carried no advantage / all questions seen (filter_groups)
    trained:   questions whose rollouts are in the batch
    times:     wall time of its phases ({"gen": s, "score": s})
    weights_version: the generator's weight version (syncs done) when its rollouts were generated
    """

    batch: RolloutBatch
    aux: list
    first: tuple
    rounds: int
    n_zero: int
    n_seen: int
    trained: int
    times: dict
    weights_version: int = 0


def rollout_batch(dialogues: list[TokenizedDialogue], advantages: torch.Tensor, turn_advantages: list | None,
                  policy_turns: str, mask_truncated: bool = False) -> RolloutBatch:
    """The rollouts as training sequences: the loss on every student turn ("all") or the last ("final");
    mask_truncated: not on turns cut off at max_new_tokens (TRL's mask_truncated_completions)."""
    ids, mask, glp, turns = [], [], [], []
    for d in dialogues:
        ids.append(torch.tensor(d.input_ids, dtype=torch.int64))
        m = torch.tensor(d.token_mask("all" if policy_turns == "all" else "last"), dtype=torch.bool)
        tid = torch.tensor(assistant_turn_ids(d), dtype=torch.int64)
        if mask_truncated and any(d.truncated):
            cut = torch.tensor([False] + list(d.truncated))  # index 0: outside assistant turns (turn id -1)
            m &= ~cut[tid + 1]
        mask.append(m)
        glp.append(torch.tensor(d.logprobs, dtype=torch.float32))
        turns.append(tid)
    ta = None if turn_advantages is None else [torch.tensor(t, dtype=torch.float32) for t in turn_advantages]
    return RolloutBatch(ids, mask, glp, advantages.float(), turn_ids=turns if ta is not None else None,
                        turn_advantages=ta)


def informative_questions(prompts: list[Prompt], scored) -> list[int]:
    """The step's questions (indices into its plan) whose rollouts carry any non-zero advantage: a question whose
    rollouts all got the same reward (every group of it constant) gives the policy loss nothing to learn from."""
    live = set()
    for i, p in enumerate(prompts):
        turn = scored.turn_advantages[i] if scored.turn_advantages is not None else []
        if float(scored.advantages[i]) != 0.0 or any(a != 0.0 for a in turn):
            live.add(p.question)
    return sorted(live)


def keep_questions(prompts: list[Prompt], dialogues: list, scored, questions: list[int]):
    """(prompts, dialogues, rewards, advantages [S'], turn_advantages or None) of the rollouts of ``questions``."""
    keep = set(questions)
    idx = [i for i, p in enumerate(prompts) if p.question in keep]
    ta = None if scored.turn_advantages is None else [scored.turn_advantages[i] for i in idx]
    return ([prompts[i] for i in idx], [dialogues[i] for i in idx], [scored.rewards[i] for i in idx],
            scored.advantages[idx] if idx else scored.advantages[:0], ta)


def sample_records(n_per_scenario: int, prompts: list[Prompt], dialogues, rewards, dtok) -> list[dict]:
    """The first ``n_per_scenario`` rollouts of each scenario (or prompt kind) of the step's first question, for
    samples.jsonl."""
    out, seen = [], {}
    for p, d, r in zip(prompts, dialogues, rewards):
        if p.question != 0 or seen.get(p.scenario, 0) >= n_per_scenario:
            continue
        seen[p.scenario] = seen.get(p.scenario, 0) + 1
        out.append({"scenario": p.scenario, "reward": r, "answer": p.answers[-1][0],
                    "text": dtok.tok.decode(d.input_ids)[:4000]})
    return out
