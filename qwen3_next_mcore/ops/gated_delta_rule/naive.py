"""Reference gated delta rule: the plain token loop of the spec (section 3.4, steps 4-5).

Layout (fla): q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; states [N, HV, K, V].
Slow on purpose: every fast implementation is tested against this one.
"""

from __future__ import annotations

import torch

from .utils import check_inputs, compute_dtype, prepare_qk


def _token_loop(q, k, v, g, beta, state):
    """One batch of sequences. q, k [B, T, H, K]; v [B, T, H, R, V]; g, beta [B, T, H, R];
    state [B, H, R, K, V]. Value head (h, r) reads key head h."""
    outputs = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None]  # decay first
        predicted = torch.einsum("bhk,bhrkv->bhrv", k[:, t], state)
        u = beta[:, t, ..., None] * (v[:, t] - predicted)  # delta-rule error against the decayed state
        state = state + k[:, t, :, None, :, None] * u[..., None, :]
        outputs.append(torch.einsum("bhk,bhrkv->bhrv", q[:, t], state))  # read after the write
    return (torch.stack(outputs, 1) if outputs else v.new_zeros(v.shape)), state


def naive_recurrent_gated_delta_rule(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, one token at a time.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]`` with HV % H == 0 (value head h uses key head h // (HV/H)).
        g: log decay ``[B, T, HV]`` (<= 0); beta: write strength ``[B, T, HV]`` in (0, 1).
        scale: query scale, default ``K ** -0.5`` (applied after the optional l2norm).
        initial_state: ``[N, HV, K, V]``, N = B, or the number of sequences with ``cu_seqlens``.
        use_qk_l2norm: l2-normalise q and k per head (``x / sqrt(sum(x^2) + 1e-6)``).
        cu_seqlens: int ``[N + 1]`` boundaries of packed sequences (B must be 1); the state restarts at each.

    Returns:
        ``o [B, T, HV, V]`` in v.dtype, and the final state ``[N, HV, K, V]`` (fp32, fp64 for fp64 inputs)
        when ``output_final_state``, else None. Computed in fp32 (fp64 for fp64 inputs).
    """
    spans = check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    R = HV // H
    out_dtype, dtype = v.dtype, compute_dtype(q, k, v)
    q, k = prepare_qk(q, k, dtype, scale, use_qk_l2norm)
    v = v.to(dtype).reshape(B, T, H, R, V)
    g, beta = (x.to(dtype).reshape(B, T, H, R) for x in (g, beta))
    if initial_state is None:
        initial_state = q.new_zeros(B if spans is None else len(spans), HV, K, V)
    h0 = initial_state.to(dtype).reshape(-1, H, R, K, V)

    if spans is None:
        o, final = _token_loop(q, k, v, g, beta, h0)
    else:  # each packed sequence on its own, from its own initial state
        outs, finals = [], []
        for n, (bos, eos) in enumerate(spans):
            o_n, s_n = _token_loop(*(x[:, bos:eos] for x in (q, k, v, g, beta)), h0[n : n + 1])
            outs.append(o_n)
            finals.append(s_n)
        o, final = torch.cat(outs, 1), torch.cat(finals, 0)
    o = o.reshape(B, T, HV, V).to(out_dtype)
    return o, (final.reshape(-1, HV, K, V) if output_final_state else None)
