"""Chunked gated delta rule in plain torch: the CPU path of the model, differentiable by autograd.

Layout (fla): q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; states [N, HV, K, V].
Inside this file chunked tensors are [B, NC, H, R, C, D]: NC chunks of C tokens, value head (h, r) reads
key head h, and q/k carry R = 1 so they broadcast over the value heads of their group (never repeated).

Unrolling the token loop over one chunk that starts from state S (G = cumulative sum of g inside the
chunk, e^G the decay since the chunk start, the WY/UT form of the delta rule):
    (I + A) U = beta V - (beta e^G K) S,      A_ij = beta_i e^(G_i - G_j) k_i.k_j  for j < i
    O  = (e^G Q) S + P U,                     P_ij = e^(G_i - G_j) q_i.k_j        for j <= i
    S' = e^(G_last) S + (e^(G_last - G) K)^T U
so with W = (I + A)^-1 (beta e^G K) and U0 = (I + A)^-1 (beta V), U = U0 - W S. Everything but the
S -> S' recurrence across chunks is computed for all chunks at once; that recurrence is the only loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils import check_inputs, compute_dtype, prepare_qk


def _pad_time(x: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if pad else x


def _packing_index(spans: list[tuple[int, int]], C: int, T: int, device):
    """Lay packed sequences out so each starts on a chunk boundary, with zero tokens in the gaps (beta = 0
    and k = 0 leave the state untouched, g = 0 does not decay it).

    Returns the source row of every laid-out token (T: the appended zero row), the laid-out position of
    every real token, and the first chunk of each sequence (N + 1 bounds).
    """
    src, dst, first_chunk = [], [], [0]
    for bos, eos in spans:
        n_chunks = -(-(eos - bos) // C)
        offset = first_chunk[-1] * C
        src += [*range(bos, eos), *[T] * (n_chunks * C - (eos - bos))]
        dst += range(offset, offset + eos - bos)
        first_chunk.append(first_chunk[-1] + n_chunks)
    src, dst = (torch.tensor(xs, dtype=torch.long, device=device) for xs in (src, dst))
    return src, dst, first_chunk


def _gather_tokens(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    zero = x.new_zeros(x.shape[0], 1, *x.shape[2:])
    return torch.cat([x, zero], 1)[:, src]


def _chunk_terms(q, k, v, g, beta):
    """Per-chunk terms for all chunks at once (shapes in the module docstring)."""
    C = g.shape[-1]
    G = g.cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    # e^(G_i - G_j) for j <= i; masked before exp so nothing overflows above the diagonal
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    A = beta[..., None] * (k @ k.transpose(-1, -2)) * decay  # diagonal ignored: (I + A) is unit lower
    rhs = torch.cat([(beta * G.exp())[..., None] * k, beta[..., None] * v], -1)
    W, U0 = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split(
        [k.shape[-1], v.shape[-1]], -1
    )
    P = (q @ k.transpose(-1, -2)) * decay
    Qg = q * G.exp()[..., None]
    Kd = k * (G[..., -1:] - G).exp()[..., None]
    return W, U0, P, Qg, Kd, G[..., -1].exp()[..., None, None]


def _scan(W, U0, Kd, chunk_decay, segments):
    """The recurrence across chunks. segments: (first chunk, end chunk, state entering the first chunk)
    for each run of chunks that belongs to one sequence. Returns the states entering each chunk, U, and
    the state after each segment."""
    NC = W.shape[1]
    entering, us, finals = [None] * NC, [None] * NC, []
    for c0, c1, S in segments:
        for c in range(c0, c1):
            entering[c] = S
            us[c] = U0[:, c] - W[:, c] @ S
            S = chunk_decay[:, c] * S + Kd[:, c].transpose(-1, -2) @ us[c]
        finals.append(S)
    return torch.stack(entering, 1), torch.stack(us, 1), torch.cat(finals, 0)


def chunk_gated_delta_rule(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule by chunks (WY/UT form), plain torch ops, so autograd reaches every input.

    Same contract as :func:`naive_recurrent_gated_delta_rule`: q, k ``[B, T, H, K]``; v ``[B, T, HV, V]``
    (HV % H == 0); g, beta ``[B, T, HV]``; initial_state ``[N, HV, K, V]``; cu_seqlens ``[N + 1]`` with B == 1.
    Any T (padded internally to ``chunk_size`` multiples). Returns ``o [B, T, HV, V]`` in v.dtype and the
    final state ``[N, HV, K, V]`` in the compute dtype (fp32, fp64 for fp64 inputs) or None.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    spans = check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    R, C = HV // H, chunk_size
    out_dtype, dtype = v.dtype, compute_dtype(q, k, v)
    q, k = prepare_qk(q, k, dtype, scale, use_qk_l2norm)
    v, g, beta = (x.to(dtype) for x in (v, g, beta))
    N = B if spans is None else len(spans)
    h0 = q.new_zeros(N, HV, K, V) if initial_state is None else initial_state.to(dtype)
    h0 = h0.reshape(N, H, R, K, V)

    if spans is None:
        pad = -T % C
        q, k, v, g, beta = (_pad_time(x, pad) for x in (q, k, v, g, beta))
        NC, dst = (T + pad) // C, None
        segments = [(0, NC, h0)]
    else:
        src, dst, first_chunk = _packing_index(spans, C, T, q.device)
        q, k, v, g, beta = (_gather_tokens(x, src) for x in (q, k, v, g, beta))
        NC = first_chunk[-1]
        segments = [(first_chunk[n], first_chunk[n + 1], h0[n : n + 1]) for n in range(N)]
    if NC == 0:  # no tokens at all
        final = h0.reshape(N, HV, K, V) if output_final_state else None
        return v.new_zeros(B, T, HV, V).to(out_dtype), final

    Bc = q.shape[0]
    q, k = (x.reshape(Bc, NC, C, H, 1, K).permute(0, 1, 3, 4, 2, 5) for x in (q, k))
    v = v.reshape(Bc, NC, C, H, R, V).permute(0, 1, 3, 4, 2, 5)
    g, beta = (x.reshape(Bc, NC, C, H, R).permute(0, 1, 3, 4, 2) for x in (g, beta))

    W, U0, P, Qg, Kd, chunk_decay = _chunk_terms(q, k, v, g, beta)
    entering, U, final = _scan(W, U0, Kd, chunk_decay, segments)
    o = Qg @ entering + P @ U  # [Bc, NC, H, R, C, V]
    o = o.permute(0, 1, 4, 2, 3, 5).reshape(Bc, NC * C, HV, V)
    o = o[:, :T] if dst is None else o[:, dst]
    return o.to(out_dtype), (final.reshape(N, HV, K, V) if output_final_state else None)
