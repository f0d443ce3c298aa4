"""Depthwise causal conv1d over channel-last activations (the short conv of Gated DeltaNet).

Layout: x [B, T, D] (fla's channel-last layout), weight [D, W], bias [D]. Output token t of channel d is
``sum_i weight[d, i] * x[t - (W - 1) + i, d]`` (+ bias): the last tap multiplies the current token and the
left side is zero-padded. With ``cu_seqlens`` (B == 1) the zero padding restarts at every sequence, so a
token never sees the previous sequence.
Backends: "torch" (F.conv1d), "causal_conv1d" (Dao-AILab, CUDA), "fla" (fla's Triton kernel, CUDA).
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F

from .backends import conv_backend_report, env_for, resolve

ACTIVATIONS = (None, "silu", "swish")


def _check(x, weight, bias, activation, cu_seqlens):
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"x must be [B, T, D] and weight [D, W]; got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias must be [D={x.shape[-1]}], got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if cu_seqlens is not None and x.shape[0] != 1:
        raise ValueError(
            f"cu_seqlens needs the packed sequences flattened into batch size 1, got B={x.shape[0]}"
        )


def _restart_index(cu_seqlens: torch.Tensor, W: int, T: int, device):
    """W - 1 zero columns before every packed sequence. Returns the source column of every laid-out
    column (T: the appended zero column) and, for every real token, its output column."""
    src, keep = [], []
    for bos, eos in pairwise(cu_seqlens.tolist()):
        src += [T] * (W - 1)
        keep += range(len(src) - (W - 1), len(src) - (W - 1) + eos - bos)
        src += range(bos, eos)
    return (torch.tensor(xs, dtype=torch.long, device=device) for xs in (src, keep))


def _torch_causal_conv1d(x, weight, bias, activation, cu_seqlens):
    B, T, D = x.shape
    W = weight.shape[1]
    if T == 0:
        return x.clone()
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    xt = x.to(dtype).transpose(1, 2)  # [B, D, T]
    if cu_seqlens is None:
        xt, keep = F.pad(xt, (W - 1, 0)), None
    else:
        src, keep = _restart_index(cu_seqlens, W, T, x.device)
        xt = torch.cat([xt, xt.new_zeros(B, D, 1)], 2)[:, :, src]
    bias = None if bias is None else bias.to(dtype)
    y = F.conv1d(xt, weight.to(dtype).unsqueeze(1), bias, groups=D)  # output t sees padded columns t..t+W-1
    if keep is not None:
        y = y[:, :, keep]
    if activation is not None:
        y = F.silu(y)
    return y.transpose(1, 2).to(x.dtype)


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[1, T]`` int32 index of the sequence each token belongs to (causal-conv1d's ``seq_idx``)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ids = torch.arange(len(lengths), device=cu_seqlens.device, dtype=torch.int32)
    return torch.repeat_interleave(ids, lengths, output_size=total).unsqueeze(0).contiguous()


def _dao_causal_conv1d(x, weight, bias, activation, cu_seqlens):
    from causal_conv1d import causal_conv1d_fn

    # [B, D, T] view of a contiguous [B, T, D]: the channel-last strides that seq_idx requires
    xt = x.contiguous().transpose(1, 2)
    seq_idx = None if cu_seqlens is None else seq_idx_from_cu_seqlens(cu_seqlens, x.shape[1])
    y = causal_conv1d_fn(xt, weight, bias, seq_idx=seq_idx, activation=activation)
    return y.transpose(1, 2)


def _fla_causal_conv1d(x, weight, bias, activation, cu_seqlens):
    try:
        from fla.modules.causal_conv1d import causal_conv1d as fla_causal_conv1d
    except ImportError:  # fla < 0.6 kept it in fla.modules.convolution
        from fla.modules.convolution import causal_conv1d as fla_causal_conv1d
    y, _ = fla_causal_conv1d(
        x=x,
        weight=weight,
        bias=bias,
        activation=activation,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(torch.long),
    )
    return y


_IMPLS = {"torch": _torch_causal_conv1d, "causal_conv1d": _dao_causal_conv1d, "fla": _fla_causal_conv1d}


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Depthwise causal conv1d, optionally followed by SiLU.

    Args:
        x: ``[B, T, D]``; weight: ``[D, W]``; bias: ``[D]`` or None.
        activation: "silu" (alias "swish") or None.
        cu_seqlens: int ``[N + 1]`` boundaries of packed sequences (B must be 1).
        backend: None/"auto" (CPU -> "torch"; CUDA -> "causal_conv1d" if installed, else "fla", else raise),
            "torch", "causal_conv1d" or "fla".

    Returns:
        ``[B, T, D]`` in x.dtype. The torch path computes in fp32 (fp64 for fp64 inputs) and rounds once,
        like the fused kernels.
    """
    _check(x, weight, bias, activation, cu_seqlens)
    name = resolve(conv_backend_report(env_for(x), backend))
    return _IMPLS[name](x, weight, bias, None if activation is None else "silu", cu_seqlens)
