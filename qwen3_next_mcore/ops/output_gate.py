"""The gated attention's output gate ``o * sigmoid(gate)`` (spec section 3.3), reading the gate where the
fused q/gate/k/v projection left it.

megatron-core's ``SelfAttention`` copies the gate heads out of the projection (a reshape of a strided
view) before one elementwise pass; at 16k tokens x 16 heads x 256 that is 134 MB written and read again
per layer forward, and the copy is kept for the backward. :func:`sigmoid_gate` takes the strided view as
it is. On CUDA it runs as ``torch.compile`` of the eager code and of its
hand-derived backward, graphs without autograd in them, which take strided inputs (backend "compile",
logged); elsewhere the eager code runs with autograd (backend "torch").
"""

from __future__ import annotations

import torch

from .backends import compiled, compiled_op_backend, env_for


def _torch_sigmoid_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (x.view(gate.shape) * torch.sigmoid(gate.float())).to(x.dtype).view(x.shape)


def _sigmoid_gate_backward(dy: torch.Tensor, x: torch.Tensor, gate: torch.Tensor):
    s = torch.sigmoid(gate.float())
    dy = dy.view(gate.shape).float()
    dx = (dy * s).to(x.dtype).view(x.shape)
    dgate = (dy * x.view(gate.shape).float() * s * (1 - s)).to(gate.dtype)
    return dx, dgate


class _CompiledSigmoidGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate):
        ctx.save_for_backward(x, gate)
        # backends.compiled, not compiled_or_eager: that one copies strided inputs, the copy this op avoids
        return compiled(_torch_sigmoid_gate)(x, gate)

    @staticmethod
    def backward(ctx, dy):
        x, gate = ctx.saved_tensors
        return compiled(_sigmoid_gate_backward)(dy.contiguous(), x, gate)


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``x * sigmoid(gate)`` computed in fp32, rounded once to x.dtype (megatron-core's output gate).

    x: contiguous ``[..., n]`` (the attention output ``[s, b, heads * d]``); gate: any strides, the same
    number of elements laid out as x's (``[s, b, groups, heads per group, d]``, a view of the projection).
    Returns x's shape and dtype. backend: None/"auto" (CUDA -> "compile", else "torch"), "torch", "compile".
    """
    if not x.is_contiguous() or x.numel() != gate.numel() or x.shape[:-1] != gate.shape[:x.dim() - 1]:
        raise ValueError(f"sigmoid_gate: x must be contiguous [..., n] and gate [..., *] with the same leading "
                         f"dims and element count; got x {list(x.shape)} (contiguous: {x.is_contiguous()}) and "
                         f"gate {list(gate.shape)}")
    name = compiled_op_backend("sigmoid_gate", env_for(x), backend)
    if name == "torch":
        return _torch_sigmoid_gate(x, gate)
    return _CompiledSigmoidGate.apply(x, gate)
