"""Partial rotary position embedding (spec section 3.3: the first ``rot`` of each head's dims rotate,
the rest pass through), in megatron-core's layouts, as one fused op.

megatron-core applies RoPE without Transformer Engine as a chain of slices, ``cos``/``sin``, multiplies,
a ``cat`` for the rotated half and a ``cat`` with the pass-through dims, each a pass over q or k (about
1.3 ms per attention layer forward+backward at 16k tokens on an H100); for packed sequences it loops over
the sequences with two host synchronisations. :func:`partial_rotary` computes the same rotation in fp32
and rounds once to the input dtype; on CUDA it runs as ``torch.compile`` of that function (one kernel
each way), the packed positions are found on the device. :func:`apply_rotary_pos_emb` has megatron-core's
signature and is what its attention calls once :func:`use_fused_partial_rotary` is installed.
"""

from __future__ import annotations

import logging

import torch

from .backends import compiled_op_backend, compiled_or_eager, env_for, log_once

log = logging.getLogger(__name__)


def _rotate(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    rot = freqs.shape[-1]
    dtype = torch.promote_types(t.dtype, torch.float32)
    x, passthrough = t[..., :rot].to(dtype), t[..., rot:]
    cos, sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos[..., : rot // 2] - x2 * sin[..., : rot // 2],
                         x2 * cos[..., rot // 2:] + x1 * sin[..., rot // 2:]), dim=-1)
    return torch.cat((rotated.to(t.dtype), passthrough), dim=-1)


def partial_rotary(t: torch.Tensor, freqs: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Rotate the first ``freqs.shape[-1]`` dims of ``t``'s last axis (non-interleaved halves, as HF and
    megatron-core's default), leave the rest.

    t: ``[s, b, h, d]`` (or any shape whose leading dims broadcast against ``freqs``), any float dtype;
    freqs: ``[s, 1, 1, rot]`` angles (fp32), rot even and <= d. Returns ``t``'s shape and dtype, computed
    in fp32 (fp64 for fp64) and rounded once. backend: None/"auto" (CPU -> "torch", CUDA -> "compile"),
    "torch" or "compile"."""
    rot = freqs.shape[-1]
    if rot % 2 or rot > t.shape[-1]:
        raise ValueError(f"partial_rotary: rotary dims {rot} must be even and at most the head dim {t.shape[-1]}")
    return compiled_or_eager(_rotate, compiled_op_backend("partial_rotary", env_for(t), backend))(t, freqs)


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every token within its own sequence, ``[total]`` int64 on cu_seqlens' device, for packed
    sequences with boundaries ``cu_seqlens`` ``[n + 1]`` (0, ..., total); no host synchronisation."""
    tokens = torch.arange(total, device=cu_seqlens.device)
    starts = cu_seqlens[:-1].to(torch.int64)
    which = torch.searchsorted(cu_seqlens[1:].to(torch.int64), tokens, right=True)
    return tokens - starts[which.clamp_max(starts.numel() - 1)]


def partial_rotary_packed(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor, *,
                          backend: str | None = None) -> torch.Tensor:
    """:func:`partial_rotary` for packed sequences, megatron-core's ``thd`` semantics at one
    context-parallel rank: t ``[T, h, d]``; freqs ``[T, 1, 1, rot]`` (angles of every packed position:
    used as they are) or ``[max_s, 1, 1, rot]`` (angles by position, which restarts at 0 in every sequence
    of ``cu_seqlens``)."""
    if freqs.shape[0] != t.shape[0]:
        freqs = freqs[packed_positions(cu_seqlens, t.shape[0])]
    return partial_rotary(t.unsqueeze(1), freqs, backend=backend).squeeze(1)


def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale: float = 1.0, cp_group=None,
                         mla_rotary_interleaved: bool = False):
    """megatron-core's ``apply_rotary_pos_emb`` (same arguments): ours for what Qwen3-Next uses (halves
    not interleaved, mscale 1, no context parallelism, no TE fusion asked for), megatron-core's own for
    everything else (logged once per reason)."""
    from megatron.core.models.common.embeddings import rope_utils

    cp = cp_group.size() if cp_group is not None else 1
    reason = ("TE's fused RoPE asked for" if config.apply_rope_fusion else
              "interleaved rotary" if config.rotary_interleaved or mla_rotary_interleaved else
              f"mscale {mscale}" if mscale != 1.0 else
              f"context parallel {cp}" if cp > 1 else None)
    if reason is not None:
        log_once(log, ("rotary embedding", reason), "rotary embedding: megatron-core's (%s)", reason)
        return rope_utils.apply_rotary_pos_emb(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale,
                                               cp_group=cp_group, mla_rotary_interleaved=mla_rotary_interleaved)
    if cu_seqlens is None:
        return partial_rotary(t, freqs)
    return partial_rotary_packed(t, cu_seqlens, freqs)


def use_fused_partial_rotary() -> bool:
    """Make megatron-core's attention call :func:`apply_rotary_pos_emb` (idempotent; where its RoPE runs
    through Transformer Engine, ``config.apply_rope_fusion``, that still decides). Returns True if it was
    installed by this call."""
    from megatron.core.transformer import attention

    if attention.apply_rotary_pos_emb is apply_rotary_pos_emb:
        return False
    attention.apply_rotary_pos_emb = apply_rotary_pos_emb
    log.info("rotary embedding: ours (ops/rope.py) in megatron-core's attention")
    return True
