"""RL is seen to learn (behaviour, seeded, not timed), and the tests can fail.

Task: the 55 one-digit sums a + b <= 9, answered with the digit alone (the answer is the first generated token, so a
loss mask off by one token misses it). A tiny student SFT'd for 150 steps samples the right digit ~40% of the time;
60 GRPO steps on the question asked directly (G = 8, 16 questions a step) raise the sampled reward by +0.15 to
+0.24 (seeds 0-2, measured). The same run with the advantages negated drops it to ~0, and with the loss mask shifted
by one token (the classic bug: the mask not shifted with the targets, so each position trains the token after a
generated one) it falls by 0.07-0.14: the margin below fails both.

DSU: a task where the probe helps, "Again?" after the student has answered "a+b=" (the gold answer is that sum):
with the probe in context a dialogue-SFT'd student answers it (P_full ~0.5), asked directly it cannot (P_partial
~0.07), and the gate fires far above its permutation baseline (0.75 vs 0.28 measured). With each question's probe
taken from a question with another sum (the probe misleads), it does not.
"""
import json
import statistics

import pytest
import torch

import exgrpo.grpo as grpo
from exgrpo.config import ModelConfig, OptimConfig, SamplingConfig, SFTConfig, TrainConfig
from exgrpo.sft import sft

TINY = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, head_dim=32)
FACTS = [(a, b) for a in range(10) for b in range(10) if a + b <= 9]
MARGIN = 0.08  # reward gain (mean of the last 5 steps minus the first 5) the correct update must exceed


def _write(path, recs):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return str(path)


def _sums(tmp_path):
    recs = [{"id": f"{a}+{b}", "question": f"{a}+{b}=", "answer": str(a + b), "answer_type": "number",
             "rationale": str(a + b), "probes": [],
             "messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]}
            for a, b in FACTS]
    return _write(tmp_path / "sums.jsonl", recs)


@pytest.fixture(scope="module")
def sft_student(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    data = _sums(root)
    final = sft(SFTConfig(data=data, model=TINY, out_dir=str(root / "sft"), max_steps=150, batch_dialogues=16,
                          progress=False, optim=OptimConfig(lr=3e-3, warmup_steps=5, min_lr_ratio=1.0)))["final"]
    return root, data, final


def _rl_gain(root, data, init, name) -> float:
    out = root / f"rl_{name}"
    grpo.train(TrainConfig(data=data, init=init, model=TINY, out_dir=str(out), steps=60, questions_per_step=16, G=8,
                           mode="direct", dsu=False, aux_weight=0.0, loss=TrainConfig().loss.replace(beta=0.0),
                           optim=OptimConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0),
                           sampling=SamplingConfig(max_new_tokens=4), backend="transformers", log_samples=0,
                           progress=False))
    r = [json.loads(x)["reward_direct"] for x in open(out / "metrics.jsonl")]
    return statistics.mean(r[-5:]) - statistics.mean(r[:5])


@pytest.mark.parametrize("variant", ["correct", "advantages_negated", "mask_shifted_by_one"])
def test_grpo_raises_the_reward_and_a_sign_or_mask_bug_does_not(sft_student, variant, monkeypatch):
    root, data, init = sft_student
    if variant == "advantages_negated":
        score = grpo.score_rollouts

        def negated(*a, **k):
            s = score(*a, **k)
            s.advantages = -s.advantages
            return s
        monkeypatch.setattr(grpo, "score_rollouts", negated)
    if variant == "mask_shifted_by_one":
        batch_of = grpo.rollout_batch

        def shifted(*a, **k):
            b = batch_of(*a, **k)
            b.mask = [torch.cat([m.new_zeros(1), m[:-1]]) for m in b.mask]
            return b
        monkeypatch.setattr(grpo, "rollout_batch", shifted)
    gain = _rl_gain(root, data, init, variant)
    assert (gain > MARGIN) == (variant == "correct"), f"{variant}: reward gain {gain:+.3f} (margin {MARGIN})"


def _again(tmp_path, helpful: bool):
    recs = []
    for a, b in FACTS:
        # a misleading probe: a question whose sum differs by 5 (mod 10), so copying its answer is always wrong
        pa, pb = (a, b) if helpful else next(f for f in FACTS if sum(f) == (a + b + 5) % 10)
        probe = {"rule": "decomposition", "question": f"{pa}+{pb}=", "rationale": str(pa + pb), "answer": str(pa + pb),
                 "answer_type": "number"}
        recs.append({"id": f"{a}+{b}", "question": "Again?", "answer": str(a + b), "answer_type": "number",
                     "rationale": str(a + b), "probes": [probe],
                     "messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)},
                                  {"role": "user", "content": "Again?"}, {"role": "assistant", "content": str(a + b)}]})
    return _write(tmp_path / f"again_{helpful}.jsonl", recs)


@pytest.fixture(scope="module")
def dialogue_student(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsu")
    data = _again(root, True)
    final = sft(SFTConfig(data=data, model=TINY, out_dir=str(root / "sft"), max_steps=150, batch_dialogues=16,
                          format="dialogue", progress=False, optim=OptimConfig(lr=3e-3, warmup_steps=5,
                                                                                min_lr_ratio=1.0)))["final"]
    return root, final


@pytest.mark.parametrize("helpful", [True, False])
def test_dsu_gate_fires_above_chance_only_when_probes_help(dialogue_student, helpful):
    root, init = dialogue_student
    data = _again(root, helpful)
    out = root / f"rl_{helpful}"
    grpo.train(TrainConfig(data=data, init=init, model=TINY, out_dir=str(out), steps=8, questions_per_step=16, G=4, k=1,
                           k_partial=0, aux_weight=0.0, loss=TrainConfig().loss.replace(beta=0.0),
                           optim=OptimConfig(lr=1e-4, warmup_steps=0, min_lr_ratio=1.0),
                           sampling=SamplingConfig(max_new_tokens=4), backend="transformers", log_samples=0,
                           progress=False))
    m = [json.loads(x) for x in open(out / "metrics.jsonl")]
    fires, chance = (statistics.mean(r[k] for r in m) for k in ("bonus_rate", "bonus_rate_perm"))
    p_full, p_partial = (statistics.mean(r[k] for r in m) for k in ("p_full", "p_partial"))
    if helpful:
        assert p_full > p_partial + 0.2 and fires > chance + 0.25, (p_full, p_partial, fires, chance)
    else:
        assert fires < chance + 0.1, (p_full, p_partial, fires, chance)


@pytest.mark.parametrize("variant", ["correct", "advantage_negated"])
def test_on_policy_distillation_pulls_the_student_toward_the_teacher(sft_student, variant, monkeypatch):
    """mode=opd: a random-init student samples, the SFT'd model (the teacher) scores every sampled token, the
    per-token advantage l_teacher - l_student goes through the fused kernel. The reverse KL to the teacher on the
    student's own samples falls (30 steps, lr 3e-3); with the advantage negated it does not."""
    import exgrpo.distill as distill
    root, data, teacher = sft_student
    if variant == "advantage_negated":
        advantages = distill.token_advantages

        def negated(*a, **k):
            out, m = advantages(*a, **k)
            return [-t for t in out], m
        monkeypatch.setattr(distill, "token_advantages", negated)
    out = root / f"opd_{variant}"
    grpo.train(TrainConfig(data=data, init=None, model=TINY, out_dir=str(out), steps=30, questions_per_step=16, G=4,
                           mode="opd", teacher=teacher, dsu=False, aux_weight=0.0,
                           loss=TrainConfig().loss.replace(beta=0.0),
                           optim=OptimConfig(lr=3e-3, warmup_steps=0, min_lr_ratio=1.0),
                           sampling=SamplingConfig(max_new_tokens=4), backend="transformers", log_samples=0,
                           progress=False))
    kl = [json.loads(x)["opd_reverse_kl"] for x in open(out / "metrics.jsonl")]
    first, last = statistics.mean(kl[:5]), statistics.mean(kl[-5:])
    if variant == "correct":  # measured: 6.6 -> ~4.0 nats per token (first / last 5 steps)
        assert last < 0.75 * first, (first, last)
    else:
        assert last > 0.9 * first, (first, last)
