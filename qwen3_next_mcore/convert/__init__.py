"""HF <-> megatron-core checkpoint conversion: the mapping table, pure transforms, streaming engines.

Public API (imported lazily, so ``import qwen3_next_mcore.convert`` stays cheap):

- :func:`convert_hf_to_mcore` (HF safetensors folder -> torch_dist checkpoint folder)
- :func:`convert_mcore_to_hf` (torch_dist checkpoint at any TP/PP/EP -> HF folder)
- :func:`load_mcore_checkpoint` (a checkpoint into a model built at any layout)
- :class:`ConversionReport` (what a conversion returns)
"""

from __future__ import annotations

from qwen3_next_mcore._lazy import lazy_exports


_EXPORTS = {
    "convert_hf_to_mcore": "qwen3_next_mcore.convert.hf_to_mcore",
    "convert_mcore_to_hf": "qwen3_next_mcore.convert.mcore_to_hf",
    "load_mcore_checkpoint": "qwen3_next_mcore.convert.mcore",
    "ConversionReport": "qwen3_next_mcore.convert.output",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = ["ConversionReport", "convert_hf_to_mcore", "convert_mcore_to_hf", "load_mcore_checkpoint"]
