"""Server mode: generation from a separate `vllm serve` (token ids in and out, processed log-probs) with weights
pushed by the trainer through the server's /collective_rpc route; a full ExGRPO step in this mode; a server started
with an API key refuses a client without it; a run whose server is killed and restarted mid-run finishes with the
metrics of an uninterrupted run (seeded generation)."""
import json

import pytest
import torch
from exgrpo_kernels import fused_linear_logprobs, pack_sequences

from exgrpo.config import ModelConfig, SamplingConfig
from exgrpo.dialogue import DialogueTokenizer
from exgrpo.model import PolicyHidden, build_student
from exgrpo.vllm_backend import VLLMServerBackend
from tests.scripts.vllm_server import Server
from tests.utils import trainer_logprobs

pytestmark = pytest.mark.slow  # a vLLM engine (or server) per module, minutes on 2 cores (make test-slow)

TINY = ModelConfig(hidden_size=128, intermediate_size=256, num_layers=2, head_dim=64)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("srv") / "model"
    model, tok = build_student(TINY, seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    s = Server(str(path), name="student", extra_args=("--logprobs-mode", "processed_logprobs",
                                                      "--weight-transfer-config", '{"backend": "gloo"}'),
               extra_env={"VLLM_SERVER_DEV_MODE": "1"})
    yield s, model, tok
    s.kill()


def test_generation_and_weight_push(server):
    s, model, tok = server
    dtok = DialogueTokenizer(tok)
    be = VLLMServerBackend(s.url, "student", tok, dtok.eot)
    prompt = dtok.prompt_ids(dtok.start([{"role": "user", "content": "What is 2+3?"}]))
    sc = SamplingConfig(temperature=0.8, max_new_tokens=10)
    a = be.generate([prompt] * 3, sc, generator_seed=3)
    assert [x.ids for x in a] == [x.ids for x in be.generate([prompt] * 3, sc, generator_seed=3)]
    lp = trainer_logprobs(model, prompt + a[0].ids, 0.8)[len(prompt) - 1:len(prompt) + len(a[0].ids) - 1]
    assert max(abs(u - v) for u, v in zip(a[0].logprobs, lp.tolist())) < 1e-4
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # a real step, then the push
    b = pack_sequences([torch.tensor(prompt + a[0].ids)])
    p = PolicyHidden(model)
    (-fused_linear_logprobs(p(b), p.lm_head_weight, b.targets).sum()).backward()
    opt.step()
    be.sync_weights(model)
    c = be.generate([prompt], sc, generator_seed=3)[0]
    lp2 = trainer_logprobs(model, prompt + c.ids, 0.8)[len(prompt) - 1:len(prompt) + len(c.ids) - 1]
    assert max(abs(u - v) for u, v in zip(c.logprobs, lp2.tolist())) < 1e-4
    stale = trainer_logprobs(build_student(TINY, seed=0)[0], prompt + c.ids, 0.8)[len(prompt) - 1:len(prompt) + len(c.ids) - 1]
    assert max(abs(u - v) for u, v in zip(c.logprobs, stale.tolist())) > 1e-3  # the push happened
    be.close()


def _server_minus_trainer(be, model, tok):
    """The largest |server - trainer| log-prob over a sampled completion (temperature 1)."""
    dtok = DialogueTokenizer(tok)
    prompt = dtok.prompt_ids(dtok.start([{"role": "user", "content": "What is 12+30?"}]))
    c = be.generate([prompt], SamplingConfig(temperature=1.0, max_new_tokens=16), generator_seed=5)[0]
    lp = trainer_logprobs(model, prompt + c.ids)[len(prompt) - 1:len(prompt) + len(c.ids) - 1]
    return max(abs(u - v) for u, v in zip(c.logprobs, lp.tolist()))


def _bytes(model, names=None):
    from exgrpo.weight_transfer import PolicySource
    return sum(m.dtype.itemsize * torch.Size(m.shape).numel() for m in PolicySource(model, None, names).metadata())


def test_weights_over_a_gloo_group_or_a_file_give_the_trainers_log_probs(server):
    """Both pushes (gloo: a process group with the server's worker, 1 MiB buckets; file: safetensors + reload), in
    turn on one server: after each the server's log-probs are the trainer's. With LoRA, the first push is the whole
    merged model and the next ones only the adapted decoder layers: a change to a weight outside them (the final
    norm) does not reach the server."""
    from peft import LoraConfig, get_peft_model

    from exgrpo.vllm_backend import ServerOptions
    from exgrpo.weight_transfer import touched_groups
    s, _, tok = server
    dtok = DialogueTokenizer(tok)
    gloo = VLLMServerBackend(s.url, "student", tok, dtok.eot, ServerOptions(weight_transfer="gloo", transfer_bucket_mb=1))
    file = VLLMServerBackend(s.url, "student", tok, dtok.eot)
    model, _ = build_student(TINY, seed=3)
    assert _server_minus_trainer(gloo, model, tok) > 1e-2  # the server holds other weights
    for be in (gloo, file, gloo):  # the second gloo push reuses its group
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.05)
        be.sync_weights(model)
        assert _server_minus_trainer(be, model, tok) < 1e-4, be.options.weight_transfer
    assert gloo.last_push_bytes == _bytes(model)
    gloo.close()

    lora = get_peft_model(build_student(TINY, seed=4)[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                                     layers_to_transform=[1]))

    def new_adapters(seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in lora.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
    gloo = VLLMServerBackend(s.url, "student", tok, dtok.eot, ServerOptions(weight_transfer="gloo"))
    new_adapters(0)
    gloo.sync_weights(lora)  # a new group: the whole model
    assert gloo.last_push_bytes == _bytes(lora) and _server_minus_trainer(gloo, lora, tok) < 1e-4
    new_adapters(1)
    norm = lora.base_model.model.model.norm.weight
    with torch.no_grad():
        norm.mul_(1.5)  # outside the adapted layer: stays on the trainer
    gloo.sync_weights(lora)
    assert gloo.last_push_bytes == _bytes(lora, touched_groups(lora)) < _bytes(lora) / 2
    assert _server_minus_trainer(gloo, lora, tok) > 1e-3
    with torch.no_grad():
        norm.div_(1.5)
    assert _server_minus_trainer(gloo, lora, tok) < 1e-4  # the adapters arrived, the norm did not
    new_adapters(2)
    file.sync_weights(lora)  # the file path merges LoRA too
    assert _server_minus_trainer(file, lora, tok) < 1e-4
    gloo.close()
    file.close()


def test_exgrpo_step_in_server_mode(server, tmp_path):
    from exgrpo.config import EIConfig, SFTConfig, TrainConfig
    from exgrpo.ei.pipeline import run_ei
    from exgrpo.grpo import train
    from exgrpo.sft import sft
    s, _, _ = server
    run_ei(EIConfig(limit=6, rules_per_example=2, out_dir=str(tmp_path / "ei")), progress=False)
    data = str(tmp_path / "ei" / "d_ei.jsonl")
    init = sft(SFTConfig(data=data, model=TINY, out_dir=str(tmp_path / "sft"), max_steps=1, batch_dialogues=4,
                         progress=False))["final"]
    train(TrainConfig(data=data, init=init, model=TINY, out_dir=str(tmp_path / "rl"), steps=2, questions_per_step=2,
                      G=2, k=2, k_partial=1, sampling=SamplingConfig(max_new_tokens=12), backend="vllm-server",
                      server_url=s.url, server_model="student", progress=False))
    m = [json.loads(x) for x in open(tmp_path / "rl" / "metrics.jsonl")]
    assert len(m) == 2 and max(x["gen_logp_abs_diff_max"] for x in m) < 1e-3  # the server has the trainer's weights


def _train_cfg(data, tmp_path, url, name, transfer="file", async_steps=0):
    from exgrpo.config import TrainConfig
    return TrainConfig(data=data, init=None, model=TINY, out_dir=str(tmp_path / name), steps=3, questions_per_step=2,
                       G=2, k=2, k_partial=1, sampling=SamplingConfig(max_new_tokens=8), backend="vllm-server",
                       server_url=url, server_model="student", progress=False, aux_weight=0.0, log_samples=0,
                       server_weight_transfer=transfer, async_steps=async_steps)


def test_a_server_with_an_api_key_refuses_a_client_without_it(tmp_path, monkeypatch):
    path = tmp_path / "model"
    model, tok = build_student(TINY, seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    s = Server(str(path), name="student", extra_args=("--api-key", "s3cret"))
    try:
        dtok = DialogueTokenizer(tok)
        prompt = dtok.prompt_ids(dtok.start([{"role": "user", "content": "2+3="}]))
        monkeypatch.delenv("VLLM_API_KEY", raising=False)
        with pytest.raises(RuntimeError, match=r"HTTP 401 \(the server was started with --api-key\): set \$VLLM_API_KEY"):
            VLLMServerBackend(s.url, "student", tok, dtok.eot).generate([prompt], SamplingConfig(max_new_tokens=4))
        monkeypatch.setenv("VLLM_API_KEY", "s3cret")
        be = VLLMServerBackend(s.url, "student", tok, dtok.eot)
        assert len(be.generate([prompt], SamplingConfig(max_new_tokens=4))) == 1
    finally:
        s.kill()


@pytest.mark.parametrize("n", [0, 2], ids=["sync", "async2"])
def test_a_run_survives_a_server_restart(server, tmp_path, tmp_path_factory, n):
    """The server is killed after the run's first step and started again (its original weights, no process group):
    the client retries until it is back, joins a new group, re-pushes the current weights, regenerates the step's
    rollouts, and the run's metrics equal an uninterrupted run's (which pushed by file: the two paths agree). With
    async_steps=2 the restart lands while the generation thread generates or pushes ahead: what it re-pushes is
    the copy of the version it was on (the trainer has moved on), or the push it was sending, again."""
    import threading
    import time

    from exgrpo.grpo import train
    from tests.utils import ei_data
    s, _, _ = server
    data = ei_data(tmp_path_factory, limit=6, rules_per_example=2)
    train(_train_cfg(data, tmp_path, s.url, "plain", async_steps=n))
    metrics = tmp_path / "restarted" / "metrics.jsonl"

    def kill_after_first_step():
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            time.sleep(0.2)
        s.restart()
    t = threading.Thread(target=kill_after_first_step, daemon=True)
    t.start()
    train(_train_cfg(data, tmp_path, s.url, "restarted", transfer="gloo", async_steps=n))
    t.join(timeout=600)
    a = [json.loads(x) for x in open(tmp_path / "plain" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(metrics)]
    assert len(a) == len(b) == 3
    assert a[-1]["server_connection_errors"] == 0 and b[-1]["server_connection_errors"] > 0  # it did go away
    assert b[-1]["server_repushes"] >= 1 and 0 < b[-1]["server_push_mb"] == a[-1]["server_push_mb"]
    for x, y in zip(a, b):
        for k in ("loss", "reward", "response_tokens", "gen_logp_abs_diff_max"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (k, x[k], y[k])


def _async_cmd(data, url, out, steps=3):
    import sys
    return [sys.executable, "-m", "exgrpo", "train", f"data={data}", "init=none", "model.hidden_size=128",
            "model.intermediate_size=256", "model.num_layers=2", "model.head_dim=64", f"steps={steps}",
            "questions_per_step=2", "G=2", "k=2", "k_partial=1", "sampling.max_new_tokens=8", "backend=vllm-server",
            f"server_url={url}", "server_model=student", "progress=false", "aux_weight=0", "log_samples=0",
            "save_every=1", "async_steps=1", "optim.lr=3e-3", "optim.warmup_steps=0", f"out_dir={out}",
            "rewards=tests.test_trainer:token_parity"]  # rewards that vary across a random model's samples


@pytest.mark.parametrize("n", [1, 2])
def test_async_steps_use_the_behaviour_policy_and_resume_exactly(server, tmp_path, tmp_path_factory, n):
    """async_steps=n on the loopback server: the rollouts of the next n steps are generated while a step trains,
    step s's on the weights after step s - n (staleness 0, 1, .., n, n: the first steps' on the start's); the
    log-probs the loss corrects with are that (behaviour) policy's: the newest rollouts saved with the checkpoint
    after step 1 (generated after the first push) have the log-probs of the policy after step 0, not of the one
    after step 1. A run SIGKILLed after its second checkpoint and resumed equals the uninterrupted run."""
    import os
    import signal
    import subprocess
    import time

    from exgrpo.checkpoint import latest
    from tests.utils import ei_data
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    s, _, _ = server
    data = ei_data(tmp_path_factory, limit=6, rules_per_example=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref = tmp_path / "ref"
    steps = n + 2
    cmd = [x for x in _async_cmd(data, s.url, ref, steps=steps) if not x.startswith("async_steps=")]
    cmd.append(f"async_steps={n}")
    r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    want = [json.loads(x) for x in open(ref / "metrics.jsonl")]
    assert [m["staleness"] for m in want] == [min(s, n) for s in range(steps)]  # step 0's are its own, then n off
    assert all(m["time_gen_hidden_s"] >= 0 and "time_gen_wait_s" in m for m in want)
    run = tmp_path / "run"
    cmd = [c.replace(str(ref), str(run)) for c in cmd]
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and (latest(str(run)) or "").rsplit("-", 1)[-1] < "000002":
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()  # killed mid-run
    # the rollouts of steps 2 .. n + 1, generated ahead and saved with step 1's checkpoint; the newest (step n + 1's)
    # by the policy after step 0 (the first push), the others (n > 1) by the start's
    ck = run / "checkpoints"
    saved = torch.load(ck / "step-000002" / "trainer_state.pt", weights_only=False)["state"]["pending"][0]
    assert [x.weights_version for x in saved] == [0] * (n - 1) + [1]
    nxt = saved[-1]
    assert len(nxt.batch.ids) > 0
    behaviour_model, _ = build_student(ModelConfig(**{**TINY.__dict__, "path": str(ck / "step-000001")}))
    trained, _ = build_student(ModelConfig(**{**TINY.__dict__, "path": str(ck / "step-000002")}))
    for ids, mask, gen in list(zip(nxt.batch.ids, nxt.batch.mask, nxt.batch.gen_logp))[:3]:
        m, n = mask[1:], len(ids) - 1  # position t's log-prob is of token t + 1
        assert (trainer_logprobs(behaviour_model, ids.tolist())[:n][m] - gen[1:][m]).abs().max() < 1e-4
        assert (trainer_logprobs(trained, ids.tolist())[:n][m] - gen[1:][m]).abs().max() > 1e-4  # not the trained one's
    r = subprocess.run(cmd[:4] + ["--resume"] + cmd[4:], env=env, cwd=root, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [m["step"] for m in got] == list(range(steps))
    for a, b in zip(got, want):
        for k in ("loss", "reward", "response_tokens", "gen_logp_abs_diff_max", "staleness", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k, a[k], b[k])


@pytest.mark.parametrize("parallel,transfer,n", [("ddp", "file", 0), ("fsdp2", "gloo", 0), ("fsdp2", "gloo", 2)])
def test_two_trainer_ranks_generate_on_the_pushed_weights(server, tmp_path, tmp_path_factory, parallel, transfer, n):
    """torchrun with 2 gloo ranks against one server: rank 0 pushes (FSDP2: every rank takes part in the gathers)
    and tags the weight version, the other rank waits for it before generating, so every rank's rollouts come from
    the current weights (the generator/trainer mismatch stays at float noise on both ranks, every step). With
    async_steps=2 the pushes run in the ranks' generation threads, between barriers of their own group: every
    rank's rollouts of a step come from one version, two steps old (staleness 0, 1, 2, 2, equal on both ranks)."""
    import os
    import subprocess
    import sys

    from tests.utils import ei_data
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    s, _, _ = server
    data = ei_data(tmp_path_factory, limit=6, rules_per_example=2)
    cmd = _async_cmd(data, s.url, tmp_path / "run", steps=4 if n else 3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd[1:]]
    cmd = [c for c in cmd if not c.startswith(("async_steps=", "save_every="))] + [
        f"parallel={parallel}", f"server_weight_transfer={transfer}", "questions_per_step=4", f"async_steps={n}"]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=root, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == (4 if n else 3) and all(x["grad_norm"] > 0 for x in rows)
    if n:  # the rollouts are n steps old: the mismatch is the policy's change, corrected for by the loss
        assert [x["staleness"] for x in rows] == [0.0, 1.0, 2.0, 2.0]
        assert rows[0]["gen_logp_abs_diff_max"] < 1e-3 < max(x["gen_logp_abs_diff_max"] for x in rows[1:])
    else:
        assert max(x["gen_logp_abs_diff_max"] for x in rows) < 1e-3, [x["gen_logp_abs_diff_max"] for x in rows]
