"""Data for Qwen3-Next on megatron-core: tokenizer loading, pretraining ``.bin/.idx``, SFT datasets, packing.

Names are imported lazily, so ``import qwen3_next_mcore.data`` loads neither torch, transformers nor
megatron-core. See docs/data.md for the commands, formats and packing semantics.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module (relative to this package) that defines it
_EXPORTS = {
    # tokenizer
    "QWEN3_NEXT_INSTRUCT": "tokenizer",
    "load_tokenizer": "tokenizer",
    "check_vocab": "tokenizer",
    "default_tokenizer_dir": "tokenizer",
    # pretraining
    "preprocess_pretrain": "pretrain",
    "PretrainReport": "pretrain",
    "build_pretrain_datasets": "gpt_datasets",
    "PretrainDatasets": "gpt_datasets",
    "parse_blend": "gpt_datasets",
    # SFT
    "build_sft_dataset": "sft",
    "RawSFTDataset": "sft",
    "SFTStats": "sft",
    "OVERFLOW_POLICIES": "sft",
    "ChatEncoder": "chat",
    "preprocess_sft": "idxmap",
    "IdxMapSFTDataset": "idxmap",
    "SFTReport": "idxmap",
    # packing
    "IGNORE_INDEX": "packing",
    "build_item": "packing",
    "pack": "packing",
    "to_packed_seq_params": "packing",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen3_next_mcore.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
