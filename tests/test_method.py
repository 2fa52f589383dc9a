"""Method options of the trainer: SFT on (probe -> rationale) pairs, Scenario B with k' = 0 and random truncation,
the paper's independent-probe arm, per-turn probe rewards (by hand, and through the GRPO kernel), the DSU gate's
permutation baseline."""
import random

import pytest
import torch
from exgrpo_kernels import GRPOLossConfig, grpo_loss_reference

from exgrpo.config import ModelConfig, SamplingConfig, SFTConfig, TrainConfig
from exgrpo.dialogue import DialogueTokenizer
from exgrpo.grpo import train
from exgrpo.io import read_jsonl
from exgrpo.model import PolicyHidden, build_student
from exgrpo.rewards import perm_firing, score_rollouts
from exgrpo.rollouts import Prompt, build_prompts, scenarios
from exgrpo.sft import sft, sft_examples
from exgrpo.steps import GRPOInputs, StepContext, grpo_micro_loss
from exgrpo.tokenizer import byte_tokenizer
from tests.utils import ei_data

TINY = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ei_data(tmp_path_factory, limit=10, rules_per_example=3, arith_ops=1)


def test_sft_pairs_form_is_probe_then_rationale_alone(data, tmp_path):
    recs = read_jsonl(data)
    pairs = sft_examples(recs, "pairs")
    assert len(pairs) == sum(len(r["probes"]) + 1 for r in recs)
    r = recs[0]
    want = [[{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["rationale"]}]
            for p in r["probes"]] + [[{"role": "user", "content": r["question"]},
                                      {"role": "assistant", "content": r["rationale"]}]]
    assert pairs[:len(want)] == want  # the question asked directly is a training pair: the evaluated condition
    assert sft_examples(recs, "dialogue") == [x["messages"] for x in recs]
    assert sft_examples(recs, "pairs+dialogue") == pairs + [x["messages"] for x in recs]
    for fmt in ("pairs", "dialogue", "pairs+dialogue"):
        out = sft(SFTConfig(data=data, model=TINY, out_dir=str(tmp_path / fmt), max_steps=1, batch_dialogues=4,
                            format=fmt, progress=False))
        assert out["steps"] == 1
    with pytest.raises(ValueError, match=r"SFTConfig.format must be one of \('pairs', 'dialogue', 'pairs\+dialogue'\), "
                                         r"got 'turns'"):
        SFTConfig(format="turns")


def test_scenario_b_direct_question_and_random_truncation(data):
    q = read_jsonl(data)[0]
    cfg = TrainConfig(init=None, k=3, k_partial=0)
    p = scenarios(q, cfg, random.Random(1))
    prompts = build_prompts([p], cfg.__class__(init=None, k=3, k_partial=0, G=2))
    b = [x for x in prompts if x.scenario == "B"]
    assert b and all(x.turns == [q["question"]] for x in b)  # k' = 0: the question asked directly
    a = [x for x in prompts if x.scenario == "A"][0]
    assert len(a.turns) == 4 and a.turns[-1] == q["question"] and a.probe_ids == [0, 1, 2, -1]
    rnd = TrainConfig(init=None, k=3, k_partial_mode="random")
    kps = [scenarios(q, rnd, random.Random(s)).k_partial for s in range(60)]
    assert set(kps) == {0, 1, 2}  # uniform over [0, k)
    assert kps == [scenarios(q, rnd, random.Random(s)).k_partial for s in range(60)]  # deterministic


def test_independent_mode_prompts_and_groups(data):
    q = read_jsonl(data)[0]
    cfg = TrainConfig(init=None, k=2, k_partial=1, G=3, mode="independent")
    prompts = build_prompts([scenarios(q, cfg, random.Random(0))], cfg)
    kinds = [p.scenario for p in prompts]
    assert kinds == ["probe"] * 6 + ["question"] * 3 and all(len(p.turns) == 1 for p in prompts)


def _dialogues(dtok, prompts, answers):
    """Dialogues as if the student had answered each turn with the given texts."""
    out = []
    for p, ans in zip(prompts, answers):
        msgs = []
        for u, a in zip(p.turns, ans):
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        out.append(dtok.encode(msgs))
    return out


def test_probe_rewards_by_hand():
    dtok = DialogueTokenizer(byte_tokenizer())
    cfg = TrainConfig(init=None, G=2, k=1, k_partial=0, probe_rewards=True, delta=0.5)
    probe = ("P?", "7", "number")
    A = Prompt(0, "A", ["P?", "Q?"], [(probe[1], probe[2]), ("3", "number")], [0, -1])
    B = Prompt(0, "B", ["Q?"], [("3", "number")], [-1])
    prompts = [A, A, B, B]
    # A1: probe right, final right; A2: probe wrong, final right; B1 right; B2 wrong
    texts = [["The answer is 7.", "The answer is 3."], ["The answer is 8.", "The answer is 3."],
             ["The answer is 3."], ["The answer is 5."]]
    s = score_rollouts(cfg, prompts, _dialogues(dtok, prompts, texts), dtok, random.Random(0))
    # finals: A [1, 1] B [1, 0]: P_full 1 > P_partial 0.5 -> bonus 0.5 on A's correct finals
    assert s.rewards == [1.5, 1.5, 1.0, 0.0]
    fin = torch.tensor([1.5, 1.5, 1.0, 0.0])
    fin_adv = (fin - fin.mean()) / (fin.std() + 1e-4)
    pr = torch.tensor([1.0, 0.0])
    pr_adv = (pr - pr.mean()) / (pr.std() + 1e-4)
    got = s.turn_advantages
    assert got[0] == pytest.approx([pr_adv[0].item(), fin_adv[0].item()], abs=1e-5)
    assert got[1] == pytest.approx([pr_adv[1].item(), fin_adv[1].item()], abs=1e-5)  # wrong probe: negative credit
    assert got[2] == pytest.approx([fin_adv[2].item()], abs=1e-5) and got[3] == pytest.approx([fin_adv[3].item()], abs=1e-5)
    assert s.metrics["reward_probes"] == [1.0, 0.0]


def test_per_turn_advantages_reach_the_kernel_per_token():
    """GRPOInputs with per-turn advantages: the loss equals the reference loss computed with each assistant turn as
    its own segment (its tokens carry that turn's advantage)."""
    model, tok = build_student(TINY, seed=0)
    model = model.double()
    dtok = DialogueTokenizer(tok)
    d = dtok.encode([{"role": "user", "content": "a?"}, {"role": "assistant", "content": "x1"},
                     {"role": "user", "content": "b?"}, {"role": "assistant", "content": "y22"}])
    from exgrpo.generation import assistant_turn_ids
    ids = torch.tensor(d.input_ids)
    mask = torch.tensor(d.token_mask("all"))
    turns = torch.tensor(assistant_turn_ids(d))
    x = GRPOInputs(seqs=[(ids, mask)], advantages=torch.tensor([0.3]), gen_logp=[torch.zeros(len(ids))],
                   turn_ids=[turns], turn_advantages=[torch.tensor([1.5, -0.7])])
    p = PolicyHidden(model)
    ctx = StepContext(policy=p, module=p, device=torch.device("cpu"))
    cfg = GRPOLossConfig(beta=0.0)
    loss, _ = grpo_micro_loss(ctx, x, [0], cfg)
    from exgrpo.attention import IMPL
    model.set_attn_implementation("sdpa")
    h = model.model(input_ids=ids[None]).last_hidden_state[0]
    model.set_attn_implementation(IMPL)
    tgt = torch.cat([ids[1:], ids.new_tensor([-100])])
    lm = torch.cat([mask[1:], mask.new_zeros(1)])
    seg = torch.cat([turns[1:], turns.new_tensor([-1])]).clamp(min=0)
    ref, _ = grpo_loss_reference(h, model.lm_head.weight, tgt, seg, torch.tensor([1.5, -0.7], dtype=torch.float64), lm,
                                 cfg)
    assert torch.allclose(loss.double(), ref, rtol=1e-6)
    assert not torch.allclose(loss.double(), grpo_loss_reference(h, model.lm_head.weight, tgt, torch.zeros_like(seg),
                                                                 torch.tensor([0.3], dtype=torch.float64), lm, cfg)[0])


def test_dsu_gate_permutation_baseline():
    cfg = TrainConfig(init=None, nu=1.0, perm_samples=400)
    rng = random.Random(0)
    assert perm_firing([1.0] * 8, 4, cfg, rng) == 0.0  # equal rewards never fire (strict >)
    # one correct among 4+4: shuffled, it lands in A half the time -> the gate fires by chance ~ 1/2
    assert perm_firing([1, 0, 0, 0, 0, 0, 0, 0], 4, cfg, rng) == pytest.approx(0.5, abs=0.08)
    # two of eight correct: fires when A holds more of them: P(2 in A) + P(1 in A and 0 in B)... = 3/14 + 0 = 0.2143
    assert perm_firing([1, 1, 0, 0, 0, 0, 0, 0], 4, cfg, rng) == pytest.approx(6 / 28, abs=0.06)


def test_exgrpo_steps_in_every_mode(data, tmp_path):
    init = sft(SFTConfig(data=data, model=TINY, out_dir=str(tmp_path / "sft"), max_steps=1, batch_dialogues=4,
                         progress=False))["final"]
    common = dict(data=data, init=init, model=TINY, steps=1, questions_per_step=2, G=2, k=2, k_partial=0,
                  sampling=SamplingConfig(max_new_tokens=8), progress=False, backend="transformers")
    for name, over in (("independent", dict(mode="independent")), ("probe", dict(probe_rewards=True)),
                       ("random", dict(k_partial_mode="random"))):
        out = train(TrainConfig(out_dir=str(tmp_path / name), **common, **over))
        assert out["steps"] == 1
    with pytest.raises(ValueError, match="probe_rewards gives each turn its own advantage"):
        TrainConfig(probe_rewards=True, loss=GRPOLossConfig(loss_type="grpo"))
