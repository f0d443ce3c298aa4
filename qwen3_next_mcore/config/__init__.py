"""Typed configuration: the model architecture, presets, the parallel layout, megatron translation."""

from .megatron import to_transformer_config
from .model import LayerType, Qwen3NextConfig
from .parallel import ParallelConfig
from .presets import get_preset, preset_names

__all__ = [
    "LayerType",
    "ParallelConfig",
    "Qwen3NextConfig",
    "get_preset",
    "preset_names",
    "to_transformer_config",
]
