"""The gloo weight transfer of server mode without a server: the bucket plan, the trainer's weight source (names,
dtypes and shapes agree with what it yields; LoRA merged; only adapted decoder layers after the first push), and a
trainer and a worker engine in two threads moving a model's weights bit for bit over a real gloo group. The
server end to end (vLLM's routes, its model's load_weights) is tests/test_vllm_server_mode.py (slow)."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from exgrpo.config import ModelConfig  # noqa: E402
from exgrpo.model import base_causal_lm, build_student  # noqa: E402
from exgrpo.weight_transfer import (  # noqa: E402
    ALIGN,
    GlooTrainerInitInfo,
    GlooTrainerWeightTransferEngine,
    GlooWeightTransferEngine,
    PolicySource,
    bucket_plan,
    free_port,
    touched_groups,
)

TINY = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=3, head_dim=16)


def test_bucket_plan_keeps_order_alignment_and_the_limit():
    nbytes = [10, 7, 100, 3, 64, 1000, 5, 5]
    plan = bucket_plan(nbytes, 128)
    assert [i for b in plan for i, _ in b] == list(range(len(nbytes)))  # every tensor once, in order
    for b in plan:
        assert b[0][1] == 0 and all(o % ALIGN == 0 for _, o in b)
        ends = [o + nbytes[i] for i, o in b]
        assert all(e <= o2 for e, (_, o2) in zip(ends, b[1:]))  # no overlap
        assert ends[-1] <= 128 or len(b) == 1  # over the limit only alone
    assert [[i for i, _ in b] for b in plan] == [[0, 1], [2, 3], [4], [5], [6, 7]]
    assert bucket_plan([], 128) == []


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_policy_source_metadata_matches_what_it_yields_plain_and_lora():
    plain, _ = build_student(TINY, seed=0)
    lora, _ = build_student(dataclasses.replace(TINY, lora_rank=4), seed=0)
    for m in (plain, lora):
        src = PolicySource(m, torch.bfloat16)
        meta, items = src.metadata(), [(n, t.clone()) for n, t in src]  # views of live weights: copied
        assert [(x.name, x.dtype, x.shape) for x in meta] == [(n, t.dtype, tuple(t.shape)) for n, t in items]
        assert not any("lora_" in n or "base_layer" in n or n.startswith("base_model") for n, _ in items)
        assert {n for n, _ in items} == set(base_causal_lm(plain).state_dict())  # the checkpoint's names
    # the merged weights: W + (alpha / r) B A
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_()
    base = base_causal_lm(lora)
    q = base.model.layers[1].self_attn.q_proj
    want = q.base_layer.weight + q.scaling["default"] * q.lora_B["default"].weight @ q.lora_A["default"].weight
    got = {n: t.clone() for n, t in PolicySource(lora)}["model.layers.1.self_attn.q_proj.weight"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert touched_groups(plain) is None


def test_touched_groups_are_the_adapted_decoder_layers_whole():
    from peft import LoraConfig, get_peft_model
    model, _ = build_student(TINY, seed=0)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    names = touched_groups(model)
    everything = set(base_causal_lm(model).state_dict())
    want = {n.replace(".base_layer", "") for n in everything
            if n.startswith("model.layers.1.") and "lora_" not in n}
    assert names == want  # layer 1 whole (k_proj and the MLP too: vLLM fuses q/k/v and gate/up), nothing else
    assert "model.layers.1.mlp.down_proj.weight" in names and "model.layers.1.self_attn.k_proj.weight" in names
    assert not any(n.startswith(("model.embed_tokens", "lm_head", "model.norm", "model.layers.0.", "model.layers.2."))
                   for n in names)


class _RecordingWorker(GlooWeightTransferEngine):
    """The worker engine with vLLM's layerwise reload left out: what it receives lands in ``self.got``."""

    def start_weight_update(self):
        self.got = {}

    def finish_weight_update(self):
        pass


class _InProcessRoutes:
    """The four routes of vLLM's weight-sync protocol, calling the worker engine directly (the server's part)."""

    def __init__(self, worker):
        self.w = worker

    def init_weight_transfer_engine(self, init_info):
        self.w.init_transfer_engine(self.w.parse_init_info(init_info))

    def start_weight_update(self):
        self.w.start_weight_update()

    def update_weights(self, update_info):
        self.w.update_weights(update_info)

    def finish_weight_update(self, weight_version=None):
        self.w.finish_weight_update()


@pytest.mark.parametrize("bucket_bytes,dtype", [(1 << 12, None), (1 << 30, torch.bfloat16), (999, torch.float16)])
def test_gloo_engines_move_the_weights_bit_for_bit(bucket_bytes, dtype):
    model, _ = build_student(TINY, seed=0)
    _perturb(model)
    vcfg = SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_index=0, world_size=1, rank=0),
                           model_config=None)
    sink = SimpleNamespace()
    worker = _RecordingWorker(None, vcfg, torch.device("cpu"), sink)
    sink.load_weights = lambda ws: worker.got.update({n: t.clone() for n, t in ws})
    info = GlooTrainerInitInfo("127.0.0.1", free_port("127.0.0.1"), 2, bucket_bytes=bucket_bytes, timeout_s=60,
                               rank=0)
    trainer = GlooTrainerWeightTransferEngine.trainer_init(info, client=_InProcessRoutes(worker),
                                                           source=PolicySource(model, dtype))
    trainer.send_weights()
    want = {n: t.clone() for n, t in PolicySource(model, dtype)}
    assert worker.got.keys() == want.keys()
    for n, t in want.items():
        assert worker.got[n].dtype == t.dtype and torch.equal(worker.got[n], t), n
    # a second push on the same group (the next step), a subset of names
    _perturb(model, seed=2)
    names = {n for n in want if ".layers.2." in n}
    trainer.source = PolicySource(model, dtype, names)
    trainer.send_weights()
    assert worker.got.keys() == names
    assert all(torch.equal(worker.got[n], t) for n, t in PolicySource(model, dtype, names))


def test_a_source_that_disagrees_with_its_metadata_is_a_clear_error():
    model, _ = build_student(TINY, seed=0)

    class Lying(PolicySource):
        def metadata(self):
            m = super().metadata()
            return m[1:] + m[:1]
    vcfg = SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_index=0, world_size=1, rank=0),
                           model_config=None)
    worker = _RecordingWorker(None, vcfg, torch.device("cpu"), SimpleNamespace(load_weights=lambda ws: None))
    info = GlooTrainerInitInfo("127.0.0.1", free_port("127.0.0.1"), 2, timeout_s=5, rank=0)
    trainer = GlooTrainerWeightTransferEngine.trainer_init(info, client=_InProcessRoutes(worker), source=Lying(model))
    with pytest.raises(ValueError, match=r"weight source: item 0 is 'model.embed_tokens.weight'.*its metadata said"):
        trainer.send_weights()


@pytest.mark.parametrize("transfer", ["gloo", "nccl"])
def test_the_server_client_joins_a_group_of_one_trainer_and_the_servers_workers(transfer, monkeypatch):
    """The client's side of the rendezvous: world size 1 + the server's workers (its /get_world_size), the trainer
    rank 0 on transfer_host, the engine vLLM's NCCL one or ours; the routes never retried (the engine's trainer_init
    is replaced here: NCCL needs GPUs, the gloo rendezvous is the test above)."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    from exgrpo.tokenizer import byte_tokenizer
    from exgrpo.vllm_backend import ServerOptions, VLLMServerBackend
    tok = byte_tokenizer("chatml")
    be = VLLMServerBackend("http://10.1.2.3:8000/v1", "student", tok, [tok.eos_token_id],
                           ServerOptions(weight_transfer=transfer, transfer_host="127.0.0.1"))
    calls = []
    monkeypatch.setattr(be, "_post", lambda path, body=None, ok=(200,), retry=True, method="POST":
                        calls.append((method, path, retry)) or {"world_size": 4})
    seen = {}

    def fake_init(cls, info, *, client, source=None):
        seen.update(cls=cls, info=info, client=client, source=source)
        return "engine"
    cls = NCCLTrainerWeightTransferEngine if transfer == "nccl" else GlooTrainerWeightTransferEngine
    monkeypatch.setattr(cls, "trainer_init", classmethod(fake_init))
    model, _ = build_student(TINY, seed=0)
    assert be._join(model) == "engine" and seen["cls"] is cls
    info = seen["info"]
    assert (info.master_address, info.world_size, info.rank, info.is_sender) == ("127.0.0.1", 5, 0, True)
    assert 0 < info.master_port < 65536 and calls == [("GET", "/get_world_size", True)]
    seen["client"].update_weights({"names": []})
    assert calls[-1] == ("POST", "/update_weights", False)
    be.http.close()


def test_server_options_reject_an_unknown_transfer_or_dtype():
    from exgrpo.vllm_backend import ServerOptions
    with pytest.raises(ValueError, match=r"server weight_transfer='ncl': expected one of \['file', 'gloo', 'nccl'\]"):
        ServerOptions(weight_transfer="ncl")
    with pytest.raises(ValueError, match=r"server transfer_dtype='bf16': expected auto or a torch dtype name"):
        ServerOptions(transfer_dtype="bf16")
