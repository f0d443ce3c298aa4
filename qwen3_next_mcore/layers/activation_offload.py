"""Activation offloading for the hybrid stack: the tensors a layer saves for its backward go to host memory
during the forward and come back for the backward (Pai-Megatron-Patch's ``AC=offload``, Megatron-LM's
``--cpu-offloading --cpu-offloading-num-layers N``).

Why our own: megatron-core's ``cpu_offloading`` needs Transformer Engine's offload context and acts only
inside TE modules, and its fine-grained offloading knows attention and MLP sub-modules but not the Gated
DeltaNet mixer, so neither offloads a Qwen3-Next GDN layer here. This uses PyTorch's
``torch.autograd.graph.saved_tensors_hooks`` around whole hybrid layers, so everything autograd saves in
them (GDN projections, conv and recurrence inputs, attention, router, experts) is offloaded, whatever
module saved it. Parameters (and views of them) stay where they are, and so do tensors under
``min_bytes``.

On CUDA the copies run on a side stream so they overlap the computation: each device-to-host copy waits
only for the kernel that produced its tensor (the allocator keeps the tensor's memory until the copy is
done, ``record_stream``); in the backward, the first tensor asked for from a layer fetches that whole
layer back and starts fetching the layer before it (the next one the backward reaches), so at most two
offloaded layers are on the device at a time. On a CPU the same bookkeeping runs with plain copies.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class OffloadStats:
    """What the hooks moved (for tests and logs): tensors and bytes per layer name, and each fetch back
    in order as (layer name, "demand" | "prefetch")."""

    tensors: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    fetches: list[tuple[str, str]] = field(default_factory=list)

    def add(self, layer: str, t: torch.Tensor) -> None:
        self.tensors[layer] = self.tensors.get(layer, 0) + 1
        self.bytes[layer] = self.bytes.get(layer, 0) + t.numel() * t.element_size()


def _is_parameter(t: torch.Tensor) -> bool:
    while t is not None:
        if isinstance(t, nn.Parameter):
            return True
        t = t._base
    return False


@dataclass(eq=False)
class _Saved:
    """One offloaded tensor of the ``forward``-th forward of hybrid layer ``layer``: its host copy, and once
    fetched back its device copy (ready after the event ``ready``)."""

    layer: int
    forward: int
    device: torch.device
    host: torch.Tensor
    fetched: torch.Tensor | None = None
    ready: object = None  # torch.cuda.Event of the host-to-device copy


class Offloader:
    """The saved-tensor hooks' shared state for the offloaded layers of one model: the copy stream and,
    per (layer, forward count), weak references to what that forward saved, in order. Counting forwards
    keeps micro-batches apart when several are in flight (pipeline schedules): the backward of layer i's
    k-th forward prefetches layer i-1's k-th."""

    def __init__(self, names: list[str], stats: OffloadStats | None, min_bytes: int):
        self.names, self.stats, self.min_bytes = names, stats, min_bytes
        self.forwards = [0] * len(names)
        self.saved: dict[tuple[int, int], list[weakref.ref]] = {}
        self._stream = None

    def stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def begin_forward(self, layer: int) -> None:
        self.forwards[layer] += 1
        self.saved = {k: refs for k, refs in self.saved.items() if any(r() is not None for r in refs)}
        self.saved[(layer, self.forwards[layer])] = []

    def hooks(self, layer: int):
        """The (pack, unpack) pair of ``saved_tensors_hooks`` for the hybrid layer ``layer``."""
        return functools.partial(self.pack, layer), self.unpack

    def pack(self, layer: int, t: torch.Tensor):
        if _is_parameter(t) or t.numel() * t.element_size() < self.min_bytes:
            return t
        src = t if t.is_contiguous() else t.contiguous()  # autograd needs the values and the shape only
        host = torch.empty(src.size(), dtype=src.dtype, layout=src.layout, pin_memory=src.is_cuda)
        if src.is_cuda:
            stream = self.stream()
            stream.wait_stream(torch.cuda.current_stream(src.device))
            with torch.cuda.stream(stream):
                host.copy_(src, non_blocking=True)
            src.record_stream(stream)  # its memory is not reused before the copy has read it
        else:
            host.copy_(src)
        if self.stats is not None:
            self.stats.add(self.names[layer], t)
        saved = _Saved(layer, self.forwards[layer], t.device, host)
        self.saved.setdefault((layer, saved.forward), []).append(weakref.ref(saved))
        return saved

    def _fetch(self, layer: int, forward: int, why: str, also: _Saved | None = None) -> None:
        """Copy back every not-yet-fetched tensor of that forward of ``layer`` (and ``also``)."""
        alive = (ref() for ref in self.saved.get((layer, forward), ()))
        pending = [s for s in alive if s is not None and s.fetched is None]
        if also is not None and also.fetched is None and all(s is not also for s in pending):
            pending.append(also)
        if not pending:
            return
        if self.stats is not None:
            self.stats.fetches.append((self.names[layer], why))
        if pending[0].device.type == "cuda":
            stream = self.stream()  # after the device-to-host copies on the same stream
            with torch.cuda.stream(stream):
                for s in pending:
                    s.fetched = s.host.to(s.device, non_blocking=True)
                ready = stream.record_event()
            for s in pending:
                s.ready = ready
        else:
            for s in pending:
                s.fetched = s.host.clone()

    def unpack(self, saved):
        if isinstance(saved, torch.Tensor):
            return saved
        if saved.fetched is None:
            self._fetch(saved.layer, saved.forward, "demand", also=saved)
        if saved.layer > 0:
            self._fetch(saved.layer - 1, saved.forward, "prefetch")
        t, saved.fetched = saved.fetched, None
        if saved.ready is not None:
            current = torch.cuda.current_stream(t.device)
            current.wait_event(saved.ready)
            t.record_stream(current)  # allocated on the copy stream, used on this one
            saved.ready = None
        return t


def _offloaded_forward(forward, offloader: Offloader, layer: int, *args, **kwargs):
    offloader.begin_forward(layer)
    with torch.autograd.graph.saved_tensors_hooks(*offloader.hooks(layer)):
        return forward(*args, **kwargs)


def enable_activation_offload(model, num_layers: int, *, min_bytes: int = 1 << 20,
                              stats: OffloadStats | None = None) -> list[str]:
    """Offload the saved activations of the first ``num_layers`` Qwen3-Next decoder layers of ``model``
    (this pipeline stage's; one decoder layer = its mixer and its MoE hybrid layers). Returns the names of
    the hybrid layers it acts on. The parameter names and the checkpoint keys do not change."""
    stack = getattr(model, "module", model).decoder
    layers = list(stack.layers)
    if num_layers < 1:
        raise ValueError(f"activation offload: num_layers={num_layers} must be >= 1")
    chosen = layers[: 2 * num_layers]
    names = []
    for i, layer in enumerate(chosen):
        parts = [getattr(layer, a, None) for a in ("self_attention", "mlp")]
        kinds = [type(p).__name__ for p in parts if p is not None and type(p).__name__ != "IdentityOp"]
        kind = "+".join(kinds) or type(layer).__name__
        names.append(f"decoder.layers.{i}({kind})")
    offloader = Offloader(names, stats, min_bytes)
    for i, layer in enumerate(chosen):
        layer.forward = functools.partial(_offloaded_forward, layer.forward, offloader, i)
    log.info("activation offload to host memory on %d hybrid layers (copies on a side stream on CUDA, "
             "the next layer prefetched in the backward): %s", len(names), ", ".join(names))
    return names
