"""Gated delta rule: reference, pure-torch chunked form, and the dispatcher that picks a backend.

Layout (fla): q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; states [N, HV, K, V].
Backends: "naive" (token loop), "torch" (chunked, the CPU path), "fla" (fla's Triton kernels, CUDA).
Rules in :mod:`qwen3_next_mcore.ops.backends` and docs/kernels.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from packaging.version import Version

from ..backends import env_for, gdn_backend_report, resolve
from .chunk import chunk_gated_delta_rule
from .naive import naive_recurrent_gated_delta_rule
from .utils import l2norm

__all__ = ["chunk_gated_delta_rule", "gated_delta_rule", "gdn_gate", "l2norm",
           "naive_recurrent_gated_delta_rule"]

# first fla whose chunk kernel takes the raw gate (use_gate_in_kernel with A_log/dt_bias) and raw beta
FLA_MIN_FUSED_GATE = Version("0.6.0")


def gdn_gate(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Qwen3-Next's decay ``g = -exp(A_log) * softplus(a + dt_bias)``: a ``[B, T, HV]`` (any float dtype),
    A_log/dt_bias ``[HV]`` -> g ``[B, T, HV]`` float32 (log-space decay, spec 3.4)."""
    x = a.float() if dt_bias is None else a.float() + dt_bias.float()
    return -A_log.float().exp() * F.softplus(x)


def _fla_gated_delta_rule(
    q, k, v, *, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, native_gva,
    gate_kwargs=None,
):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule

    if not native_gva and v.shape[2] != q.shape[2]:  # fla < 0.5 wants one q/k head per value head
        q, k = (x.repeat_interleave(v.shape[2] // q.shape[2], dim=2) for x in (q, k))
    return fla_chunk_gated_delta_rule(
        **(gate_kwargs or {}),
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
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    beta_is_logit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule on the best backend for the tensors' device.

    Args and returns as :func:`naive_recurrent_gated_delta_rule` (q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``,
    g, beta ``[B, T, HV]``, initial_state ``[N, HV, K, V]``, cu_seqlens ``[N + 1]`` with B == 1) plus
    ``backend``: None/"auto" (CPU -> "torch", CUDA -> "fla"), "torch", "naive" or "fla".
    Raises RuntimeError on CUDA when fla is missing or its backward is known to be wrong here (see
    :func:`qwen3_next_mcore.ops.backends.gdn_backend_report`), instead of falling back silently.
    The final state is fp32 (fp64 for fp64 inputs on the torch paths).

    Gating in the kernel: with ``A_log`` (and optionally ``dt_bias``), ``g`` is the raw gate input ``a``
    and the decay is :func:`gdn_gate` of it; with ``beta_is_logit``, ``beta`` is the raw ``b`` and the
    kernel applies the sigmoid. fla >= 0.6 fuses both into its chunk kernels (one elementwise pass
    fewer each way); the torch paths, and older fla, compute them first in torch.
    """
    report = gdn_backend_report(env_for(q), backend)
    name = resolve(report)
    fused = name == "fla" and Version(report["fla"]) >= FLA_MIN_FUSED_GATE
    gate_kwargs = {}
    if A_log is not None:
        if fused:
            gate_kwargs.update(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias)
        else:
            g = gdn_gate(g, A_log, dt_bias)
    if beta_is_logit:
        if fused:
            gate_kwargs["use_beta_sigmoid_in_kernel"] = True
        else:
            beta = beta.sigmoid()
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
    return _fla_gated_delta_rule(q, k, v, native_gva=report["fla_native_gva"], gate_kwargs=gate_kwargs,
                                 **kwargs)
