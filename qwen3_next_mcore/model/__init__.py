"""Build the Qwen3-Next megatron-core model, load HF weights into it, and read its logits."""

from .build import build_model
from .hf_weights import load_hf_weights
from .logits import full_logits, model_forward

__all__ = ["build_model", "full_logits", "load_hf_weights", "model_forward"]
