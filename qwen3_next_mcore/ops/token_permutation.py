"""Token permutation of a dropless top-k MoE: group the token copies by expert, and combine them back.

The contract of megatron-core's ``permute``/``unpermute`` (``moe_utils``, without Transformer Engine):
rows sorted by expert, within an expert by token; the combine sums each token's copies. Why our own:

- the order comes from a stable sort of the T*k routed (token, expert) pairs, where megatron-core
  argsorts all T*E entries of the routing map (8.4M for 16k tokens and 512 experts);
- every token has exactly k copies (dropless routing), so the backward of the gather and the forward
  of the combine sum each token's k rows instead of ``index_add``/``scatter_add`` with atomics (on an
  H100, 16k tokens x top-10 x 2048 bf16: a gather then a sum 0.80 ms vs the bf16 ``scatter_add``
  1.37 ms, and the gather's backward 0.8 ms vs ``index_add`` 2.9 ms); :func:`sum_copies` does the gather
  and the sum in one kernel: on CUDA ``torch.compile`` of the k gathered rows added in turn (one
  elementwise kernel; CUDA's ``embedding_bag``, which it replaces, took 0.5 ms a call for 8k tokens x 10
  x 2048 bf16 on an H100, a fifth of the memory bandwidth, 4 ms per proxy training step), on CPU one
  ``embedding_bag``. The sum accumulates in fp32 and rounds once, where CUDA's bf16 ``scatter_add``
  rounds after every add.

Padded layout (``capacity``): each expert's rows start at ``e * capacity`` and the rows past its count are
zeros, an ``[E, capacity, H]`` tensor seen as ``[E * capacity, H]``, so the experts can run batched GEMMs
(``torch.bmm``) instead of a grouped GEMM (see ``layers/grouped_experts.py``). The gathers read a zero row
appended to their source for the padding rows; the sums read only the real rows.

References: megatron-core's functions and :func:`sum_copies_reference`;
``tests/ops/test_token_permutation.py`` compares them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backends import compiled_op_backend, compiled_or_eager, env_for


@dataclass(frozen=True)
class Permutation:
    """Where each token's copies went: ``sorted_tokens`` [rows] (the token of each permuted row, the
    same as megatron-core's ``sorted_indices``) and ``slot_rows`` [T, k] (each token's k permuted rows).
    ``capacity`` None: T*k rows grouped by expert; else the padded layout of E * capacity rows, where
    ``sorted_tokens`` holds T (one past the last token: a zero row) at the padding rows."""

    sorted_tokens: torch.Tensor
    slot_rows: torch.Tensor
    capacity: int | None = None


def sort_by_expert(routing_map: torch.Tensor, topk: int) -> tuple[Permutation, torch.Tensor]:
    """routing_map [T, E] bool with exactly ``topk`` True per row -> (Permutation, flat [T*k] int64:
    the routing-map entry ``t * E + e`` of each permuted row, to pick the routing probabilities)."""
    if routing_map.dim() != 2 or routing_map.dtype != torch.bool:
        raise ValueError(f"routing_map must be a [tokens, experts] bool tensor, got {routing_map.dtype} "
                         f"{tuple(routing_map.shape)}")
    T, E = routing_map.shape
    n = T * topk
    # routed entries in row-major order (token-major, experts ascending); static size: no host sync
    flat = torch.nonzero_static(routing_map.reshape(-1), size=n).squeeze(1)
    expert = flat % E
    order = torch.sort(expert, stable=True).indices  # expert-major, tokens ascending within an expert
    flat = flat.index_select(0, order)
    slot_rows = torch.empty_like(order)
    slot_rows[order] = torch.arange(n, device=order.device)
    return Permutation(flat // E, slot_rows.view(T, topk)), flat


def pad_by_expert(perm: Permutation, flat: torch.Tensor, tokens_per_expert: torch.Tensor, capacity: int
                  ) -> tuple[Permutation, torch.Tensor]:
    """The padded layout of :func:`sort_by_expert`'s result: expert e's i-th row moves to row
    ``e * capacity + i``. tokens_per_expert [E] (device; ``capacity`` >= its largest entry, the caller's
    promise) -> (Permutation with ``capacity``, flat [E * capacity]: the routing-map entry of each row,
    ``T * E`` (one past the last entry) at the padding rows)."""
    T, _ = perm.slot_rows.shape
    E = tokens_per_expert.numel()
    n = perm.sorted_tokens.numel()
    counts = tokens_per_expert.to(device=flat.device, dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    expert = torch.repeat_interleave(torch.arange(E, device=flat.device), counts, output_size=n)
    rows = torch.arange(n, device=flat.device) + expert * capacity - starts.index_select(0, expert)
    sorted_tokens = torch.full((E * capacity,), T, dtype=perm.sorted_tokens.dtype, device=flat.device)
    sorted_tokens[rows] = perm.sorted_tokens
    padded_flat = torch.full((E * capacity,), T * E, dtype=flat.dtype, device=flat.device)
    padded_flat[rows] = flat
    slot_rows = rows.index_select(0, perm.slot_rows.reshape(-1)).view_as(perm.slot_rows)
    return Permutation(sorted_tokens, slot_rows, capacity), padded_flat


def _with_zero_row(x: torch.Tensor) -> torch.Tensor:
    """x [n, ...] (1-d too) -> [n + 1, ...], the last row zeros (what the padded layout's padding rows gather)."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])])


def sum_copies(rows: torch.Tensor, slot_rows: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """rows [T*k, H], slot_rows [T, k] int64 -> [T, H]: each token's k rows summed, in rows.dtype (fp32
    accumulation, one rounding).

    backend None/"auto": "compile" on CUDA (``torch.compile`` of the k gathered rows added in turn: one
    elementwise kernel, no [T, k, H] intermediate), "torch" on CPU: one ``embedding_bag`` (mode
    "sum", fixed bags of k; on a 2-core CPU, 4096 tokens x 10 x 512 bf16: 2.0 ms vs 17.3 ms for the
    eager reference). Both equal the reference up to summation order (tests/ops/test_token_permutation.py)."""
    if compiled_op_backend("sum_copies", env_for(rows), backend) == "compile":
        return compiled_or_eager(_sum_gathered_rows, "compile")(rows, slot_rows)
    return F.embedding_bag(slot_rows, rows.contiguous(), mode="sum")


def _sum_gathered_rows(rows: torch.Tensor, slot_rows: torch.Tensor) -> torch.Tensor:
    """The k gathered rows added one after another in fp32 (or fp64), rounded once: compiled, one
    elementwise kernel with k row loads per output element, each coalesced along the hidden dim. (The
    compiled gather-then-``sum(1)`` was a reduction over k with the k rows across a warp's lanes: 0.64 ms
    a call at 8k tokens x 10 x 2048 bf16 on an H100, slower than ``embedding_bag``.)"""
    acc_dtype = torch.promote_types(rows.dtype, torch.float32)
    acc = rows.index_select(0, slot_rows[:, 0]).to(acc_dtype)
    for j in range(1, slot_rows.shape[1]):
        acc = acc + rows.index_select(0, slot_rows[:, j]).to(acc_dtype)
    return acc.to(rows.dtype)


def sum_copies_reference(rows: torch.Tensor, slot_rows: torch.Tensor) -> torch.Tensor:
    """:func:`sum_copies` as a gather then a sum over k (fp32 accumulation, one rounding)."""
    T, k = slot_rows.shape
    return rows.index_select(0, slot_rows.reshape(-1)).view(T, k, rows.shape[-1]).sum(1)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, sorted_tokens, slot_rows, padded):
        ctx.save_for_backward(slot_rows)
        return (_with_zero_row(tokens) if padded else tokens).index_select(0, sorted_tokens)

    @staticmethod
    def backward(ctx, grad):
        (slot_rows,) = ctx.saved_tensors
        return sum_copies(grad, slot_rows), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, sorted_tokens, slot_rows, padded):
        ctx.save_for_backward(sorted_tokens)
        ctx.padded = padded
        return sum_copies(rows, slot_rows)

    @staticmethod
    def backward(ctx, grad):
        (sorted_tokens,) = ctx.saved_tensors  # the padding rows get zeros: the experts' backward reads them
        return (_with_zero_row(grad) if ctx.padded else grad).index_select(0, sorted_tokens), None, None, None


def permute_tokens(tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor | None, topk: int,
                   *, capacity: int | None = None, tokens_per_expert: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, Permutation]:
    """tokens [T, H], routing_map [T, E] bool (``topk`` per row), probs [T, E] or None ->
    (rows [T*k, H] grouped by expert, their probabilities [T*k] or None, the Permutation).
    With ``capacity`` (and ``tokens_per_expert`` [E], the routing map's column sums): the padded layout,
    rows [E * capacity, H] and probabilities [E * capacity], zeros at the padding rows."""
    perm, flat = sort_by_expert(routing_map, topk)
    if capacity is not None:
        if tokens_per_expert is None:
            raise ValueError("permute_tokens: the padded layout (capacity) needs tokens_per_expert")
        perm, flat = pad_by_expert(perm, flat, tokens_per_expert, capacity)
    padded = capacity is not None
    rows = _Permute.apply(tokens, perm.sorted_tokens, perm.slot_rows, padded)
    row_probs = None
    if probs is not None:
        flat_probs = probs.reshape(-1)
        row_probs = (_with_zero_row(flat_probs) if padded else flat_probs).index_select(0, flat)
    return rows, row_probs, perm


def unpermute_tokens(rows: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """rows [T*k, H] (or [E * capacity, H]) in the order of ``perm`` -> [T, H], each token's k rows summed."""
    return _Combine.apply(rows, perm.sorted_tokens, perm.slot_rows, perm.capacity is not None)
