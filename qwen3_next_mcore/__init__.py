"""qwen3-next-mcore: train Qwen3-Next (Gated DeltaNet + gated attention + MoE + MTP) on Megatron-Core.

The public API is imported lazily, so ``import qwen3_next_mcore`` is cheap; megatron-core is imported
on first use of a name that needs it.
"""

from __future__ import annotations

from qwen3_next_mcore._lazy import lazy_exports


__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Qwen3NextConfig": "qwen3_next_mcore.config",
    "ParallelConfig": "qwen3_next_mcore.config",
    "get_preset": "qwen3_next_mcore.config",
    "to_transformer_config": "qwen3_next_mcore.config",
    "parallel": "qwen3_next_mcore.parallel",
    "build_model": "qwen3_next_mcore.model",
    "load_hf_weights": "qwen3_next_mcore.model",
    "full_logits": "qwen3_next_mcore.model",
    "get_qwen3_next_stack_spec": "qwen3_next_mcore.specs",
    "convert_hf_to_mcore": "qwen3_next_mcore.convert",
    "convert_mcore_to_hf": "qwen3_next_mcore.convert",
    "load_mcore_checkpoint": "qwen3_next_mcore.convert",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = sorted(_EXPORTS)
