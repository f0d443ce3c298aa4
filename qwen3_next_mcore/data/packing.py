"""Sequence packing for SFT: several samples per fixed-length row, with the boundaries Qwen3-Next needs.

A *sample* is ``(tokens, labels)``, two int64 arrays of one length ``n``; ``labels[t]`` is the target
after ``tokens[t]`` (already shifted) or ``IGNORE_INDEX``. :func:`build_item` lays samples out in one row
of ``seq_length`` tokens and returns (all torch tensors, ``L = seq_length``):

- ``tokens`` int64 [L]: the samples back to back, then the pad id.
- ``labels`` int64 [L]: the samples' labels; ``IGNORE_INDEX`` (-100) on padding and on the last token of
  every sample, so no target ever crosses into the next sample.
- ``loss_mask`` float32 [L]: 1.0 where ``labels != IGNORE_INDEX``.
- ``loss_weight`` float32 [L]: ``loss_mask`` (``loss_average="token"``), or ``loss_mask`` divided by its
  sum within each sample (``"sample"``: every sample's weights add up to 1).
- ``position_ids`` int64 [L]: 0, 1, ... restarting at every sample and at the padding.
- ``cu_seqlens`` int32 [L + 1]: segment boundaries 0, n1, n1+n2, ..., then ``L`` when the row ends in
  padding (the padding is its own last segment, so the last valid value is always ``L``, as the GDN
  and THD attention kernels require); filled up to the fixed size with ``L`` so rows batch together.
- ``cu_seqlens_len`` int64 []: how many ``cu_seqlens`` entries are valid (segments + 1).
- ``max_seqlen`` int64 []: the longest segment.
- ``num_seqs`` int64 []: samples in the row (padding not counted).

Packing matters for Gated DeltaNet: its recurrent state runs across the whole row unless
``cu_seqlens`` resets it at every sample, so packed rows must go to the model with
:func:`to_packed_seq_params`.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping, Sequence

import numpy as np

IGNORE_INDEX = -100
Sample = tuple[np.ndarray, np.ndarray]
PACK_STRATEGIES = ("best_fit", "sequential")
LOSS_AVERAGES = ("token", "sample")


def pack_sequential(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Samples in input order, a new row whenever the next one does not fit (Pai-Megatron-Patch's rule)."""
    rows: list[list[int]] = []
    used = capacity
    for i, n in enumerate(lengths):
        _check_fits(i, n, capacity)
        if used + n > capacity:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the fullest row that still has room. Deterministic.

    Rows list their samples in input order and are ordered by their first sample.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row id), sorted
    for i in order:
        n = lengths[i]
        _check_fits(i, n, capacity)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return sorted((sorted(r) for r in rows), key=lambda r: r[0])


def pack(lengths: Sequence[int], capacity: int, strategy: str = "best_fit") -> list[list[int]]:
    """Sample indices grouped into rows of at most ``capacity`` tokens (``strategy``: PACK_STRATEGIES)."""
    if strategy == "best_fit":
        return pack_best_fit(lengths, capacity)
    if strategy == "sequential":
        return pack_sequential(lengths, capacity)
    raise ValueError(f"pack strategy must be one of {PACK_STRATEGIES}, got {strategy!r}")


def _check_fits(i: int, n: int, capacity: int) -> None:
    if not 0 < n <= capacity:
        raise ValueError(f"sample {i} has {n} tokens; packing needs 1..{capacity}")


def build_item(samples: Sequence[Sample], seq_length: int, pad_id: int, loss_average: str = "token") -> dict:
    """One row of ``seq_length`` tokens from ``samples`` (see the module docstring for the fields)."""
    import torch

    if loss_average not in LOSS_AVERAGES:
        raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {loss_average!r}")
    L = seq_length
    tokens = np.full(L, pad_id, dtype=np.int64)
    labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
    positions = np.empty(L, dtype=np.int64)
    bounds = [0]
    for t, lab in samples:
        start, n = bounds[-1], len(t)
        if n == 0 or start + n > L:
            raise ValueError(f"samples of {[len(s[0]) for s in samples]} tokens do not fit in {L}")
        tokens[start : start + n] = t
        labels[start : start + n] = lab
        labels[start + n - 1] = IGNORE_INDEX  # no target into the next sample
        positions[start : start + n] = np.arange(n)
        bounds.append(start + n)
    num_seqs = len(bounds) - 1
    if bounds[-1] < L:  # the padding: one more segment
        positions[bounds[-1] :] = np.arange(L - bounds[-1])
        bounds.append(L)
    loss_mask = (labels != IGNORE_INDEX).astype(np.float32)
    loss_weight = loss_mask.copy()
    if loss_average == "sample":
        for s, e in itertools.pairwise(bounds[: num_seqs + 1]):
            total = loss_mask[s:e].sum()
            if total > 0:
                loss_weight[s:e] /= total
    cu = np.full(L + 1, L, dtype=np.int32)
    cu[: len(bounds)] = bounds
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "loss_weight": torch.from_numpy(loss_weight),
        "position_ids": torch.from_numpy(positions),
        "cu_seqlens": torch.from_numpy(cu),
        "cu_seqlens_len": torch.tensor(len(bounds), dtype=torch.int64),
        "max_seqlen": torch.tensor(int(np.diff(bounds).max()), dtype=torch.int64),
        "num_seqs": torch.tensor(num_seqs, dtype=torch.int64),
    }


def to_packed_seq_params(batch: Mapping):
    """megatron-core ``PackedSeqParams`` (``qkv_format="thd"``) for a collated micro-batch of items.

    ``batch`` holds ``cu_seqlens`` [B, L+1] (or [L+1]) and ``cu_seqlens_len`` [B]; the rows are taken as
    one stream of ``B * L`` tokens, so feed the model ``tokens``/``position_ids``/``labels``/``loss_mask``
    reshaped to ``[1, B * L]``. ``cu_seqlens_q == cu_seqlens_kv`` (int32, on the batch's device) end at
    ``B * L``; ``max_seqlen_q/kv`` are Python ints.
    """
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, lens = batch["cu_seqlens"], batch["cu_seqlens_len"]
    if cu.dim() == 1:
        cu, lens = cu.unsqueeze(0), lens.reshape(1)
    row_len = int(cu[0, -1])  # the fixed tail value is L
    parts = [cu[0, : int(lens[0])]]
    for b in range(1, cu.shape[0]):
        parts.append(cu[b, 1 : int(lens[b])] + b * row_len)
    cu_flat = torch.cat(parts).to(torch.int32)
    max_seqlen = int((cu_flat[1:] - cu_flat[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_flat,
        cu_seqlens_kv=cu_flat,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )
