"""The trainer on a tiny random model: SFT and ExGRPO steps, DSU bonus and advantages by hand, packing on vs off,
the trainer's loss against the kernel reference, zero-advantage batches, non-finite steps, config errors,
resume after a kill, and the quick demo."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from exgrpo_kernels import GRPOLossConfig, grouped_advantages, grpo_loss_reference

from exgrpo.config import ModelConfig, OptimConfig, SamplingConfig, SFTConfig, TrainConfig
from exgrpo.grpo import train
from exgrpo.model import PolicyHidden, build_student
from exgrpo.optim import NonFiniteGuard, make_optimizer, optimizer_step
from exgrpo.rewards import dsu_rewards
from exgrpo.rollouts import RolloutBatch
from exgrpo.sft import sft
from exgrpo.steps import StepContext, grpo_micro_loss, grpo_update, step_context
from tests.utils import ei_data

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ei_data(tmp_path_factory, limit=12, rules_per_example=3)


def params(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_dsu_bonus_and_advantages_by_hand():
    r = dsu_rewards([1, 0, 1, 1], [1, 0, 0, 0], delta=0.5, nu=1.0)
    assert r.p_full == 0.75 and r.p_partial == 0.25 and r.bonus == 0.5
    assert r.total_a == [1.5, 0.0, 1.5, 1.5] and r.total_b == [1.0, 0.0, 0.0, 0.0]
    assert dsu_rewards([1, 0], [1, 0], delta=0.5, nu=1.0).bonus == 0  # P_full = P_partial: no bonus
    assert dsu_rewards([1, 1], [1, 0], delta=0.5, nu=2.0).bonus == 0  # 1 > 2 * 0.5 is false
    assert dsu_rewards([1, 1], [1, 0], delta=0.5, nu=1.0, enabled=False).total_a == [1.0, 1.0]
    # the trainer's group is the question's 2G rollouts (both scenarios): the bonus lifts A's correct rollouts
    # above B's. Per-scenario groups would cancel it ((r - mean) / std ignores a shift of every correct rollout).
    adv = grouped_advantages(torch.tensor(r.total_a + r.total_b), torch.tensor([0] * 8))
    x = torch.tensor([1.5, 0, 1.5, 1.5, 1.0, 0, 0, 0])
    assert torch.allclose(adv, (x - x.mean()) / (x.std() + 1e-4), atol=1e-6)
    assert adv[0] > adv[4] > 0  # a correct A rollout now beats a correct B rollout
    no_bonus = grouped_advantages(torch.tensor([1.0, 0, 1, 1, 1, 0, 0, 0]), torch.tensor([0] * 8))
    assert no_bonus[0] == no_bonus[4]
    per_scenario = grouped_advantages(torch.tensor(r.total_a), torch.zeros(4, dtype=torch.long))
    plain = grouped_advantages(torch.tensor([1.0, 0, 1, 1]), torch.zeros(4, dtype=torch.long))
    assert torch.allclose(per_scenario, plain, atol=1e-3)  # (up to eps): why the default groups are per question


def test_one_sft_step_changes_the_model(data, tmp_path):
    r = sft(SFTConfig(data=data, model=TINY, out_dir=str(tmp_path), max_steps=1, batch_dialogues=4, progress=False))
    m = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(m) == 1 and m[0]["loss"] > 0 and not m[0]["skipped"]
    before, _ = build_student(TINY, seed=0)
    after, _ = build_student(ModelConfig(path=r["final"]))
    diff = [n for n, p in before.named_parameters() if not torch.equal(p, dict(after.named_parameters())[n])]
    assert len(diff) == len(list(before.parameters()))


def _fixed_batch(tok, S=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 255, (int(n),), generator=g) for n in torch.randint(6, 20, (S,), generator=g)]
    mask = [torch.rand(len(x), generator=g) > 0.3 for x in ids]
    gen = [-torch.rand(len(x), generator=g) for x in ids]
    adv = torch.randn(S, generator=g)
    return RolloutBatch(ids, mask, gen, adv)


def test_one_exgrpo_update_moves_policy_not_reference():
    model, tok = build_student(TINY, seed=0)
    ref, _ = build_student(TINY, seed=0)
    ref.requires_grad_(False)
    ref0, pol0 = params(ref), params(model)
    cfg = TrainConfig(init=None, model=TINY, G=2, k=2, k_partial=1, optim=OptimConfig(lr=1e-2, warmup_steps=0))
    opt, sched = make_optimizer(model, cfg.optim, 10)
    policy = PolicyHidden(model).train()
    ref_h = PolicyHidden(ref).eval()
    ctx = step_context(cfg, policy, torch.device("cpu"), ref=ref_h)
    x = _fixed_batch(tok).inputs()
    from exgrpo.steps import policy_logprobs
    x.ref_logp = policy_logprobs(ctx, ref_h, x.seqs, 1.0)
    r = grpo_update(ctx, x, [], cfg.loss, lambda ok: optimizer_step(model, opt, sched, cfg.optim, ok, NonFiniteGuard(5)))
    m = r.record()
    assert torch.isfinite(torch.tensor(m["loss"])) and not m["skipped_zero_adv"] and m["kl"] == pytest.approx(0, abs=1e-6)
    assert all(torch.equal(ref0[n], p) for n, p in ref.named_parameters())
    assert any(not torch.equal(pol0[n], p) for n, p in model.named_parameters())


def test_zero_advantages_skip_the_backward():
    model, tok = build_student(TINY, seed=0)
    pol0 = params(model)
    cfg = TrainConfig(init=None, model=TINY, G=2, k=2, k_partial=1)
    opt, sched = make_optimizer(model, cfg.optim, 10)
    batch = _fixed_batch(tok)
    batch.advantages = torch.zeros_like(batch.advantages)
    policy = PolicyHidden(model).train()
    ctx = step_context(cfg, policy, torch.device("cpu"))
    r = grpo_update(ctx, batch.inputs(), [], cfg.loss,
                    lambda ok: optimizer_step(model, opt, sched, cfg.optim, ok, NonFiniteGuard(5)))
    assert r.skipped_zero_adv and r.loss == 0 and r.grad_norm is None
    assert r.metrics["gen_logp_abs_diff_mean"] > 0  # the mismatch is still measured
    assert all(torch.equal(pol0[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "sapo", "luspo", "cispo"])
def test_trainer_loss_equals_the_kernel_reference_and_packing_does_not_change_it(loss_type):
    model, tok = build_student(TINY, seed=1)
    model = model.double()
    policy = PolicyHidden(model)
    b = _fixed_batch(tok, S=5, seed=3)
    lc = GRPOLossConfig(loss_type=loss_type, beta=0.0, compute_entropy=True)
    seqs = list(zip(b.ids, b.mask))
    n_glob = sum(int(m[1:].sum()) for m in b.mask)
    ctx = StepContext(policy=policy, module=policy, device=torch.device("cpu"))
    x = b.inputs()
    packed, _ = grpo_micro_loss(ctx, x, list(range(5)), lc, n_glob)
    # reference: each sequence alone through the model's own forward (no packing), full logits, float64
    hs, tg, sid, lm = [], [], [], []
    for i, (ids, mask) in enumerate(seqs):
        model.set_attn_implementation("sdpa")
        hs.append(model.model(input_ids=ids[None]).last_hidden_state[0])
        tg.append(torch.cat([ids[1:], ids.new_tensor([-100])]))
        sid.append(torch.full((len(ids),), i))
        lm.append(torch.cat([mask[1:], mask.new_zeros(1)]))
    from exgrpo.attention import IMPL
    model.set_attn_implementation(IMPL)
    ref, _ = grpo_loss_reference(torch.cat(hs), policy.lm_head_weight, torch.cat(tg), torch.cat(sid), b.advantages.double(),
                                 torch.cat(lm), lc, num_global_tokens=n_glob)
    assert torch.allclose(packed.double(), ref, rtol=1e-5, atol=1e-7)
    # one sequence per micro-batch: the losses add up to the packed one (every aggregation, scaled by its share)
    singles = sum(grpo_micro_loss(ctx, x, [i], lc, n_glob)[0] for i in range(5))
    assert torch.allclose(singles, packed, rtol=1e-5, atol=1e-7), (float(singles), float(packed))


def test_nonfinite_steps_are_skipped_then_stop_the_run():
    model, _ = build_student(TINY, seed=0)
    oc = OptimConfig(max_nonfinite=2)
    opt, sched = make_optimizer(model, oc, 10)
    guard = NonFiniteGuard(oc.max_nonfinite)
    for i in range(3):
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        if i < 2:
            ok, _ = optimizer_step(model, opt, sched, oc, True, guard)
            assert not ok and all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(RuntimeError, match=r"3 steps with a non-finite loss or gradient \(max_nonfinite=2\)"):
        optimizer_step(model, opt, sched, oc, True, guard)


@pytest.mark.parametrize("over,match", [
    (dict(k=3, k_partial=3), r"k_partial \(k'\) must be in \[0, k=3\), got 3"),
    (dict(G=1), r"G must be >= 2"),
    (dict(nu=0.5), r"nu must be >= 1, got 0.5"),
    (dict(policy_turns="some"), r"policy_turns must be one of \('all', 'final'\), got 'some'"),
    (dict(advantage_groups="batch"), r"advantage_groups must be one of \('question', 'scenario'\), got 'batch'"),
    (dict(server_weight_transfer="nfs"), r"server_weight_transfer must be one of \('file', 'gloo', 'nccl'\), got 'nfs'"),
    (dict(async_steps=-1), r"async_steps must be an integer >= 0 .*got -1"),
    (dict(async_steps=2, backend="transformers"), r"async_steps=2 .*backend must be vllm-server, got 'transformers'"),
    (dict(async_steps=1, backend="vllm-server", filter_groups="resample"), r"does not combine with filter_groups=resample"),
    (dict(vllm_gpu_memory_utilization=1.5), r"vllm_gpu_memory_utilization must be in \(0, 1\) or None, got 1.5"),
])
def test_config_errors_before_any_work(over, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**over)
    with pytest.raises(ValueError, match=r"GRPOLossConfig.loss_type must be one of"):
        GRPOLossConfig(loss_type="ppo")


def test_exgrpo_steps_and_resume_after_kill_match_an_uninterrupted_run(data, tmp_path):
    sft_out = tmp_path / "sft"
    init = sft(SFTConfig(data=data, model=TINY, out_dir=str(sft_out), max_steps=2, batch_dialogues=4, progress=False))["final"]
    common = dict(data=data, init=init, model=TINY, steps=4, questions_per_step=2, G=2, k=2, k_partial=1,
                  sampling=SamplingConfig(max_new_tokens=12), save_every=1, progress=False, backend="transformers")
    ref_dir = tmp_path / "ref"
    train(TrainConfig(out_dir=str(ref_dir), **common))
    ref_metrics = [json.loads(x) for x in open(ref_dir / "metrics.jsonl")]
    assert len(ref_metrics) == 4 and all(torch.isfinite(torch.tensor(m["loss"])) for m in ref_metrics)
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        import exgrpo.grpo as T
        from exgrpo.config import TrainConfig
        orig = T.grpo_update
        def slow(*a, **k):
            out = orig(*a, **k)
            time.sleep(1.0)
            return out
        T.grpo_update = slow
        from exgrpo.config import SamplingConfig
        from exgrpo.config import ModelConfig
        T.train(TrainConfig(out_dir={str(run_dir)!r}, data={data!r}, init={init!r},
                model=ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2), steps=4, questions_per_step=2,
                G=2, k=2, k_partial=1, sampling=SamplingConfig(max_new_tokens=12), save_every=1, progress=False,
                backend="transformers"))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step-000002"):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists()
    train(TrainConfig(out_dir=str(run_dir), **common), resume=True)
    got = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    assert [m["step"] for m in got] == [0, 1, 2, 3]
    # rollout samples: 2 of each scenario per step, bounded text, cut back to the checkpoint on resume like metrics
    samples = [json.loads(x) for x in open(run_dir / "samples.jsonl")]
    assert [(s["step"], s["scenario"]) for s in samples] == [(k, sc) for k in range(4) for sc in "AABB"]
    assert samples == [json.loads(x) for x in open(ref_dir / "samples.jsonl")]
    assert all(0 < len(s["text"]) <= 4000 and "<|im_start|>user" in s["text"] for s in samples)
    for a, b in zip(got, ref_metrics):
        assert set(a) == set(b)
        for k in {k for k in a if not (k.startswith("time_") or k in ("tokens_per_s", "peak_mem_gib"))}:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)
    m1, _ = build_student(ModelConfig(path=str(ref_dir / "final")))
    m2, _ = build_student(ModelConfig(path=str(run_dir / "final")))
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_quick_demo_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "exgrpo", "demo", "--quick", f"out_dir={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| exgrpo |" in r.stdout and os.path.exists(tmp_path / "curves.png")
    res = json.load(open(tmp_path / "results.json"))
    assert set(res["results"]["0"]) == {"sft", "sft_more", "rl", "exgrpo"}
    assert set(res["summary"]["arms"]["exgrpo"]) >= {"arithmetic_forward", "probes_2", "bonus_rate", "bonus_rate_perm"}
    rep = res["results"]["0"]["sft"]["ei_report"]
    assert rep["kept"] + sum(rep["dropped"].values()) == rep["examples"]


def test_lora_sft_trains_adapters_only_and_saves_a_merged_model(data, tmp_path):
    import dataclasses
    lora = dataclasses.replace(TINY, lora_rank=4, lora_alpha=8)
    model, _ = build_student(lora, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    r = sft(SFTConfig(data=data, model=lora, out_dir=str(tmp_path), max_steps=2, batch_dialogues=4, progress=False,
                      optim=OptimConfig(lr=1e-2, warmup_steps=0)))
    merged, _ = build_student(ModelConfig(path=r["final"]))
    base, _ = build_student(TINY, seed=0)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    changed = [n for (n, p), q in zip(merged.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert changed and all("proj" in n for n in changed)  # only the adapted projections moved


def test_eval_command_on_shared_and_builtin_data(data, tmp_path):
    from exgrpo.__main__ import main
    from tests.utils import SHARED_DATA
    r = sft(SFTConfig(data=data, model=TINY, out_dir=str(tmp_path / "sft"), max_steps=1, batch_dialogues=4, progress=False))
    out = tmp_path / "eval.json"
    assert main(["eval", f"model={r['final']}", "data=arithmetic,gsm8k,boolq", f"data_root={SHARED_DATA}", "limit=3",
                 "max_new_tokens=8", f"out={out}"]) == 0
    res = json.load(open(out))
    assert set(res) == {"arithmetic_forward", "arithmetic_reversal", "gsm8k", "boolq"}
    assert all(v["n"] == 3 and 0 <= v["accuracy"] <= 1 for v in res.values())
    assert main(["eval", "limit=many"]) == 2  # a bad field is a clear error, exit 2


def test_periodic_evaluation_and_the_step_time_split(data, tmp_path):
    """eval_every: greedy accuracy on held-out questions in the metrics (per data set and their mean); every step
    records the wall time of its phases, which add up to the step."""
    from exgrpo.evaluate import eval_examples
    out = tmp_path / "rl"
    train(TrainConfig(data=data, init=None, model=TINY, out_dir=str(out), steps=2, questions_per_step=2, G=2, k=2,
                      k_partial=1, sampling=SamplingConfig(max_new_tokens=6), backend="transformers", progress=False,
                      eval_every=2, eval_data="arithmetic:3:7:1"))
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert "eval_accuracy" not in rows[0] and 0 <= rows[1]["eval_accuracy"] <= 1
    assert {"eval/arithmetic_forward", "eval/arithmetic_paraphrase"} <= set(rows[1])
    for r in rows:
        phases = sum(v for k, v in r.items() if k.startswith("time_") and k not in ("time_step_s", "time_eval_s"))
        assert r["time_step_s"] == pytest.approx(phases, rel=1e-6) and r["time_gen_s"] > 0 and r["time_policy_s"] > 0
    assert len(eval_examples("arithmetic:3:7")) == 6
    with pytest.raises(ValueError, match=r"eval_data: 'arithmetic:x' is not arithmetic:N:SEED\[:OPS\]"):
        eval_examples("arithmetic:x")
    with pytest.raises(ValueError, match="eval_every > 0 needs eval_data"):
        TrainConfig(eval_every=5)


def constant_reward(prompts, completions, **kw):
    """A reward every completion gets alike: every group ties, every advantage is 0."""
    return [1.0] * len(completions)


def token_parity(prompts, completions, completion_ids, **kw):
    """A reward that differs across samples of one prompt (the parity of the answer's token-id sum)."""
    return [float(sum(c) % 2) for c in completion_ids]


@pytest.mark.parametrize("mode", ["skip", "resample"])
def test_dynamic_sampling_drops_or_replaces_questions_without_advantage(data, tmp_path, mode):
    common = dict(data=data, init=None, model=TINY, steps=2, questions_per_step=3, G=2, mode="direct",
                  sampling=SamplingConfig(max_new_tokens=5), backend="transformers", progress=False, aux_weight=0.0,
                  filter_groups=mode, filter_max_rounds=3)
    out = tmp_path / "tied"
    train(TrainConfig(out_dir=str(out), rewards=("tests.test_trainer:constant_reward",), **common))
    for r in (json.loads(x) for x in open(out / "metrics.jsonl")):
        assert r["frac_zero_adv_questions"] == 1.0 and r["trained_questions"] == 0 and r["skipped_zero_adv"]
        assert r["sampling_rounds"] == (3 if mode == "resample" else 1)  # resample tries every round it may
    out = tmp_path / "live"
    train(TrainConfig(out_dir=str(out), rewards=("tests.test_trainer:token_parity",), **common))
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    for r in rows:
        assert 0 <= r["frac_zero_adv_questions"] < 1 and 1 <= r["trained_questions"] <= 3
        if mode == "resample":  # it stops as soon as the step has its 3 informative questions, or after 3 rounds
            assert r["trained_questions"] == 3 or r["sampling_rounds"] == 3
        else:
            assert r["sampling_rounds"] == 1
            assert r["trained_questions"] == round(3 * (1 - r["frac_zero_adv_questions"]))


def test_informative_questions_and_keep_questions():
    from exgrpo.rewards import Scored
    from exgrpo.rollouts import Prompt, informative_questions, keep_questions
    prompts = [Prompt(q, "question", ["x"], [("1", "number")], [-1]) for q in (0, 0, 1, 1, 2, 2)]
    scored = Scored([1, 1, 0, 1, 0, 0], torch.tensor([0.0, 0.0, -0.7, 0.7, 0.0, 0.0]), None, {})
    assert informative_questions(prompts, scored) == [1]
    turn = Scored(scored.rewards, scored.advantages, [[0.0], [0.0], [0.0], [0.0], [0.3], [0.0]], {})
    assert informative_questions(prompts, turn) == [1, 2]  # a per-turn advantage counts
    p, d, r, a, ta = keep_questions(prompts, list("abcdef"), turn, [2])
    assert d == ["e", "f"] and r == [0, 0] and a.tolist() == [0.0, 0.0] and ta == [[0.3], [0.0]]


def test_truncated_turns_are_masked_out_on_request():
    from exgrpo.dialogue import DialogueTokenizer
    from exgrpo.rollouts import rollout_batch
    _, tok = build_student(TINY)
    dtok = DialogueTokenizer(tok)
    eot = sorted(dtok.eot)[0]
    d = dtok.start([{"role": "user", "content": "1+1="}])
    dtok.append_generated(d, [20, 21, eot], [-0.1] * 3)  # finished
    dtok.append_user(d, "again?")
    dtok.append_generated(d, [22, 23, 24], [-0.2] * 3)  # cut off at max_new_tokens
    assert d.truncated == [False, True]
    full = rollout_batch([d], torch.zeros(1), None, "all").mask[0]
    cut = rollout_batch([d], torch.zeros(1), None, "all", mask_truncated=True).mask[0]
    assert int(full.sum()) == 6 and int(cut.sum()) == 3  # the finished turn's 3 tokens stay
    ids = torch.tensor(d.input_ids)
    assert ids[cut].tolist() == [20, 21, eot]


def test_overlong_penalty_is_dapos_soft_punishment():
    from exgrpo.rewards import overlong_penalty
    assert [overlong_penalty(n, 16, 4) for n in (10, 12, 13, 14, 16)] == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(16, 16, 0) == 0.0 and overlong_penalty(14, 16, 4, factor=2.0) == -1.0
    with pytest.raises(ValueError, match=r"overlong_buffer must be in \[0, sampling.max_new_tokens=96\), got 96"):
        TrainConfig(overlong_buffer=96)
    with pytest.raises(ValueError, match="filter_groups must be one of"):
        TrainConfig(filter_groups="dynamic")
