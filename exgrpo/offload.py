"""Activation offloading (``model.activation_offload=true``): the tensors a micro-batch's forward saves for its
backward are moved to host memory as they are saved and brought back when the backward needs them.

With gradient checkpointing the saved tensors are mostly each decoder layer's input (the checkpoint keeps it to
recompute the layer), so the device holds one layer's activations at a time instead of ``layers x tokens x
hidden``; without it, every layer's saved activations go to the host. Parameters (trained or frozen, FSDP2's
gathered ones included) are never moved: the backward reads them where they live. Tensors under ``min_bytes``
stay too (the copy would cost more than it saves).

On CUDA the copy to pinned host memory runs on a side stream, so the forward does not wait for it; the copy back
runs on the current stream, ordered before the first kernel of the backward that reads it. On a CPU device the
tensors are already in host memory: they are kept as they are, unless ``copy_host_tensors`` (the tests: the same
pack / unpack bookkeeping as on CUDA, by copies).

Built on ``torch.autograd.graph.saved_tensors_hooks`` (what ``torch.autograd.graph.save_on_cpu`` uses), composable
with FSDP2, DDP, LoRA and the fused loss's custom autograd ops, which save their inputs through the same hooks.
"""
from __future__ import annotations

import weakref

import torch


def _is_parameter(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """``with OffloadActivations(): loss = forward(...)``; then ``loss.backward()`` anywhere.

    min_bytes:          tensors smaller than this stay where they are (default 1 MiB)
    copy_host_tensors:  on a CPU device, copy saved tensors anyway (tests)
    Counters: ``offloaded`` (tensors moved), ``offloaded_bytes`` (their bytes), ``host_bytes`` (held in host memory
    now: a copy is released with its autograd graph), ``host_bytes_peak`` (the most held at once).
    """

    def __init__(self, min_bytes: int = 1 << 20, copy_host_tensors: bool = False):
        self.offloaded = self.offloaded_bytes = self.host_bytes = self.host_bytes_peak = 0
        self._stream = None
        self._seen = {}  # id(tensor) -> (weakref to it, its host copy): one copy of a tensor saved many times

        def pack(t: torch.Tensor):
            n = t.numel() * t.element_size()
            if n < min_bytes or _is_parameter(t) or t.layout != torch.strided:
                return t
            seen = self._seen.get(id(t))
            if seen is not None and seen[0]() is t:  # saved again (RoPE's cos / sin by every checkpointed layer)
                return seen[1]
            if t.device.type == "cuda":
                host, event = self._to_host_async(t)
            elif copy_host_tensors:
                host, event = torch.empty_like(t, device="cpu").copy_(t), None
            else:
                return t
            self.offloaded += 1
            self.offloaded_bytes += n
            self.host_bytes += n
            self.host_bytes_peak = max(self.host_bytes_peak, self.host_bytes)
            packed = _Offloaded(t.device, host, event, n, self)
            self._seen[id(t)] = (weakref.ref(t), packed)  # while t lives, its id is its own
            return packed

        def unpack(p):
            if not isinstance(p, _Offloaded):
                return p
            if p.device.type == "cuda":
                if p.event is not None:
                    torch.cuda.current_stream(p.device).wait_event(p.event)
                out = p.host.to(p.device, non_blocking=True)
            else:
                out = p.host
            return out

        super().__init__(pack, unpack)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._seen.clear()  # the graph holds the copies from here on; they are freed with it

    def _to_host_async(self, t: torch.Tensor):
        """A pinned host copy of ``t`` made on a side stream, and the event recorded after it."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(t.device)
        main = torch.cuda.current_stream(t.device)
        host = torch.empty_like(t, device="cpu", pin_memory=True)  # t's strides where dense, else contiguous
        self._stream.wait_stream(main)  # t is complete
        with torch.cuda.stream(self._stream):
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        t.record_stream(self._stream)  # the allocator keeps t's memory until the copy is done
        return host, event


class _Offloaded:
    """A saved tensor in host memory: where it came from, the copy, the event marking the copy done (CUDA). Freed
    with the autograd graph (after the backward, or when the graph is dropped), which is when ``owner`` counts its
    host bytes as released."""

    def __init__(self, device, host, event, nbytes, owner):
        self.device, self.host, self.event, self.nbytes, self.owner = device, host, event, nbytes, owner

    def __del__(self):
        self.owner.host_bytes -= self.nbytes
