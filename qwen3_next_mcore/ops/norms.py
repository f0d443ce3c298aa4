"""RMSNorms of Qwen3-Next (spec section 3.1), normalising over the last dim.

* ``zero_centered_rms_norm``: ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, every norm but the GDN output one.
* ``gated_rms_norm``: ``w * (x * rsqrt(mean(x^2) + eps)) * silu(gate)``, the GDN output norm (w starts at 1).

Both compute in fp32 (fp64 for fp64 inputs) and round once, at the end, to x.dtype. On CUDA the
zero-centred norm runs as ``torch.compile`` of the same function and of its hand-derived backward, two
graphs without autograd in them (one fused kernel each way instead of about ten elementwise passes: 3.4x
faster for [16384, 2048] bf16 on an H100). Without autograd inside the graphs they take strided inputs
as they are: the attention's q heads, a strided view of its fused projection, are normalised without
first being copied out (autograd-compiled graphs asserted their saved inputs' strides in torch 2.11 and
so needed contiguous inputs). The gated norm runs fla's fused kernel. transformers'
``Qwen3NextRMSNormGated`` rounds the normalised x to the input dtype before the weight multiply; we do
not, because fla's fused kernel (our CUDA path) does not either, and the CPU and GPU paths should agree.
In fp32 both match transformers exactly; in bf16 they differ from it by about one bf16 rounding.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from .backends import compiled_op_backend, env_for, norm_backend_report, resolve


def _dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _rms_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _torch_zero_centered_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = _dtype(x, weight)
    return (_rms_normalise(x.to(dtype), eps) * (1 + weight.to(dtype))).to(x.dtype)


def _zero_centered_rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Gradients of :func:`_torch_zero_centered_rms_norm`: with r = rsqrt(mean(x^2) + eps), x^ = x r and
    g = dy (1 + w), dx = r (g - x^ mean(g x^)) and dw = sum over rows of dy x^ (fp32, rounded once)."""
    dtype = _dtype(x, weight)
    xf = x.to(dtype)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    x_hat = xf * r
    g = dy.to(dtype) * (1 + weight.to(dtype))
    dx = r * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
    dw = (dy.to(dtype) * x_hat).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


class _CompiledZeroCenteredRMSNorm(torch.autograd.Function):
    """Forward and backward each one ``torch.compile`` graph without autograd (strided x read in place)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _compiled(_torch_zero_centered_rms_norm)(x, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, dw = _compiled(_zero_centered_rms_norm_backward)(dy, x, weight, ctx.eps)
        return dx, dw, None


@cache
def _compiled(fn):
    return torch.compile(fn, dynamic=None)


def zero_centered_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                           backend: str | None = None) -> torch.Tensor:
    """Zero-centred RMSNorm: x ``[..., D]`` (any strides), weight ``[D]`` (stored as w, applied as 1 + w).

    backend: None/"auto" (CPU -> "torch"; CUDA -> "compile"), "torch" (eager) or "compile"
    (``torch.compile`` of the eager function and of its backward: the same math fused by Inductor).
    Returns ``[..., D]`` in x.dtype, computed in fp32 (fp64 for fp64 inputs) and cast once.
    """
    name = compiled_op_backend("zero_centered_rms_norm", env_for(x), backend)
    if name == "torch":
        return _torch_zero_centered_rms_norm(x, weight, eps)
    return _CompiledZeroCenteredRMSNorm.apply(x, weight, eps)


def _torch_gated_rms_norm(x, gate, weight, eps):
    dtype = _dtype(x, gate, weight)
    return (weight.to(dtype) * _rms_normalise(x.to(dtype), eps) * F.silu(gate.to(dtype))).to(x.dtype)


def _fla_gated_rms_norm(x, gate, weight, eps):
    try:
        from fla.modules.norm.fused_norm_gate import rms_norm_gated
    except ImportError:  # older fla layout
        from fla.modules.fused_norm_gate import rms_norm_gated
    return rms_norm_gated(x, gate, weight, None, activation="silu", eps=eps)


def gated_rms_norm(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Gated RMSNorm ``weight * rmsnorm(x) * silu(gate)``: x, gate ``[..., D]``, weight ``[D]`` (plain scale).

    backend: None/"auto" (CPU -> "torch"; CUDA -> fla's fused ``rms_norm_gated``, raising if fla is
    missing), "torch" or "fla". Returns ``[..., D]`` in x.dtype, computed in fp32 and cast once.
    """
    if x.shape != gate.shape or tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(
            f"x and gate must match and weight be [D]; got {tuple(x.shape)}, {tuple(gate.shape)}, "
            f"{tuple(weight.shape)}"
        )
    name = resolve(norm_backend_report(env_for(x), backend))
    impl = _fla_gated_rms_norm if name == "fla" else _torch_gated_rms_norm
    return impl(x, gate, weight, eps)
