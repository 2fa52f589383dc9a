"""The teacher client against a real OpenAI-compatible server on loopback (vLLM serving a tiny random model):
concurrent chats, a clear error on 4xx, retries then a clear error (no hang) when the server is killed mid-run,
and `exgrpo ei` end to end on a GSM8K slice with its report."""
import json
import threading
import time

import pytest

from exgrpo.config import ChatConfig, EIConfig
from exgrpo.ei.pipeline import run_ei
from exgrpo.ei.teacher import ChatClient, TeacherError
from tests.scripts.vllm_server import Server, make_tiny_model
from tests.utils import SHARED_DATA

pytestmark = pytest.mark.slow  # a vLLM OpenAI server on loopback, ~1 minute to start (make test-slow)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))
    s = Server(path)
    yield s
    s.kill()


def test_concurrent_chats_and_4xx(server):
    c = ChatClient(ChatConfig(base_url=server.url, model="teacher", max_tokens=8, max_concurrency=4))
    out = c.chat_many([[{"role": "user", "content": f"question {i}"}] for i in range(10)])
    assert len(out) == 10 and all(isinstance(t, str) for t in out)
    bad = ChatClient(ChatConfig(base_url=server.url, model="no-such-model", max_tokens=8))
    t0 = time.time()
    with pytest.raises(TeacherError, match=r"rejected the request for model 'no-such-model': HTTP 404"):
        bad.chat([{"role": "user", "content": "x"}])
    assert time.time() - t0 < 10 and bad.calls == 1  # no retry on a 4xx


def test_key_is_never_shown(server, monkeypatch):
    monkeypatch.setenv("EXGRPO_TEST_KEY", "sk-secret-123")
    c = ChatClient(ChatConfig(base_url=server.url, model="no-such-model", api_key_env="EXGRPO_TEST_KEY"))
    assert "secret" not in repr(c)
    with pytest.raises(TeacherError) as e:
        c.chat([{"role": "user", "content": "x"}])
    assert "secret" not in str(e.value)


def test_ei_end_to_end_on_gsm8k_slice(server, tmp_path):
    cfg = EIConfig(data=("gsm8k",), data_root=SHARED_DATA, limit=3, rules_per_example=2, teacher="openai",
                   teacher_chat=ChatConfig(base_url=server.url, model="teacher", max_tokens=48), out_dir=str(tmp_path))
    rep = run_ei(cfg, progress=False)
    assert rep["examples"] == 3 and sum(r["generated"] for r in rep["per_rule"].values()) == 6
    # a random model writes no readable probe: every question is reported as dropped, none silently lost
    assert rep["kept"] + sum(rep["dropped"].values()) == 3
    assert len(open(tmp_path / "probes.jsonl").readlines()) == 6
    assert json.load(open(tmp_path / "report.json")) == rep


def test_server_killed_mid_run_gives_a_clear_error_not_a_hang(server):
    c = ChatClient(ChatConfig(base_url=server.url, model="teacher", max_tokens=400, max_retries=2,
                              timeout_s=20, max_concurrency=4))
    killer = threading.Timer(1.5, server.kill)
    killer.start()
    t0 = time.time()
    try:
        with pytest.raises(TeacherError, match=r"failed after 3 tries"):  # long answers: the kill lands mid-run
            c.chat_many([[{"role": "user", "content": f"tell me a long story {i}"}] for i in range(200)],
                        extra_body={"min_tokens": 400, "ignore_eos": True})
        assert time.time() - t0 < 60
    finally:
        killer.join()
        server.restart()  # the module's other tests (in any order) get a live server


def test_opd_teacher_server_log_probs_equal_the_local_model_and_a_run_trains(server, tmp_path, tmp_path_factory):
    """The server teacher (vLLM's prompt_logprobs of the student's token ids) gives the log-probs the same model
    gives locally, and `exgrpo train mode=opd teacher_url=...` runs end to end against it."""
    import torch

    from exgrpo.config import ModelConfig, SamplingConfig, TrainConfig
    from exgrpo.distill import LocalTeacher, ServerTeacher
    from exgrpo.grpo import train
    from exgrpo.model import build_student
    from exgrpo.steps import step_context
    from tests.utils import ei_data
    _, tok = build_student(ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2))
    seqs = [(torch.tensor(tok.encode(t)), torch.ones(len(tok.encode(t)), dtype=torch.bool))
            for t in ("12+30=42", "the answer is 7", "x")]
    local = LocalTeacher(server.model_path, tok, "cpu")
    ctx = step_context(TrainConfig(), local.model, torch.device("cpu"))
    want = local.logprobs(ctx, seqs)
    got = ServerTeacher(server.url, "teacher").logprobs(ctx, seqs)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=2e-3), (g, w)
    data = ei_data(tmp_path_factory, limit=6, rules_per_example=2)
    out = tmp_path / "opd"
    train(TrainConfig(data=data, init=None, model=ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2),
                      out_dir=str(out), steps=2, questions_per_step=2, G=2, mode="opd", teacher_url=server.url,
                      aux_weight=0.0, sampling=SamplingConfig(max_new_tokens=6), backend="transformers",
                      progress=False))
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert len(rows) == 2 and all(r["opd_reverse_kl"] == r["opd_reverse_kl"] and r["time_teacher_s"] > 0 for r in rows)
