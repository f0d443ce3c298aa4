"""Checks and helpers shared by the gated delta rule implementations.

Layout (fla): q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; states [N, HV, K, V].
"""

from __future__ import annotations

from functools import reduce
from itertools import pairwise

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim (fla's and transformers' definition)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when the inputs are fp64: the recurrence is never run in half precision."""
    return reduce(torch.promote_types, [t.dtype for t in tensors], torch.float32)


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> list[tuple[int, int]] | None:
    """Validate shapes; return the (start, end) token span of every packed sequence, or None."""
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B={B}, T={T}, HV, V], got {tuple(v.shape)}")
    HV, V = v.shape[2:]
    if HV % H != 0:
        raise ValueError(f"value heads HV={HV} must be a multiple of key heads H={H}")
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (B, T, HV):
            raise ValueError(f"{name} must be [B, T, HV] = {(B, T, HV)}, got {tuple(x.shape)}")
    spans = None
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs the packed sequences flattened into batch size 1, got B={B}")
        bounds = [int(b) for b in cu_seqlens.tolist()]
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(a > b for a, b in pairwise(bounds)):
            raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {bounds}")
        spans = list(pairwise(bounds))
    N = B if spans is None else len(spans)
    if initial_state is not None and tuple(initial_state.shape) != (N, HV, K, V):
        raise ValueError(
            f"initial_state must be [N, HV, K, V] = {(N, HV, K, V)}, got {tuple(initial_state.shape)}"
        )
    return spans


def prepare_qk(q, k, dtype, scale, use_qk_l2norm):
    """Cast q, k to the compute dtype, optionally l2-normalise them, and scale q (default K**-0.5)."""
    q, k = q.to(dtype), k.to(dtype)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return q * (q.shape[-1] ** -0.5 if scale is None else scale), k
