"""megatron-core ModuleSpecs for Qwen3-Next: the hybrid stack spec for the local or TE backend."""

from .stack import Backend, get_qwen3_next_stack_spec, hybrid_layer_pattern

__all__ = ["Backend", "get_qwen3_next_stack_spec", "hybrid_layer_pattern"]
