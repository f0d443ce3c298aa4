"""SFT datasets: raw JSON/JSONL rows encoded on the fly, or idxmap files, as one item format.

Every item is :func:`~.packing.build_item`'s dict of ``seq_length``-long tensors (``tokens``, ``labels``,
``loss_mask``, ``position_ids``, ``loss_weight``, ``cu_seqlens`` ...). A row longer than ``seq_length``
follows the ``overflow`` policy:

- ``"truncate"`` (default): keep its first ``seq_length`` tokens; a row whose truncation leaves no
  reply token to train on is dropped instead.
- ``"drop"``: leave the row out.
- ``"error"``: raise ValueError naming the row.

The counts are in the dataset's ``stats`` (:class:`SFTStats`) and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .chat import ChatEncoder, row_to_messages
from .json_rows import read_rows
from .packing import IGNORE_INDEX, LOSS_AVERAGES, PACK_STRATEGIES, Sample, build_item, pack
from .tokenizer import load_tokenizer, pad_id

log = logging.getLogger(__name__)

OVERFLOW_POLICIES = ("truncate", "drop", "error")


@dataclass(frozen=True)
class SFTStats:
    """Rows read, samples kept, rows truncated and dropped (over-long), and sequences (items) built."""

    rows: int = 0
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    sequences: int = 0


def encode_sft_file(
    path: str | Path,
    tokenizer,
    seq_length: int,
    *,
    overflow: str = "truncate",
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[Sample], SFTStats]:
    """All rows of a JSON/JSONL file as samples of at most ``seq_length`` tokens, after ``overflow``."""
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if seq_length < 2:
        raise ValueError(f"seq_length must be >= 2, got {seq_length}")
    rows = read_rows(path)
    conversations = [row_to_messages(r, path) for r in rows]
    wheres = [r.where(path) for r in rows]
    encoded = ChatEncoder(tokenizer, template_kwargs).encode(conversations, wheres)
    samples: list[Sample] = []
    truncated = dropped = 0
    for (tokens, labels), where in zip(encoded, wheres):
        if len(tokens) > seq_length:
            if overflow == "error":
                raise ValueError(
                    f"{where}: {len(tokens)} tokens exceed seq_length {seq_length} (overflow='error')"
                )
            if overflow == "drop":
                dropped += 1
                continue
            tokens, labels = tokens[:seq_length], labels[:seq_length].copy()
            labels[-1] = IGNORE_INDEX
            if not (labels != IGNORE_INDEX).any():
                dropped += 1  # the prompt alone fills seq_length: nothing left to train on
                continue
            truncated += 1
        samples.append((tokens, labels))
    if not samples:
        raise ValueError(
            f"{path}: no rows left to train on after overflow={overflow!r} "
            f"({dropped} of {len(rows)} longer than seq_length {seq_length})"
        )
    stats = SFTStats(rows=len(rows), samples=len(samples), truncated=truncated, dropped=dropped)
    if truncated or dropped:
        log.warning(
            "%s: %d of %d rows exceed seq_length %d: %d truncated, %d dropped (overflow=%r)",
            path,
            truncated + dropped,
            len(rows),
            seq_length,
            truncated,
            dropped,
            overflow,
        )
    return samples, stats


def group_samples(
    samples: list[Sample], seq_length: int, packing: bool, pack_strategy: str
) -> list[list[int]]:
    """Sample indices per item: one each, or packed rows (see :func:`~.packing.pack`)."""
    if not packing:
        return [[i] for i in range(len(samples))]
    return pack([len(t) for t, _ in samples], seq_length, pack_strategy)


class RawSFTDataset(torch.utils.data.Dataset):
    """SFT items from a raw JSON-array or JSONL file, encoded once at construction.

    Attributes: ``stats`` (:class:`SFTStats`), ``num_truncated``, ``num_dropped``.
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer,
        seq_length: int,
        *,
        packing: bool = False,
        overflow: str = "truncate",
        loss_average: str = "token",
        pack_strategy: str = "best_fit",
        template_kwargs: dict[str, Any] | None = None,
    ):
        _check_options(loss_average, pack_strategy)
        self.seq_length = seq_length
        self.loss_average = loss_average
        self.pad_id = pad_id(tokenizer)
        self.samples, stats = encode_sft_file(
            path, tokenizer, seq_length, overflow=overflow, template_kwargs=template_kwargs
        )
        self.items = group_samples(self.samples, seq_length, packing, pack_strategy)
        self.stats = replace(stats, sequences=len(self.items))
        log.info("SFT dataset %s: %s", path, self.stats)

    @property
    def num_truncated(self) -> int:
        return self.stats.truncated

    @property
    def num_dropped(self) -> int:
        return self.stats.dropped

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        samples = [self.samples[i] for i in self.items[idx]]
        return build_item(samples, self.seq_length, self.pad_id, self.loss_average)


def _check_options(loss_average: str, pack_strategy: str) -> None:
    if loss_average not in LOSS_AVERAGES:
        raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {loss_average!r}")
    if pack_strategy not in PACK_STRATEGIES:
        raise ValueError(f"pack_strategy must be one of {PACK_STRATEGIES}, got {pack_strategy!r}")


def idxmap_prefix(path: str | Path) -> str | None:
    """The ``.bin/.idx`` prefix ``path`` names (itself, or ``path + "_text_document"``), else None."""
    for candidate in (str(path), f"{path}_text_document"):
        if Path(candidate + ".bin").is_file() and Path(candidate + ".idx").is_file():
            return candidate
    return None


def build_sft_dataset(
    path: str | Path, tokenizer, seq_length: int, packing: bool = False, **options: Any
) -> torch.utils.data.Dataset:
    """An SFT dataset of ``seq_length``-token items from a raw JSON/JSONL file or an idxmap prefix.

    Args:
        path: a ``.json``/``.jsonl`` file (``MP_DATASET_TYPE=raw``), or an idxmap prefix: ``P`` when
            ``P.bin``/``P.idx`` exist (Pai-Megatron-Patch's ``..._text_document`` prefix, as passed to its
            training script), or the ``--output-prefix`` given to ``preprocess sft`` (``P_text_document``).
        tokenizer: a tokenizer folder or a loaded HF tokenizer.
        seq_length: tokens per item (Pai's ``PAD_LEN``); an idxmap's records must be ``2 * seq_length``.
        packing: raw files only: pack several rows per item (idxmap files were packed, or not, when written).
        options: ``overflow``, ``loss_average``, ``pack_strategy``, ``template_kwargs``, ``chat_template``
            for raw files; ``loss_average`` for idxmap files.
    """
    chat_template = options.pop("chat_template", None)
    tok = load_tokenizer(tokenizer, chat_template=chat_template)
    prefix = idxmap_prefix(path)
    if prefix is not None and not Path(path).is_file():
        from .idxmap import IdxMapSFTDataset

        unknown = set(options) - {"loss_average"}
        if unknown:
            raise ValueError(f"options {sorted(unknown)} apply to raw JSON input only; {path} is an idxmap")
        if packing:
            log.info("%s is an idxmap: its rows were packed (or not) when it was written", prefix)
        return IdxMapSFTDataset(prefix, seq_length, pad_id=pad_id(tok), **options)
    if not Path(path).is_file():
        raise ValueError(
            f"SFT data {path} is neither a JSON/JSONL file nor an idxmap prefix "
            f"(no {path}.bin/.idx or {path}_text_document.bin/.idx)"
        )
    return RawSFTDataset(path, tok, seq_length, packing=packing, **options)
