"""Gated delta rule: reference, pure-torch chunked form, and the dispatcher that picks a backend.

Layout (fla): q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; states [N, HV, K, V].
Backends: "naive" (token loop), "torch" (chunked, the CPU path), "fla" (fla's Triton kernels, CUDA).
Rules in :mod:`qwen3_next_mcore.ops.backends` and docs/kernels.md.
"""

from __future__ import annotations

import torch

from ..backends import env_for, gdn_backend_report, resolve
from .chunk import chunk_gated_delta_rule
from .naive import naive_recurrent_gated_delta_rule
from .utils import l2norm

__all__ = ["chunk_gated_delta_rule", "gated_delta_rule", "l2norm", "naive_recurrent_gated_delta_rule"]


def _fla_gated_delta_rule(
    q, k, v, *, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, native_gva
):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule

    if not native_gva and v.shape[2] != q.shape[2]:  # fla < 0.5 wants one q/k head per value head
        q, k = (x.repeat_interleave(v.shape[2] // q.shape[2], dim=2) for x in (q, k))
    return fla_chunk_gated_delta_rule(
        q=q,
        k=k,
        v=v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(torch.long),
    )


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule on the best backend for the tensors' device.

    Args and returns as :func:`naive_recurrent_gated_delta_rule` (q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``,
    g, beta ``[B, T, HV]``, initial_state ``[N, HV, K, V]``, cu_seqlens ``[N + 1]`` with B == 1) plus
    ``backend``: None/"auto" (CPU -> "torch", CUDA -> "fla"), "torch", "naive" or "fla".
    Raises RuntimeError on CUDA when fla is missing or its backward is known to be wrong here (see
    :func:`qwen3_next_mcore.ops.backends.gdn_backend_report`), instead of falling back silently.
    The final state is fp32 (fp64 for fp64 inputs on the torch paths).
    """
    report = gdn_backend_report(env_for(q), backend)
    name = resolve(report)
    kwargs = {
        "g": g,
        "beta": beta,
        "scale": scale,
        "initial_state": initial_state,
        "output_final_state": output_final_state,
        "use_qk_l2norm": use_qk_l2norm,
        "cu_seqlens": cu_seqlens,
    }
    if name == "torch":
        return chunk_gated_delta_rule(q, k, v, **kwargs)
    if name == "naive":
        return naive_recurrent_gated_delta_rule(q, k, v, **kwargs)
    return _fla_gated_delta_rule(q, k, v, native_gva=report["fla_native_gva"], **kwargs)
