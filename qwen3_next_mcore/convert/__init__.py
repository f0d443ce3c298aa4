"""HF <-> megatron-core checkpoint conversion: the mapping table, pure transforms, streaming engines.

Public API (imported lazily, so ``import qwen3_next_mcore.convert`` stays cheap):

- :func:`convert_hf_to_mcore` (HF safetensors folder -> torch_dist checkpoint folder)
- :func:`convert_mcore_to_hf` (torch_dist checkpoint at any TP/PP/EP -> HF folder)
- :func:`load_mcore_checkpoint` (a checkpoint into a model built at any layout)
- :class:`ConversionReport` (what a conversion returns)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "convert_hf_to_mcore": "qwen3_next_mcore.convert.hf_to_mcore",
    "convert_mcore_to_hf": "qwen3_next_mcore.convert.mcore_to_hf",
    "load_mcore_checkpoint": "qwen3_next_mcore.convert.mcore",
    "ConversionReport": "qwen3_next_mcore.convert.output",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen3_next_mcore.convert' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = ["ConversionReport", "convert_hf_to_mcore", "convert_mcore_to_hf", "load_mcore_checkpoint"]
