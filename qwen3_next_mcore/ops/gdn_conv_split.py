"""The Gated DeltaNet's short conv fused with the split of its input projection into q, k, v and z.

Qwen3-Next's ``in_proj_qkvz`` produces, per key-head group g, the channels ``[q (dk), k (dk), v (r*dv),
z (r*dv)]`` (Hugging Face's row order, which keeps the layout independent of the TP size). The mixer
then runs a depthwise causal conv + SiLU over the ``[q, k, v]`` channels and needs q ``[B, T, G, dk]``,
k ``[B, T, G, dk]``, v ``[B, T, G*r, dv]`` and z ``[B, T, G*r, dv]`` as separate contiguous tensors
(fla's kernels make every input contiguous). Done with separate ops that is a strided copy of the conv
channels, the conv (fla's backward also recomputes the forward to get the pre-activation), a copy of z,
copies of q/k/v out of the conv output, and in the backward a ``cat`` of the parts' gradients: about
2.5 ms per layer fwd+bwd at 16k tokens on an H100, against about 0.5 ms of memory traffic.

:func:`conv_split_qkvz` does it in one Triton pass forward and two backward, written here because no
library offers it (on an H200 at 80B widths, 16k tokens: 0.24 ms forward, 0.96 ms backward, against
2.29 ms fwd+bwd for fla's conv with the split and copies; ``qwen3-next-mcore bench gdn-conv``):

* forward: reads the projection once (any batch/token strides, so a transposed sequence-parallel
  view needs no copy) and writes q, k, v (conv + SiLU in fp32, rounded once) and z (copied) into one
  allocation, each part a contiguous tensor;
* backward, two passes: the first reads the parts' gradients where they lie and the saved projection,
  recomputes the pre-activation and writes the gradient before the SiLU (in the input's dtype) and
  per-block partial weight gradients (fp32, summed by one small reduction); the second writes the
  projection's whole gradient (conv channels from the W shifted pre-SiLU gradients, z copied) once.

Packed sequences (``cu_seqlens``) restart the zero padding at every sequence: a tap reaching into the
previous sequence is dropped, as in :func:`qwen3_next_mcore.ops.causal_conv1d.causal_conv1d`.

:func:`conv_split_qkvz_reference` is the same computation from plain ops (split, the torch conv,
reshapes); the tests compare the kernel (on CPU under Triton's interpreter, and on CUDA) against it.
"""

from __future__ import annotations

import math

import torch

from .backends import conv_split_backend_report, env_for, resolve, triton_interpreted
from .causal_conv1d import causal_conv1d


def _check(qkvz: torch.Tensor, weight: torch.Tensor, dk: int, dv: int, r: int) -> None:
    if qkvz.dim() != 4 or qkvz.shape[-1] != 2 * dk + 2 * r * dv:
        raise ValueError(f"conv_split_qkvz: qkvz must be [B, T, G, 2*dk + 2*r*dv = {2 * dk + 2 * r * dv}], "
                         f"got {tuple(qkvz.shape)} (dk={dk}, dv={dv}, r={r})")
    G = qkvz.shape[2]
    if weight.dim() != 2 or weight.shape[0] != G * (2 * dk + r * dv):
        raise ValueError(f"conv_split_qkvz: weight must be [G*(2*dk + r*dv) = {G * (2 * dk + r * dv)}, W], "
                         f"got {tuple(weight.shape)}")


def conv_split_qkvz_reference(qkvz: torch.Tensor, weight: torch.Tensor, *, dk: int, dv: int, r: int,
                              cu_seqlens: torch.Tensor | None = None, conv_backend: str | None = "torch"):
    """The unfused computation: split, :func:`causal_conv1d` (SiLU) with ``conv_backend``, reshapes.

    Args: qkvz ``[B, T, G, 2dk + 2r*dv]`` (per group q, k, v, z), weight ``[G*(2dk + r*dv), W]``.
    Returns contiguous q ``[B, T, G, dk]``, k ``[B, T, G, dk]``, v ``[B, T, G*r, dv]``, z ``[B, T, G*r, dv]``
    in qkvz's dtype."""
    _check(qkvz, weight, dk, dv, r)
    B, T, G, _ = qkvz.shape
    group_conv = 2 * dk + r * dv
    # torch.split, not slicing: its backward writes the parts' gradients into one tensor (a cat)
    mixed, z = torch.split(qkvz, [group_conv, r * dv], dim=-1)
    mixed = causal_conv1d(mixed.reshape(B, T, G * group_conv), weight, activation="silu", cu_seqlens=cu_seqlens,
                          backend=conv_backend)
    q, k, v = torch.split(mixed.view(B, T, G, group_conv), [dk, dk, r * dv], dim=-1)
    return (q.contiguous(), k.contiguous(), v.reshape(B, T, G * r, dv).contiguous(),
            z.reshape(B, T, G * r, dv).contiguous())


def token_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[total]`` int32 position of each token inside its packed sequence (no host read)."""
    starts = cu_seqlens[:-1].to(torch.int64)
    lengths = cu_seqlens[1:].to(torch.int64) - starts
    first = torch.repeat_interleave(starts, lengths, output_size=total)
    return (torch.arange(total, device=cu_seqlens.device, dtype=torch.int64) - first).to(torch.int32)


def _block_d(dk: int, rdv: int) -> int:
    """The largest channels per program allowed: a power of two dividing dk and r*dv (a block never
    straddles two parts), at most 128."""
    g = math.gcd(dk, rdv)
    return min(128, g & -g)


# Tokens x channels per program and warps at the 80B widths, bf16, on an H200
# (benchmarks/conv_split_blocks.py, results/h200-2026-11-28-7d56c94/conv_split_blocks.txt): the forward's
# is the sweep's best (0.24 ms); the backward's are within 4% of the best of each pass (0.96 ms for both).
# The channel blocks shrink to what dk and r*dv allow.
FWD_BLOCKS = {"block_t": 32, "block_d": 128, "num_warps": 4}
BWD_BLOCKS = {"dpre_block_t": 64, "dpre_block_d": 64, "dpre_warps": 4,
              "dx_block_t": 32, "dx_block_d": 128, "dx_warps": 4}


def _kernels():
    """The forward and the two backward Triton kernels (``_gdn_conv_split_kernels``, imported when first
    needed: the package imports without Triton)."""
    from . import _gdn_conv_split_kernels as k

    return k.fwd_kernel, k.bwd_dpre_kernel, k.bwd_dx_kernel


def _strides_bt(t: torch.Tensor) -> tuple[int, int]:
    """Batch and token strides of a ``[B, T, G, C]`` tensor whose last two dims are contiguous together."""
    return t.stride(0), t.stride(1)


def _grouped_contiguous(qkvz: torch.Tensor) -> torch.Tensor:
    """``qkvz`` itself when its ``[G, C]`` dims are contiguous together (any batch/token strides), else a copy."""
    C = qkvz.shape[3]
    return qkvz if qkvz.stride(3) == 1 and qkvz.stride(2) == C else qkvz.contiguous()


def conv_split_fwd(qkvz: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor | None, dk: int, dv: int, r: int,
                   *, blocks: dict | None = None):
    """The forward kernel alone (no autograd): returns contiguous q, k, v, z (see :func:`conv_split_qkvz`).
    ``pos``: int32 ``[T]`` positions inside packed sequences (B == 1) or None; ``blocks`` overrides
    :data:`FWD_BLOCKS` (tuning)."""
    qkvz = _grouped_contiguous(qkvz)
    B, T, G, C = qkvz.shape
    W = weight.shape[1]
    cfg = {**FWD_BLOCKS, **(blocks or {})}
    bd, block_t = min(cfg["block_d"], _block_d(dk, r * dv)), cfg["block_t"]
    n_q, n_v = B * T * G * dk, B * T * G * r * dv
    out = torch.empty(2 * n_q + 2 * n_v, device=qkvz.device, dtype=qkvz.dtype)
    fwd = _kernels()[0]
    sxb, sxt = _strides_bt(qkvz)
    grid = (G * C // bd, -(-T // block_t), B)
    fwd[grid](qkvz, weight.contiguous(), out, pos, T, sxb, sxt, n_q, n_v, G=G, DK=dk, RDV=r * dv, W=W, BT=block_t,
              BD=bd, HAS_POS=pos is not None, num_warps=cfg["num_warps"])
    q = out[:n_q].view(B, T, G, dk)
    k = out[n_q:2 * n_q].view(B, T, G, dk)
    v = out[2 * n_q:2 * n_q + n_v].view(B, T, G * r, dv)
    z = out[2 * n_q + n_v:].view(B, T, G * r, dv)
    return q, k, v, z


def conv_split_bwd(qkvz: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor | None, dq, dk_, dv_, dz, dk: int,
                   dv: int, r: int, *, blocks: dict | None = None):
    """The backward kernels alone: returns (d qkvz laid out like ``qkvz``, d weight in weight's dtype).

    Two passes: the conv channels' ``dpre`` (the gradient before the SiLU, in qkvz's dtype) with the
    weight's partial gradients, then every channel's ``dx``. One pass recomputing ``dpre`` at the W
    shifted tokens in registers measured 1.4 to 2.1 ms on an H200 at the 80B widths (W^2 loads per
    element); ``blocks`` overrides :data:`BWD_BLOCKS` (tuning)."""
    qkvz = _grouped_contiguous(qkvz)
    B, T, G, C = qkvz.shape
    W = weight.shape[1]
    cc = 2 * dk + r * dv
    cfg = {**BWD_BLOCKS, **(blocks or {})}
    bd_a = min(cfg["dpre_block_d"], _block_d(dk, r * dv))
    bd_b = min(cfg["dx_block_d"], _block_d(dk, r * dv))
    bt_a, bt_b = cfg["dpre_block_t"], cfg["dx_block_t"]
    nt = -(-T // bt_a)
    grads = []
    for grad, shape in ((dq, (B, T, G, dk)), (dk_, (B, T, G, dk)), (dv_, (B, T, G * r, dv)), (dz, (B, T, G * r, dv))):
        grads.append(torch.zeros(shape, device=qkvz.device, dtype=qkvz.dtype) if grad is None else grad.contiguous())
    dx = torch.empty_like(qkvz)  # same strides as the input where it is dense (a transposed SP view stays one)
    if dx.stride(3) != 1 or dx.stride(2) != C:
        dx = torch.empty(qkvz.shape, device=qkvz.device, dtype=qkvz.dtype)
    dpre = torch.empty(B, T, G * cc, device=qkvz.device, dtype=qkvz.dtype)
    dw = torch.empty(B * nt, G * cc, W, device=qkvz.device, dtype=torch.float32)
    _, dpre_kernel, dx_kernel = _kernels()
    sxb, sxt = _strides_bt(qkvz)
    sdb, sdt = _strides_bt(dx)
    weight = weight.contiguous()
    has_pos = pos is not None
    dpre_kernel[(G * cc // bd_a, nt, B)](qkvz, weight, *grads[:3], dpre, dw, pos, T, sxb, sxt, nt, G=G, DK=dk,
                                         RDV=r * dv, W=W, BT=bt_a, BD=bd_a, HAS_POS=has_pos,
                                         num_warps=cfg["dpre_warps"])
    dx_kernel[(G * C // bd_b, -(-T // bt_b), B)](weight, dpre, grads[3], dx, pos, T, sdb, sdt, G=G, DK=dk,
                                                 RDV=r * dv, W=W, BT=bt_b, BD=bd_b, HAS_POS=has_pos,
                                                 num_warps=cfg["dx_warps"])
    return dx, dw.sum(0).to(weight.dtype)


class _ConvSplitQKVZ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkvz, weight, pos, dk, dv, r):
        q, k, v, z = conv_split_fwd(qkvz, weight, pos, dk, dv, r)
        ctx.save_for_backward(qkvz, weight, pos)
        ctx.dims = (dk, dv, r)
        return q, k, v, z

    @staticmethod
    def backward(ctx, dq, dk_, dv_, dz):
        qkvz, weight, pos = ctx.saved_tensors
        dx, dw = conv_split_bwd(qkvz, weight, pos, dq, dk_, dv_, dz, *ctx.dims)
        return dx, dw, None, None, None, None


def conv_split_qkvz(qkvz: torch.Tensor, weight: torch.Tensor, *, dk: int, dv: int, r: int,
                    cu_seqlens: torch.Tensor | None = None, backend: str | None = None):
    """Depthwise causal conv + SiLU over each group's q, k, v channels of the projection, and the split.

    Args:
        qkvz: ``[B, T, G, 2dk + 2r*dv]`` projection output (per group q, k, v, z channels); batch and token
            strides are free (a transposed ``[S, B, ...]`` view is read as it is), the last two dims must be
            contiguous together (else it is copied).
        weight: ``[G*(2dk + r*dv), W]`` conv weight, channels in the same group-major order.
        cu_seqlens: int ``[N + 1]`` boundaries of packed sequences (B must be 1).
        backend: None/"auto" (CPU: "torch"; CUDA: "triton", the fused kernels), "triton", or a
            :func:`causal_conv1d` backend ("torch", "fla", "causal_conv1d") for the unfused ops with that conv.

    Returns:
        contiguous q ``[B, T, G, dk]``, k ``[B, T, G, dk]``, v ``[B, T, G*r, dv]``, z ``[B, T, G*r, dv]`` in
        qkvz's dtype (the conv accumulates in fp32 and rounds once).
    """
    _check(qkvz, weight, dk, dv, r)
    if cu_seqlens is not None and qkvz.shape[0] != 1:
        raise ValueError(f"conv_split_qkvz: cu_seqlens needs the packed sequences flattened into batch size 1, "
                         f"got B={qkvz.shape[0]}")
    name = resolve(conv_split_backend_report(env_for(qkvz), backend, interpreted=triton_interpreted()))
    if name != "triton":
        return conv_split_qkvz_reference(qkvz, weight, dk=dk, dv=dv, r=r, cu_seqlens=cu_seqlens, conv_backend=name)
    pos = None if cu_seqlens is None else token_positions(cu_seqlens, qkvz.shape[1])
    return _ConvSplitQKVZ.apply(qkvz, weight, pos, dk, dv, r)
