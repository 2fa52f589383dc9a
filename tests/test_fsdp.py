"""DDP and FSDP2 (torch.distributed.fsdp.fully_shard) on 2 gloo ranks equal 1 rank on the same global batch: SFT
losses and weights and a GRPO update (loss normalised by the global token count), FSDP2 with tied and untied
embeddings, with and without LoRA; a SIGKILLed FSDP2 run resumes to the uninterrupted
run's metrics and weights; bad layouts are clear errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from exgrpo.config import ModelConfig
from exgrpo.model import build_student
from tests.utils import ei_data

pytestmark = pytest.mark.slow  # torchrun with 2 gloo ranks per test: minutes in all (make test-slow)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ei_data(tmp_path_factory, "fsdp", limit=12, rules_per_example=2)


def _run(nproc, args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.parametrize("par,tie,lora,memory", [("ddp", "0", "0", ""), ("fsdp2", "0", "0", ""), ("fsdp2", "1", "0", ""),
                                                 ("fsdp2", "0", "1", ""), ("fsdp2", "0", "1", "offload")],
                         ids=["ddp", "fsdp2-untied", "fsdp2-tied", "fsdp2-lora", "fsdp2-lora-offload"])
def test_two_ranks_equal_one_rank(data, tmp_path, par, tie, lora, memory):
    """Two ranks (DDP or FSDP2) give one rank's losses and weights; the last case: FSDP2 with activation
    offloading against one rank with plain gradient checkpointing."""
    script = os.path.join(HERE, "scripts", "parallel_script.py")
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, script, data, str(one), "ddp", tie, lora, "ckpt" if memory else ""],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-4000:]
    two = tmp_path / "two"
    _run(2, [script, data, str(two), par, tie, lora, memory])
    assert len(torch.load(one / "result.pt", weights_only=False)["sft_losses"]) == 3
    a = torch.load(one / "result.pt", weights_only=False)
    b = torch.load(two / "result.pt", weights_only=False)
    for x, y in zip(a["sft_losses"], b["sft_losses"]):
        assert abs(x - y) < 1e-5 * max(1, abs(x))
    assert all((n > 0) == (memory == "offload") for n in b["offload_tensors"])
    m1, _ = build_student(ModelConfig(path=a["sft_final"]))
    m2, _ = build_student(ModelConfig(path=b["sft_final"]))
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(p, q, atol=2e-5), n
    assert abs(a["grpo_loss"] - b["grpo_loss"]) < 1e-5
    assert set(a["grpo_weights"]) == set(b["grpo_weights"])
    for k, v in a["grpo_weights"].items():
        assert torch.allclose(v, b["grpo_weights"][k], atol=2e-5), k
    # the weight stream a generator syncs from: one rank's names in its order, its values (LoRA merged); under FSDP2
    # gathered one tensor at a time, never holding an earlier one (no full state dict on a rank)
    assert [n for n, _ in a["stream"]] == [n for n, _ in b["stream"]] and len(a["stream"]) > 10
    assert not any("lora_" in n or "base_layer" in n for n, _ in b["stream"])
    for (n, x), (_, y) in zip(a["stream"], b["stream"]):
        assert torch.allclose(x, y, atol=2e-5), n
    if par == "fsdp2":
        assert b["stream_held_bytes"] == 0


def test_fsdp2_kill_and_resume_matches(data, tmp_path):
    args = ["-m", "exgrpo", "sft", f"data={data}", "model.hidden_size=64", "model.intermediate_size=128",
            "model.num_layers=2", "max_steps=10", "batch_dialogues=4", "save_every=1", "progress=false", "parallel=fsdp2",
            "optim.warmup_steps=0"]
    ref = tmp_path / "ref"
    _run(2, args + [f"out_dir={ref}"])
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args,
           f"out_dir={run}"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step-000002"):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.exists() and not (run / "final").exists()  # killed mid-run
    _run(2, args[:3] + ["--resume"] + args[3:] + [f"out_dir={run}"])
    got = [json.loads(x) for x in open(run / "metrics.jsonl")]
    want = [json.loads(x) for x in open(ref / "metrics.jsonl")]
    assert [m["step"] for m in got] == list(range(10))
    for a, b in zip(got, want):
        for k in ("loss", "grad_norm", "lr", "tokens"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), (a["step"], k)
    m1, _ = build_student(ModelConfig(path=str(ref / "final")))
    m2, _ = build_student(ModelConfig(path=str(run / "final")))
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    # a DDP resume of an FSDP2 checkpoint is refused in one line
    r = subprocess.run([sys.executable, "-m", "exgrpo", "sft", "--resume", *args[3:-2], f"data={data}",
                        f"out_dir={run}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "was written with parallel=fsdp2, this run uses parallel=ddp" in r.stderr


def test_fsdp2_launch_errors(data):
    r = subprocess.run([sys.executable, "-m", "exgrpo", "sft", f"data={data}", "parallel=fsdp2"], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "parallel=fsdp2 needs torchrun" in r.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                        "exgrpo", "train", f"data={data}", "init=null", "questions_per_step=3"], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode != 0 and "questions_per_step=3 does not divide over the world size 2" in r.stderr


def test_lora_reference_is_the_policy_with_adapters_off(data, tmp_path, monkeypatch):
    """With LoRA the reference log-probs come from the same model with its adapters disabled (one copy of the
    weights): they equal the base model's, while the policy's own (adapters on) differ; train() loads one model."""
    import dataclasses

    import exgrpo.grpo as T
    from exgrpo.config import SFTConfig, TrainConfig
    from exgrpo.grpo import train
    from exgrpo.model import PolicyHidden
    from exgrpo.sft import sft
    from exgrpo.steps import StepContext, policy_logprobs, reference_logprobs
    tiny = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2)
    init = sft(SFTConfig(data=data, model=tiny, out_dir=str(tmp_path / "sft"), max_steps=1, batch_dialogues=4,
                         progress=False))["final"]
    lora_cfg = dataclasses.replace(tiny, path=init, lora_rank=4, lora_alpha=8)
    model, _ = build_student(lora_cfg)
    with torch.no_grad():  # move the adapters off zero so that the policy differs from the base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    policy = PolicyHidden(model)
    ctx = StepContext(policy=policy, module=policy, device=torch.device("cpu"), ref_from_adapters_off=True)
    seqs = [(torch.randint(0, 255, (17,)), torch.ones(17, dtype=torch.bool))]
    ref = reference_logprobs(ctx, seqs, 1.0, None)[0]
    base, _ = build_student(ModelConfig(path=init))
    want = policy_logprobs(ctx, PolicyHidden(base), seqs, 1.0)[0]
    mine = policy_logprobs(ctx, policy, seqs, 1.0)[0]
    assert torch.allclose(ref, want, atol=1e-6) and not torch.allclose(mine, want, atol=1e-4)
    calls = []
    orig = T.load_policy
    monkeypatch.setattr(T, "load_policy", lambda *a, **k: calls.append(1) or orig(*a, **k))
    from exgrpo.config import SamplingConfig
    train(TrainConfig(data=data, init=init, model=dataclasses.replace(tiny, lora_rank=4, lora_alpha=8), steps=1,
                      questions_per_step=2, G=2, k=2, k_partial=1, sampling=SamplingConfig(max_new_tokens=8),
                      out_dir=str(tmp_path / "rl"), progress=False, backend="transformers"))
    assert len(calls) == 1  # no second model for the reference


def test_fsdp2_exgrpo_train_end_to_end(data, tmp_path):
    """exgrpo train with parallel=fsdp2 on 2 ranks: generation on the sharded policy (ranks in lockstep), a sharded
    reference, checkpoints, and a final Hugging Face export."""
    args = ["-m", "exgrpo", "sft", f"data={data}", "model.hidden_size=64", "model.intermediate_size=128",
            "model.num_layers=2", "max_steps=2", "batch_dialogues=4", "progress=false", f"out_dir={tmp_path / 'sft'}"]
    _run(2, args)
    _run(2, ["-m", "exgrpo", "train", f"data={data}", f"init={tmp_path / 'sft' / 'final'}", "model.hidden_size=64",
             "model.intermediate_size=128", "model.num_layers=2", "steps=2", "questions_per_step=2", "G=2", "k=2",
             "k_partial=1", "sampling.max_new_tokens=8", "backend=transformers", "parallel=fsdp2", "progress=false",
             "save_every=1", f"out_dir={tmp_path / 'rl'}"])
    rows = [json.loads(x) for x in open(tmp_path / "rl" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1] and all(r.get("kl", 0.0) >= 0 for r in rows)
    m, _ = build_student(ModelConfig(path=str(tmp_path / "rl" / "final")))
    assert all(torch.isfinite(p).all() for p in m.parameters())
