"""Weights from the trainer to a ``vllm serve`` over a communicator, on vLLM's own weight-transfer API (the
``/init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``, ``/finish_weight_update`` routes of
``VLLM_SERVER_DEV_MODE=1``): the trainer joins a process group with the server's workers and broadcasts the weights
bucket by bucket, no file on either side.

Two transports, one protocol:

- ``nccl`` (GPU to GPU): vLLM's ``NCCLTrainerWeightTransferEngine``; start the server with
  ``--weight-transfer-config '{"backend": "nccl"}'``.
- ``gloo`` (host memory, any machine; what the CPU tests run): :class:`GlooWeightTransferEngine` on the workers,
  :class:`GlooTrainerWeightTransferEngine` here; start the server with ``--weight-transfer-config '{"backend":
  "gloo"}'``. vLLM finds the engine through this package's ``vllm.general_plugins`` entry point (:func:`register`),
  so ``exgrpo`` must be installed where the server runs.

Wire format of ``gloo``: the parameters in the order of the update's metadata, cut into buckets of at most
``bucket_bytes`` (a larger tensor is a bucket of its own), each bucket one ``uint8`` broadcast from rank 0 with every
tensor's bytes at a 16-byte aligned offset; both sides cut the buckets from the same metadata (:func:`bucket_plan`).

With LoRA the first push (and the one after a server restart) is the whole merged model; later pushes carry only the
decoder layers that hold an adapter (:func:`touched_groups`), whole, since vLLM fuses a layer's projections
(q/k/v, gate/up) into one weight that must be loaded complete; embeddings, final norm and ``lm_head`` stay as
the server has them.
"""
from __future__ import annotations

import datetime
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
    layerwise_groups,
)

from exgrpo.vllm_serve import free_port  # noqa: F401  (the trainer picks its rendezvous port with it)

ALIGN = 16  # bytes: every tensor of a bucket starts at a multiple (a uint8 slice viewed as any dtype)
DEFAULT_BUCKET_BYTES = 256 << 20


def register() -> None:
    """The ``vllm.general_plugins`` entry point: makes ``gloo`` a weight-transfer backend in every vLLM process
    (the server's workers and the trainer). Idempotent (vLLM may load plugins more than once)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory
    for factory, cls in ((WeightTransferEngineFactory, "GlooWeightTransferEngine"),
                         (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine")):
        try:
            factory.register_engine("gloo", __name__, cls)
        except ValueError:  # already registered
            pass


def bucket_plan(nbytes: list[int], bucket_bytes: int) -> list[list[tuple[int, int]]]:
    """Cut tensors of ``nbytes`` (in order) into buckets: each a list of (index, byte offset), at most
    ``bucket_bytes`` in all unless a single tensor is larger."""
    buckets, cur, off = [], [], 0
    for i, n in enumerate(nbytes):
        start = -(-off // ALIGN) * ALIGN
        if cur and start + n > bucket_bytes:
            buckets.append(cur)
            cur, start = [], 0
        cur.append((i, start))
        off = start + n
    if cur:
        buckets.append(cur)
    return buckets


def _bucket_size(bucket, nbytes) -> int:
    i, o = bucket[-1]
    return o + nbytes[i]


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= int(s)
    return n


def gloo_group(host: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A process group of its own (not torch.distributed's default one, which FSDP may hold): a TCPStore hosted by
    rank 0 on ``port``, gloo on top."""
    import torch.distributed as dist
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore("exgrpo-weights", store), rank, world_size, timeout)


# ---------------------------------------------------------------------------------------------- worker side


@dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 600.0


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self):
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"gloo weight update: {len(self.names)} names, {len(self.dtype_names)} dtype_names, "
                             f"{len(self.shapes)} shapes (must be equal)")


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    """The server workers' side of ``gloo``: receives the buckets and loads them through the model's
    ``load_weights`` inside vLLM's layerwise reload (as its NCCL engine does)."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group, self.bucket_bytes = None, DEFAULT_BUCKET_BYTES

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self.bucket_bytes = init_info.bucket_bytes
        self.group = gloo_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type != "cpu":
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer: init_weight_transfer_engine was not called")
        dtypes = [getattr(torch, d) for d in update_info.dtype_names]
        nbytes = [_nbytes(d, s) for d, s in zip(dtypes, update_info.shapes)]
        for bucket in bucket_plan(nbytes, self.bucket_bytes):
            buf = torch.empty(_bucket_size(bucket, nbytes), dtype=torch.uint8)
            self.group.broadcast(buf, 0).wait()
            weights = [(update_info.names[i], buf[o:o + nbytes[i]].view(dtypes[i]).view(update_info.shapes[i])
                        .to(self.device)) for i, o in bucket]
            self.model.load_weights(weights)

    def shutdown(self) -> None:
        self.group = None


# ---------------------------------------------------------------------------------------------- trainer side


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """The trainer's side of ``gloo``: rank 0 hosts the rendezvous on ``master_address:master_port`` (an address
    the server's workers can reach); ``world_size`` = 1 + the server's workers."""

    backend: ClassVar[str] = "gloo"
    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 600.0


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source=None, is_sender=True, bucket_bytes=DEFAULT_BUCKET_BYTES):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes, self.group = bucket_bytes, None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        worker = GlooWeightTransferInitInfo(init_info.master_address, init_info.master_port, rank_offset=1,
                                            world_size=init_info.world_size, bucket_bytes=init_info.bucket_bytes,
                                            timeout_s=init_info.timeout_s)
        with ThreadPoolExecutor(max_workers=1) as ex:  # the workers block in the rendezvous until rank 0 joins
            fut = ex.submit(client.init_weight_transfer_engine, asdict(worker))
            engine.group = gloo_group(init_info.master_address, init_info.master_port, 0, init_info.world_size,
                                      init_info.timeout_s)
            fut.result()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # the trainer-side gathers are collectives
                pass
            return
        update = GlooWeightTransferUpdateInfo([m.name for m in meta], [str(m.dtype).split(".")[-1] for m in meta],
                                              [list(m.shape) for m in meta])
        self.client.start_weight_update()
        ex = ThreadPoolExecutor(max_workers=1)
        try:
            fut = ex.submit(self.client.update_weights, asdict(update))  # the workers receive while we send
            self._broadcast(meta)
            fut.result()
        finally:
            ex.shutdown(wait=False)  # a failed broadcast leaves the RPC hanging: never join it
        self.client.finish_weight_update()

    def _broadcast(self, meta: list[ParamMeta]) -> None:
        nbytes = [_nbytes(m.dtype, m.shape) for m in meta]
        it = iter(self.source)
        for bucket in bucket_plan(nbytes, self.bucket_bytes):
            buf = torch.empty(_bucket_size(bucket, nbytes), dtype=torch.uint8)
            for i, o in bucket:
                name, t = next(it)
                if name != meta[i].name or t.dtype != meta[i].dtype or tuple(t.shape) != tuple(meta[i].shape):
                    raise ValueError(f"weight source: item {i} is {name!r} {t.dtype} {tuple(t.shape)}, its metadata "
                                     f"said {meta[i].name!r} {meta[i].dtype} {tuple(meta[i].shape)}")
                buf[o:o + nbytes[i]].copy_(t.detach().contiguous().view(-1).view(torch.uint8).cpu())
            self.group.broadcast(buf, 0).wait()

    def shutdown(self) -> None:
        self.group = None


# ---------------------------------------------------------------------------------------------- the policy


def _strip(k: str) -> str:
    return k.replace("base_model.model.", "").replace(".base_layer", "")


def touched_groups(model) -> set[str] | None:
    """The Hugging Face names of the weights in decoder layers that hold a LoRA adapter (whole layers; see the module
    doc), or None for a model without adapters (everything is trained)."""
    if not hasattr(model, "merge_adapter"):
        return None
    keys = list(model.state_dict())
    adapted = {_strip(k.split(".lora_")[0]) for k in keys if ".lora_" in k}
    names = [_strip(k) for k in keys if "lora_" not in k]
    out = set()
    for g in layerwise_groups(names):
        if any(n.startswith(a + ".") for n in g for a in adapted):
            out.update(g)
    return out


class PolicySource(WeightSource):
    """The policy's weights for a push: Hugging Face names, LoRA merged in, one tensor at a time (FSDP2 shards
    gathered one at a time on every rank), cast to ``dtype`` (None: as held), restricted to ``names`` (None: all).
    A yielded tensor may be a view of a live (merged) parameter: valid until the next one is drawn."""

    def __init__(self, model, dtype: torch.dtype | None = None, names: set[str] | None = None):
        self.model, self.dtype, self.names = model, dtype, names
        self._meta = None

    def metadata(self) -> list[ParamMeta]:
        """Computed once (a source is made per push; a 4-bit base needs a dequantizing pass to know its shapes)."""
        if self._meta is None:
            self._meta = self._metadata()
        return self._meta

    def _metadata(self) -> list[ParamMeta]:
        from exgrpo.model import base_causal_lm, is_4bit
        if is_4bit(self.model):  # packed NF4 shapes say nothing: one pass of the dequantized weights
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self]
        sd = self.model.state_dict() if hasattr(self.model, "merge_adapter") else base_causal_lm(self.model).state_dict()
        out = []
        for k, v in sd.items():
            if "lora_" in k:
                continue
            name = _strip(k)
            if self.names is None or name in self.names:
                out.append(ParamMeta(name, self.dtype or v.dtype, tuple(v.shape)))
        return out

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        from exgrpo.model import merged_state
        for name, t in merged_state(self.model):
            if self.names is None or name in self.names:
                yield name, t if self.dtype is None else t.to(self.dtype)


class SnapshotSource(WeightSource):
    """Staged weights for a push that runs after the trainer has moved on (``async_steps``): Hugging Face names to
    host tensors (copies, merged), restricted to ``names`` (None: all)."""

    def __init__(self, tensors: dict[str, torch.Tensor], names: set[str] | None = None):
        self.tensors, self.names = tensors, names

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for n, t in self.tensors.items():
            if self.names is None or n in self.names:
                yield n, t
