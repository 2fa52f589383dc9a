"""Rewards of ExGRPO: the outcome reward and user reward functions, the Dialogue Structure Utility bonus (paper
Eq. 5-6), per-turn probe credit, and group advantages.

Outcome reward R_base: the reward functions of ``TrainConfig.rewards`` on the final answer, weighted and summed.
``answer`` is the answer checker (1 if the final answer equals the gold answer, else 0: the paper's R_base); any
other entry is ``module:function`` with TRL's reward-function signature,

    f(prompts: list[str], completions: list[str], *, completion_ids: list[list[int]], answer: list[str],
      answer_type: list[str], **kwargs) -> list[float]

(the last user turn, the final assistant turn, its token ids, and the gold answer of each trajectory).

DSU bonus: for a question with Scenario-A correctness a [G] (all k probes, then the question) and Scenario-B
correctness b [G] (the first k' probes): P_full = mean(a), P_partial = mean(b), r_dsu = delta if P_full > nu *
P_partial else 0, added to the Scenario-A trajectories that answered correctly. Scenario B keeps its reward.

Groups are typed keys (``Group``), mapped to dense ids only when the advantages are computed: no packed integers
whose ranges could collide.
"""
from __future__ import annotations

import importlib
import random
from dataclasses import dataclass
from collections.abc import Callable

import torch

from exgrpo.config import TrainConfig
from exgrpo.data.answers import is_correct
from exgrpo.generation import assistant_texts
from exgrpo.rollouts import Prompt
from exgrpo_kernels import grouped_advantages

RewardFn = Callable[..., list]


# ================================================================================================ reward functions


def answer_reward(prompts, completions, *, answer, answer_type, **kwargs) -> list[float]:
    """1.0 where the completion's final answer equals the gold answer (exgrpo.data.answers.is_correct), else 0."""
    return [float(is_correct(c, a, t)) for c, a, t in zip(completions, answer, answer_type)]


BUILTIN_REWARDS = {"answer": answer_reward}


def load_reward_fns(names, field_name: str = "rewards") -> list[RewardFn]:
    """The reward functions named in ``names``: built-ins (``answer``) or ``module:function`` import paths."""
    out = []
    for n in names:
        if n in BUILTIN_REWARDS:
            out.append(BUILTIN_REWARDS[n])
            continue
        mod, _, fn = n.partition(":")
        if not mod or not fn:
            raise ValueError(f"{field_name}: {n!r} is neither a built-in reward ({', '.join(BUILTIN_REWARDS)}) nor "
                             f"module:function")
        try:
            f = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{field_name}: cannot load reward function {n!r}: {e}") from None
        if not callable(f):
            raise ValueError(f"{field_name}: {n!r} is not callable")
        out.append(f)
    return out


def outcome_rewards(fns: list[RewardFn], weights, prompts: list[str], completions: list[str], completion_ids,
                    answers: list[str], answer_types: list[str]) -> tuple[list[float], dict]:
    """(sum_f w_f f(...) per trajectory, {"reward_fn/<name>": its unweighted rewards} for the log); a reward function
    that raises, returns the wrong count or a non-number is a one-line error naming it."""
    total, per_fn = [0.0] * len(completions), {}
    for f, w in zip(fns, weights or [1.0] * len(fns)):
        name = getattr(f, "__qualname__", repr(f))
        try:
            r = list(f(prompts, completions, completion_ids=completion_ids, answer=answers, answer_type=answer_types))
        except Exception as e:  # a user's function: report which one, and why
            raise ValueError(f"reward function {name} raised {type(e).__name__}: {e}") from e
        per_fn[f"reward_fn/{name}"] = r
        if len(r) != len(completions):
            raise ValueError(f"reward function {name} returned {len(r)} rewards for {len(completions)} completions")
        for i, v in enumerate(r):
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"reward function {name} returned {v!r} for completion {i} (a number is needed)")
            total[i] += float(w) * float(v)
    return total, per_fn


# ================================================================================================ the DSU bonus


@dataclass(frozen=True)
class DSUResult:
    total_a: list[float]  # [G] R_total of Scenario A
    total_b: list[float]  # [G] R_total of Scenario B
    p_full: float
    p_partial: float
    bonus: float  # r_dsu (0 or delta)


def dsu_rewards(base_a, base_b, *, delta: float, nu: float, enabled: bool = True, correct_a=None,
                correct_b=None) -> DSUResult:
    """Eq. 5-6. base_a / base_b: the outcome rewards of Scenario A / B, [G] each; correct_a / correct_b: whether
    each trajectory's final answer is correct (default: reward == 1, the answer checker's reward). P_full and
    P_partial are the scenarios' mean correctness; the bonus goes to the correct A trajectories."""
    if not base_a or not base_b:
        raise ValueError("dsu_rewards needs at least one trajectory in each scenario")
    correct_a = [r == 1 for r in base_a] if correct_a is None else list(correct_a)
    correct_b = [r == 1 for r in base_b] if correct_b is None else list(correct_b)
    p_full = sum(correct_a) / len(correct_a)
    p_partial = sum(correct_b) / len(correct_b)
    bonus = delta if enabled and p_full > nu * p_partial else 0.0
    total_a = [r + bonus if c else r for r, c in zip(base_a, correct_a)]
    return DSUResult([float(x) for x in total_a], [float(x) for x in base_b], p_full, p_partial, bonus)


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


# ================================================================================================ scoring


@dataclass(frozen=True)
class Group:
    """An advantage group: the rollouts (or turns) normalised together."""

    question: int  # index of the question in the step
    part: str  # "both" (a question's 2G dialogues), "A" / "B" (per scenario), "prompt" (independent / direct)
    probe: int = -1  # the probe (-1: the question itself)
    turn: str = "final"  # per-turn credit: "final" (the question's answer) or "probe"


def dense_ids(keys: list) -> torch.Tensor:
    """[S] int64: each key's index in first-seen order (equal keys, equal ids)."""
    index: dict = {}
    return torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.int64)


@dataclass
class Scored:
    """Rewards and advantages of one step's rollouts (this rank). S rollouts.

    rewards:         [S] total reward of each trajectory (its outcome reward, + the bonus)
    advantages:      [S] fp32 sequence advantages (used when turn_advantages is None)
    turn_advantages: S lists, one advantage per assistant turn (probe_rewards), or None
    metrics:         name -> list of values, averaged over ranks for the log
    """

    rewards: list
    advantages: torch.Tensor
    turn_advantages: list | None
    metrics: dict


def score_rollouts(cfg: TrainConfig, prompts: list[Prompt], dialogues, dtok, rng: random.Random,
                   reward_fns: list[RewardFn] | None = None) -> Scored:
    """Outcome rewards of the final answers (and the correctness of each checkable turn for probe_rewards), the DSU
    bonus in dialogue mode, and group advantages. Groups: dialogue mode, a question's 2G rollouts (both scenarios:
    the bonus must survive normalisation) or per scenario (advantage_groups); per-turn credit, each probe's answers
    across the trajectories that asked it, and the final answers; independent and direct modes, each prompt's G
    samples. Metrics: reward_question (the question's answer over every rollout), reward_direct (the question asked
    with no probe before it: the evaluated condition), reward_after_probes (after at least one probe), the
    bonus's firing rate and its permutation baseline."""
    reward_fns = reward_fns if reward_fns is not None else load_reward_fns(cfg.rewards)
    texts = [assistant_texts(dtok, d) for d in dialogues]
    correct = [[float(is_correct(t, a, at)) for t, (a, at) in zip(ts, p.answers)] for ts, p in zip(texts, prompts)]
    total, per_fn = outcome_rewards(reward_fns, cfg.reward_weights, [p.turns[-1] for p in prompts],
                                    [t[-1] for t in texts], [_last_turn_ids(d) for d in dialogues],
                                    [p.answers[-1][0] for p in prompts],
                                    [p.answers[-1][1] for p in prompts]) if prompts else ([], {})
    final = [c[-1] for c in correct]
    metrics: dict = {"reward": [], "reward_question": [], "reward_direct": [], "reward_after_probes": [],
                     "reward_probes": [x for c in correct for x in c[:-1]]}
    if len(reward_fns) > 1:
        metrics.update(per_fn)
    if cfg.overlong_buffer:  # DAPO's soft overlong punishment of the final answer
        pen = [overlong_penalty(len(_last_turn_ids(d)), cfg.sampling.max_new_tokens, cfg.overlong_buffer,
                                cfg.overlong_penalty_factor) for d in dialogues]
        total = [t + p for t, p in zip(total, pen)]
        metrics["reward_overlong"] = pen
    group: list = [None] * len(prompts)
    n_q = max((p.question for p in prompts), default=-1) + 1
    by_q = [[i for i, p in enumerate(prompts) if p.question == q] for q in range(n_q)]
    for qi, idx in enumerate(by_q):
        for i in idx:
            if prompts[i].scenario == "probe":
                metrics["reward_probes"].append(final[i])
            else:
                metrics["reward_question"].append(final[i])
                metrics["reward_direct" if len(prompts[i].turns) == 1 else "reward_after_probes"].append(final[i])
        if cfg.mode in ("independent", "direct", "opd"):
            for i in idx:
                group[i] = Group(qi, "prompt", prompts[i].probe_ids[0])
            continue
        ia = [i for i in idx if prompts[i].scenario == "A"]
        ib = [i for i in idx if prompts[i].scenario == "B"]
        fa, fb = [final[i] for i in ia], [final[i] for i in ib]
        r = dsu_rewards([total[i] for i in ia], [total[i] for i in ib], delta=cfg.delta, nu=cfg.nu, enabled=cfg.dsu,
                        correct_a=[x == 1 for x in fa], correct_b=[x == 1 for x in fb])
        for i, v in zip(ia + ib, r.total_a + r.total_b):
            total[i] = v
            group[i] = Group(qi, prompts[i].scenario if cfg.advantage_groups == "scenario" else "both")
        metrics.setdefault("reward_base_A", []).extend(fa)
        metrics.setdefault("reward_base_B", []).extend(fb)
        metrics.setdefault("bonus_rate", []).append(float(r.p_full > cfg.nu * r.p_partial))  # the gate (dsu on or off)
        metrics.setdefault("bonus_rate_perm", []).append(perm_firing(fa + fb, len(fa), cfg, rng))
        metrics.setdefault("p_full", []).append(r.p_full)
        metrics.setdefault("p_partial", []).append(r.p_partial)
    metrics["reward"] = list(total)
    adv = grouped_advantages(torch.tensor(total), dense_ids(group)) if total else torch.zeros(0)
    turn_adv = _turn_advantages(prompts, total, correct, group) if cfg.probe_rewards else None
    return Scored(total, adv, turn_adv, metrics)


def overlong_penalty(length: int, max_len: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer tokens, then linear down to -factor at max_len."""
    if buffer <= 0:
        return 0.0
    return -factor * min(1.0, max(0, length - (max_len - buffer)) / buffer)


def _turn_advantages(prompts: list[Prompt], total, correct, group) -> list[list[float]]:
    """Per-turn credit: each probe turn rewarded on its own answer, grouped with the same probe's answers in the
    other trajectories of its group; the final turn with the trajectory's total reward."""
    vals, keys, where = [], [], []
    for i, p in enumerate(prompts):
        for j, pid in enumerate(p.probe_ids):
            last = j == len(p.probe_ids) - 1
            vals.append(total[i] if last else correct[i][j])
            g = group[i]
            keys.append(Group(g.question, g.part, -1 if last else pid, "final" if last else "probe"))
            where.append((i, j))
    ta = grouped_advantages(torch.tensor(vals), dense_ids(keys)).tolist() if vals else []
    out = [[0.0] * len(p.probe_ids) for p in prompts]
    for (i, j), v in zip(where, ta):
        out[i][j] = v
    return out


def _last_turn_ids(d) -> list[int]:
    last = max(i for i, r in enumerate(d.roles) if r == "assistant")
    return [t for t, g, m in zip(d.input_ids, d.generated, d.message_index) if g and m == last]
