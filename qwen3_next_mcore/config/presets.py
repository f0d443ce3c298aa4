"""Named model presets: the real 80B model, a ``tiny`` flavour for CPU tests, a one-GPU ``proxy``."""

from __future__ import annotations

from .model import Qwen3NextConfig, _interval_layer_types

_PRESETS: dict[str, dict] = {
    # Qwen/Qwen3-Next-80B-A3B (Instruct and Thinking share the architecture)
    "qwen3-next-80b-a3b": {},
    # Every block kind (3 GDN + 1 gated attention, MoE with shared expert, one MTP layer) at toy
    # widths, with the real vocabulary so the real tokenizer works; a forward takes well under a second
    # on a CPU core.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        layer_types=_interval_layer_types(4, 4),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        intermediate_size=128,
        max_position_embeddings=4096,
    ),
    # The 80B layer widths and vocabulary with 4 layers (3 GDN + 1 attention) and 64 experts top-10:
    # trains on one 80 GB GPU; the train-step benchmark's model (issue #7 states its baseline there).
    "proxy": dict(
        num_hidden_layers=4,
        layer_types=_interval_layer_types(4, 4),
        num_experts=64,
    ),
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str, **overrides) -> Qwen3NextConfig:
    """The preset ``name`` (see :func:`preset_names`), with optional field overrides."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(preset_names())}")
    return Qwen3NextConfig(**{**_PRESETS[name], **overrides})
