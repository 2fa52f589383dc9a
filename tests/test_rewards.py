"""Rewards: the answer checker and user reward functions (TRL's signature, weights, clear errors), the DSU bonus on
correctness when other reward terms are present, typed group keys that cannot collide, and direct-mode prompts."""
import random

import pytest
import torch

from exgrpo.config import TrainConfig
from exgrpo.dialogue import DialogueTokenizer
from exgrpo.rewards import Group, answer_reward, dense_ids, dsu_rewards, load_reward_fns, outcome_rewards, score_rollouts
from exgrpo.rollouts import Plan, Prompt, build_prompts
from exgrpo.tokenizer import byte_tokenizer


def length_bonus(prompts, completions, **kwargs):
    """A user reward (module:function): 0.1 per word, TRL's signature."""
    return [0.1 * len(c.split()) for c in completions]


def wrong_count(prompts, completions, **kwargs):
    return [1.0]


def broken(prompts, completions, **kwargs):
    return [1 / 0 for _ in completions]


def _dialogues(dtok, prompts, answers):
    out = []
    for p, ans in zip(prompts, answers):
        msgs = []
        for u, a in zip(p.turns, ans):
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        out.append(dtok.encode(msgs))
    return out


def test_reward_functions_load_weight_and_fail_clearly():
    fns = load_reward_fns(("answer", "tests.test_rewards:length_bonus"))
    assert fns == [answer_reward, length_bonus]
    r, per_fn = outcome_rewards(fns, (1.0, 2.0), ["q", "q"], ["The answer is 3.", "no"], [[1], [2]], ["3", "3"],
                                ["number", "number"])
    assert r == pytest.approx([1.0 + 2 * 0.4, 0.2])
    assert per_fn == {"reward_fn/answer_reward": [1.0, 0.0], "reward_fn/length_bonus": pytest.approx([0.4, 0.1])}
    with pytest.raises(ValueError, match=r"^reward function broken raised ZeroDivisionError: division by zero$"):
        outcome_rewards([broken], (), ["q"], ["a"], [[1]], ["1"], ["number"])
    with pytest.raises(ValueError, match=r"rewards: 'nope' is neither a built-in reward \(answer\) nor module:function"):
        load_reward_fns(("nope",))
    with pytest.raises(ValueError, match=r"cannot load reward function 'tests.test_rewards:missing'"):
        load_reward_fns(("tests.test_rewards:missing",))
    with pytest.raises(ValueError, match=r"wrong_count returned 1 rewards for 2 completions"):
        outcome_rewards([wrong_count], (), ["q", "q"], ["a", "b"], [[1], [2]], ["1", "1"], ["number"] * 2)
    with pytest.raises(ValueError, match=r"reward_weights has 1 weights for 2 reward functions"):
        TrainConfig(rewards=("answer", "tests.test_rewards:length_bonus"), reward_weights=(1.0,))


def test_dsu_gate_uses_correctness_when_other_rewards_are_added():
    # A: two correct (rewards 1.3, 1.1 with a length term), one wrong (0.4); B: one correct of three
    r = dsu_rewards([1.3, 1.1, 0.4], [1.2, 0.3, 0.2], delta=0.5, nu=1.0, correct_a=[True, True, False],
                    correct_b=[True, False, False])
    assert r.p_full == pytest.approx(2 / 3) and r.p_partial == pytest.approx(1 / 3) and r.bonus == 0.5
    assert r.total_a == pytest.approx([1.8, 1.6, 0.4]) and r.total_b == pytest.approx([1.2, 0.3, 0.2])


def test_group_keys_never_collide():
    # the old packed integers (2 * (q * 64 + probe + 1), group * 1000 + turn) collided past 63 probes / 1000 turns
    keys = [Group(0, "prompt", 63), Group(1, "prompt", -1), Group(0, "prompt", 63), Group(0, "both", 999, "probe"),
            Group(0, "both", -1, "final")]
    assert dense_ids(keys).tolist() == [0, 1, 0, 2, 3]


def test_direct_mode_is_plain_grpo_on_the_question():
    cfg = TrainConfig(init=None, mode="direct", G=3, dsu=False, aux_weight=0.0)
    plan = [Plan("Q1?", "3", "number", [], 0, []), Plan("Q2?", "5", "number", [], 0, [])]
    prompts = build_prompts(plan, cfg)
    assert [(p.question, p.turns, p.scenario) for p in prompts] == [(0, ["Q1?"], "question")] * 3 + \
        [(1, ["Q2?"], "question")] * 3
    dtok = DialogueTokenizer(byte_tokenizer())
    texts = [["The answer is 3."], ["The answer is 4."], ["The answer is 3."], ["The answer is 5."]] + \
        [["The answer is 5."]] * 2
    s = score_rollouts(cfg, prompts, _dialogues(dtok, prompts, texts), dtok, random.Random(0))
    assert s.rewards == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    r = torch.tensor([1.0, 0.0, 1.0])
    want = torch.cat([(r - r.mean()) / (r.std() + 1e-4), torch.zeros(3)])  # a tied group has no advantage
    assert torch.allclose(s.advantages, want, atol=1e-5)
    assert s.metrics["reward_direct"] == s.rewards and s.metrics["reward_after_probes"] == []


def test_reward_metrics_split_direct_and_after_probes():
    cfg = TrainConfig(init=None, G=2, k=1, k_partial=0)
    A = Prompt(0, "A", ["P?", "Q?"], [("7", "number"), ("3", "number")], [0, -1])
    B = Prompt(0, "B", ["Q?"], [("3", "number")], [-1])
    prompts = [A, A, B, B]
    texts = [["7", "The answer is 3."], ["7", "The answer is 2."], ["The answer is 3."], ["The answer is 3."]]
    dtok = DialogueTokenizer(byte_tokenizer())
    s = score_rollouts(cfg, prompts, _dialogues(dtok, prompts, texts), dtok, random.Random(0))
    assert s.metrics["reward_after_probes"] == [1.0, 0.0] and s.metrics["reward_direct"] == [1.0, 1.0]
    assert s.metrics["bonus_rate"] == [0.0]  # P_full 0.5 < P_partial 1.0
