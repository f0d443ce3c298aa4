"""Norm modules with megatron-core's norm constructor signature ``(config, hidden_size, eps)``.

- :class:`ZeroCenteredRMSNorm`: ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, w initialised to 0 (every
  Qwen3-Next norm except the GDN output norm). megatron-core's local norm rejects zero-centred gamma,
  hence our own.
- :class:`GatedRMSNorm`: the GDN output norm ``w * rmsnorm(x) * silu(z)``, plain weight initialised to 1,
  applied per value head. Its input is split across tensor-parallel ranks by head while the weight is
  shared, so the weight's gradient is summed over the tensor-parallel group inside autograd
  (megatron-core's ``finalize_model_grads`` does not know this parameter).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.norms import gated_rms_norm, zero_centered_rms_norm


class ZeroCenteredRMSNorm(nn.Module):
    """Zero-centred RMSNorm over the last dim. x: [..., hidden_size] any float dtype -> same dtype."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6, **_: object):
        super().__init__()
        dtype = getattr(config, "params_dtype", torch.float32) if config is not None else torch.float32
        self.weight = nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        self.eps = eps
        # under sequence parallelism the input is split by sequence, so megatron-core's
        # finalize_model_grads sums this weight's gradient over the tensor-parallel group
        setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return zero_centered_rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}, zero_centered=True"


class _ReduceGradOverTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the tensor-parallel group."""

    @staticmethod
    def forward(ctx, weight, group):
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class GatedRMSNorm(nn.Module):
    """``w * rmsnorm(x) * silu(z)`` over the last dim. x, z: [..., hidden_size] -> x.dtype."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6, tp_group=None, **_: object):
        super().__init__()
        dtype = getattr(config, "params_dtype", torch.float32) if config is not None else torch.float32
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.tp_group is not None and self.tp_group.size() > 1 and torch.is_grad_enabled():
            weight = _ReduceGradOverTP.apply(weight, self.tp_group)
        return gated_rms_norm(x, z, weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"
