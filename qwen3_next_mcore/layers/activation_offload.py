"""Activation offloading for the hybrid stack: the tensors a layer saves for its backward go to host memory
during the forward and come back for the backward (Pai-Megatron-Patch's ``AC=offload``, Megatron-LM's
``--cpu-offloading --cpu-offloading-num-layers N``).

Why our own: megatron-core's ``cpu_offloading`` needs Transformer Engine's offload context and acts only
inside TE modules, and its fine-grained offloading knows attention and MLP sub-modules but not the Gated
DeltaNet mixer, so neither offloads a Qwen3-Next GDN layer here. This uses PyTorch's
``torch.autograd.graph.saved_tensors_hooks`` around whole hybrid layers, so everything autograd saves in
them (GDN projections, conv and recurrence inputs, attention, router, experts) is offloaded, whatever
module saved it. Parameters (and views of them) stay where they are, and so do tensors under
``min_bytes``. Copies are asynchronous into pinned host memory on the current stream, so they are
ordered with the computation that produced and will consume them.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class OffloadStats:
    """What the hooks moved (for tests and logs): tensors and bytes per layer name."""

    tensors: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, layer: str, t: torch.Tensor) -> None:
        self.tensors[layer] = self.tensors.get(layer, 0) + 1
        self.bytes[layer] = self.bytes.get(layer, 0) + t.numel() * t.element_size()


def _is_parameter(t: torch.Tensor) -> bool:
    while t is not None:
        if isinstance(t, nn.Parameter):
            return True
        t = t._base
    return False


def offload_hooks(name: str, stats: OffloadStats | None, min_bytes: int):
    """The (pack, unpack) pair of ``saved_tensors_hooks`` for the layer ``name``."""

    def pack(t: torch.Tensor):
        if _is_parameter(t) or t.numel() * t.element_size() < min_bytes:
            return t
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=t.is_cuda)
        if t.is_contiguous():
            host.copy_(t, non_blocking=t.is_cuda)
        else:  # keep the strides out of it: autograd only needs the values and the shape
            host.copy_(t.contiguous(), non_blocking=t.is_cuda)
        if stats is not None:
            stats.add(name, t)
        return (t.device, host)

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)

    return pack, unpack


def _offloaded_forward(forward, name: str, stats: OffloadStats | None, min_bytes: int, *args, **kwargs):
    with torch.autograd.graph.saved_tensors_hooks(*offload_hooks(name, stats, min_bytes)):
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
        name = f"decoder.layers.{i}({kind})"
        layer.forward = functools.partial(_offloaded_forward, layer.forward, name, stats, min_bytes)
        names.append(name)
    log.info("activation offload to host memory on %d hybrid layers: %s", len(names), ", ".join(names))
    return names
