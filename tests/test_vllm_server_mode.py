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
    s = Server(str(path), name="student", extra_args=("--logprobs-mode", "processed_logprobs"),
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


def _train_cfg(data, tmp_path, url, name):
    from exgrpo.config import TrainConfig
    return TrainConfig(data=data, init=None, model=TINY, out_dir=str(tmp_path / name), steps=3, questions_per_step=2,
                       G=2, k=2, k_partial=1, sampling=SamplingConfig(max_new_tokens=8), backend="vllm-server",
                       server_url=url, server_model="student", progress=False, aux_weight=0.0, log_samples=0)


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


def test_a_run_survives_a_server_restart(server, tmp_path, tmp_path_factory):
    """The server is killed after the run's first step and started again (its original weights): the client retries
    until it is back, re-pushes the current weights, regenerates the step's rollouts, and the run's metrics equal an
    uninterrupted run's."""
    import threading
    import time

    from exgrpo.grpo import train
    from tests.utils import ei_data
    s, _, _ = server
    data = ei_data(tmp_path_factory, limit=6, rules_per_example=2)
    train(_train_cfg(data, tmp_path, s.url, "plain"))
    metrics = tmp_path / "restarted" / "metrics.jsonl"

    def kill_after_first_step():
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            time.sleep(0.2)
        s.restart()
    t = threading.Thread(target=kill_after_first_step, daemon=True)
    t.start()
    train(_train_cfg(data, tmp_path, s.url, "restarted"))
    t.join(timeout=600)
    a = [json.loads(x) for x in open(tmp_path / "plain" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(metrics)]
    assert len(a) == len(b) == 3
    assert a[-1]["server_connection_errors"] == 0 and b[-1]["server_connection_errors"] > 0  # it did go away
    for x, y in zip(a, b):
        for k in ("loss", "reward", "response_tokens", "gen_logp_abs_diff_max"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (k, x[k], y[k])
