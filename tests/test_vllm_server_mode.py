"""Server mode: generation from a separate `vllm serve` (token ids in and out, processed log-probs) with weights
pushed by the trainer through the server's /collective_rpc route; a full ExGRPO step in this mode."""
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
