"""idxmap SFT files: Pai-Megatron-Patch's pre-tokenised SFT record format, written and read back.

A file is a megatron-core ``.bin/.idx`` pair (int32) holding one record per Megatron document (one
sequence of ``2 * L`` values, ``L = seq_length``):

- ``record[:L]`` inputs: the samples' tokens back to back; the last token ``t`` of every sample is stored
  as ``-1 - t`` (a negative boundary mark, so id 0 can be marked too); then padding (the pad id).
- ``record[L:]`` labels, already shifted: ``labels[j]`` is the target after input ``j``; -100 where no
  loss (prompt, padding, the last token of each sample).

Without packing a record holds one sample; with packing several. Reading a record back restores the
tokens (``-1 - t`` -> ``t``), splits the samples at the marks and lays them out with
:func:`~.packing.build_item`, so items equal those of the raw JSON path for the same rows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_bin_idx, dataset_prefix
from .packing import IGNORE_INDEX, LOSS_AVERAGES, Sample, build_item
from .sft import SFTStats, encode_sft_file, group_samples
from .tokenizer import check_vocab, default_tokenizer_dir, load_tokenizer, pad_id

log = logging.getLogger(__name__)


def encode_record(samples: list[Sample], seq_length: int, pad: int) -> np.ndarray:
    """One int32 record of ``2 * seq_length`` values from samples that fit in ``seq_length`` tokens."""
    L = seq_length
    inputs = np.full(L, pad, dtype=np.int64)
    labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
    pos = 0
    for tokens, lab in samples:
        n = len(tokens)
        if n == 0 or pos + n > L:
            raise ValueError(f"samples of {[len(s[0]) for s in samples]} tokens do not fit in {L}")
        inputs[pos : pos + n] = tokens
        inputs[pos + n - 1] = -1 - tokens[-1]
        labels[pos : pos + n] = lab
        labels[pos + n - 1] = IGNORE_INDEX
        pos += n
    return np.concatenate([inputs, labels]).astype(np.int32)


def decode_record(record: np.ndarray, seq_length: int, where: str = "record") -> list[Sample]:
    """The samples of one record (int64 ``tokens`` with marks removed, and their ``labels``)."""
    L = seq_length
    inputs = np.asarray(record[:L], dtype=np.int64)
    labels = np.asarray(record[L:], dtype=np.int64)
    ends = np.flatnonzero(inputs < 0) + 1
    if len(ends) == 0:
        raise ValueError(f"{where}: no sample boundary (no negative input token): not an idxmap SFT record")
    if (labels[ends[-1] :] != IGNORE_INDEX).any():
        raise ValueError(f"{where}: labels after the last sample boundary are not all {IGNORE_INDEX}")
    tokens = np.where(inputs < 0, -1 - inputs, inputs)
    starts = np.concatenate([[0], ends[:-1]])
    return [(tokens[s:e], labels[s:e]) for s, e in zip(starts, ends)]


@dataclass(frozen=True)
class SFTReport:
    """What :func:`preprocess_sft` wrote: ``prefix`` + ``.bin``/``.idx``, its counts and time."""

    prefix: str
    stats: SFTStats
    seq_length: int
    packing: bool
    seconds: float


def preprocess_sft(
    input_path: str | Path,
    output_prefix: str | Path,
    *,
    seq_length: int,
    tokenizer=None,
    packing: bool = False,
    overflow: str = "truncate",
    pack_strategy: str = "best_fit",
    chat_template: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
    vocab_size: int | None = None,
) -> SFTReport:
    """Encode a JSON/JSONL SFT file into ``{output_prefix}_text_document.bin/.idx`` idxmap records.

    Options as in :class:`~.sft.RawSFTDataset`; ``tokenizer`` defaults to :func:`default_tokenizer_dir`.
    Nothing is left at the output names unless the whole run succeeds.
    """
    start = time.perf_counter()
    tok = load_tokenizer(
        tokenizer if tokenizer is not None else default_tokenizer_dir(), chat_template=chat_template
    )
    if vocab_size is not None:
        check_vocab(tok, vocab_size)
    samples, stats = encode_sft_file(
        input_path, tok, seq_length, overflow=overflow, template_kwargs=template_kwargs
    )
    groups = group_samples(samples, seq_length, packing, pack_strategy)
    pad = pad_id(tok)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = dataset_prefix(output_prefix, "text")
    with atomic_bin_idx(prefix) as (tmp_bin, tmp_idx):
        # int32 whatever the vocabulary: the boundary marks and -100 labels are negative
        builder = IndexedDatasetBuilder(tmp_bin, dtype=np.int32)
        try:
            for group in groups:
                builder.add_document(
                    encode_record([samples[i] for i in group], seq_length, pad), [2 * seq_length]
                )
            builder.finalize(tmp_idx)
        finally:
            builder.data_file.close()
    report = SFTReport(
        prefix, replace(stats, sequences=len(groups)), seq_length, packing, time.perf_counter() - start
    )
    log.info("wrote %s.bin/.idx: %s", prefix, report.stats)
    return report


class IdxMapSFTDataset(torch.utils.data.Dataset):
    """SFT items read from an idxmap ``.bin/.idx`` prefix (ours or Pai-Megatron-Patch's).

    Padding is re-written with ``pad_id`` (Pai pads inputs with ``<|extra_0|>``; padding is never
    trained, so only its value differs). ``loss_average`` as in :func:`~.packing.build_item`.
    """

    def __init__(self, prefix: str, seq_length: int, *, pad_id: int, loss_average: str = "token"):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if loss_average not in LOSS_AVERAGES:
            raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {loss_average!r}")
        self.prefix, self.seq_length, self.pad_id, self.loss_average = (
            prefix,
            seq_length,
            pad_id,
            loss_average,
        )
        self.data = IndexedDataset(prefix)
        if not np.issubdtype(self.data.index.dtype, np.signedinteger):
            raise ValueError(
                f"{prefix}: dtype {np.dtype(self.data.index.dtype).name} cannot hold idxmap "
                f"records (negative marks); is this a pretraining dataset?"
            )
        lengths = self.data.sequence_lengths
        bad = np.flatnonzero(lengths != 2 * seq_length)
        if len(bad):
            raise ValueError(
                f"{prefix}: record {bad[0]} has {lengths[bad[0]]} values, expected "
                f"2 * seq_length = {2 * seq_length} (was it written for seq_length "
                f"{lengths[bad[0]] // 2}?)"
            )
        if len(lengths) == 0:
            raise ValueError(f"{prefix}: no records")

    def __len__(self) -> int:
        return len(self.data)

    def samples(self, idx: int) -> list[Sample]:
        """The samples of record ``idx``."""
        return decode_record(self.data[idx], self.seq_length, f"{self.prefix} record {idx}")

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return build_item(self.samples(idx), self.seq_length, self.pad_id, self.loss_average)
