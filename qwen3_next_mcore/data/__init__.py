"""Data for Qwen3-Next on megatron-core: tokenizer loading, pretraining ``.bin/.idx``, SFT datasets, packing.

Names are imported lazily, so ``import qwen3_next_mcore.data`` loads neither torch, transformers nor
megatron-core. See docs/data.md for the commands, formats and packing semantics.
"""

from __future__ import annotations

from qwen3_next_mcore._lazy import lazy_exports


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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = sorted(_EXPORTS)
