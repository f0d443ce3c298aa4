"""The Qwen3-Next architecture as one frozen, validated pydantic model.

Field names follow the Hugging Face ``config.json`` of Qwen3-Next (what users read on the hub), so
``from_hf``/``to_hf`` are nearly the identity; the translation to megatron-core's names lives in one
place, :mod:`qwen3_next_mcore.config.megatron`. Derived sizes are properties, never stored fields.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, ValidationError, model_validator

LayerType = Literal["linear_attention", "full_attention"]

# Keys of a HF config.json that carry no architecture and are accepted and dropped by ``from_hf``.
_HF_INFORMATIONAL_KEYS = frozenset(
    {
        "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
        "output_router_logits", "attention_dropout", "use_sliding_window", "sliding_window",
        "max_window_layers", "rope_scaling", "_name_or_path", "auto_map", "return_dict",
        "output_hidden_states", "output_attentions", "chunk_size_feed_forward", "quantization_config",
    }
)


class Qwen3NextConfig(BaseModel):
    """Every architecture field of Qwen3-Next (spec, section 1), validated once at construction.

    Invalid values raise ``ValueError`` naming the field and the value. Build one with a preset
    (:func:`qwen3_next_mcore.config.get_preset`), from a transformers ``config.json``
    (:meth:`from_hf`), or directly with keyword arguments.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: PositiveInt = 151936
    hidden_size: PositiveInt = 2048
    num_hidden_layers: PositiveInt = 48
    layer_types: tuple[LayerType, ...] = tuple(
        "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(48)
    )
    # gated attention
    num_attention_heads: PositiveInt = 16
    num_key_value_heads: PositiveInt = 2
    head_dim: PositiveInt = 256
    partial_rotary_factor: PositiveFloat = 0.25
    rope_theta: PositiveFloat = 10_000_000.0
    max_position_embeddings: PositiveInt = 262144
    # gated DeltaNet
    linear_num_key_heads: PositiveInt = 16
    linear_num_value_heads: PositiveInt = 32
    linear_key_head_dim: PositiveInt = 128
    linear_value_head_dim: PositiveInt = 128
    linear_conv_kernel_dim: PositiveInt = 4
    # MoE
    num_experts: PositiveInt = 512
    num_experts_per_tok: PositiveInt = 10
    moe_intermediate_size: PositiveInt = 512
    shared_expert_intermediate_size: PositiveInt = 512
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    intermediate_size: PositiveInt = 5120  # dense MLP width; unused (every layer is MoE)
    # misc
    rms_norm_eps: PositiveFloat = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: PositiveFloat = 0.02
    mtp_num_layers: int = 1
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None

    @model_validator(mode="after")
    def _check(self) -> "Qwen3NextConfig":
        def bad(field: str, value: Any, expected: str) -> ValueError:
            return ValueError(f"Qwen3NextConfig.{field}={value!r}: {expected}")

        if len(self.layer_types) != self.num_hidden_layers:
            raise bad("layer_types", f"<{len(self.layer_types)} entries>",
                      f"expected one entry per layer (num_hidden_layers={self.num_hidden_layers})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", self.num_key_value_heads,
                      f"must divide num_attention_heads={self.num_attention_heads}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise bad("linear_num_value_heads", self.linear_num_value_heads,
                      f"must be a multiple of linear_num_key_heads={self.linear_num_key_heads}")
        rot = self.partial_rotary_factor * self.head_dim
        if self.partial_rotary_factor > 1 or rot != int(rot) or int(rot) % 2:
            raise bad("partial_rotary_factor", self.partial_rotary_factor,
                      f"expected a factor <= 1 giving an even rotary width of head_dim={self.head_dim}")
        if self.num_experts_per_tok > self.num_experts:
            raise bad("num_experts_per_tok", self.num_experts_per_tok,
                      f"must be <= num_experts={self.num_experts}")
        if self.mtp_num_layers < 0:
            raise bad("mtp_num_layers", self.mtp_num_layers, "must be >= 0")
        if self.router_aux_loss_coef < 0:
            raise bad("router_aux_loss_coef", self.router_aux_loss_coef, "must be >= 0")
        return self

    # ----- derived sizes -------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.partial_rotary_factor * self.head_dim)

    @property
    def linear_key_dim(self) -> int:
        """Width of all GDN key heads together (q and k each)."""
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        """Width of all GDN value heads together (v and z each)."""
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the GDN depthwise conv: [q | k | v]."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def num_linear_layers(self) -> int:
        return sum(t == "linear_attention" for t in self.layer_types)

    @property
    def num_full_layers(self) -> int:
        return sum(t == "full_attention" for t in self.layer_types)

    @property
    def full_attention_interval(self) -> int | None:
        """The period ``n`` when layer i is full attention exactly when (i+1) % n == 0, else None."""
        for n in range(1, self.num_hidden_layers + 1):
            if self.layer_types == _interval_layer_types(self.num_hidden_layers, n):
                return n
        return None

    # ----- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict) -> "Qwen3NextConfig":
        """Read a transformers Qwen3-Next config (a dict, a ``config.json`` file or its folder).

        Accepts the ``full_attention_interval`` and explicit ``layer_types`` forms, legacy top-level
        ``rope_theta``/``partial_rotary_factor`` and the 5.x ``rope_parameters`` dict. The MTP layer
        count comes from ``num_nextn_predict_layers`` when present, else 1 (the released checkpoints
        ship one MTP layer and no count key). Raises ValueError naming the source and key on bad input.
        """
        source = "<dict>"
        if isinstance(path_or_dict, dict):
            raw = dict(path_or_dict)
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "config.json"
            source = str(path)
            if not path.is_file():
                raise ValueError(f"{source}: no such file (expected a transformers config.json)")
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}: not valid JSON ({e})") from None
        try:
            return cls(**_hf_to_fields(raw, source))
        except ValidationError as e:
            raise ValueError(f"{source}: {_format_validation_error(e)}") from None

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.Qwen3NextConfig(**d)`` accepts.

        Writes both rope forms (legacy top-level keys and ``rope_parameters``) and both layer-pattern
        forms where the pattern is periodic, so old and new transformers read it the same.
        """
        d: dict[str, Any] = {
            "architectures": ["Qwen3NextForCausalLM"],
            "model_type": "qwen3_next",
            "attention_bias": False,
            "decoder_sparse_step": 1,
            "hidden_act": "silu",
            "mlp_only_layers": [],
            "num_nextn_predict_layers": self.mtp_num_layers,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
        }
        for name in type(self).model_fields:
            if name in ("mtp_num_layers",):
                continue
            value = getattr(self, name)
            d[name] = list(value) if isinstance(value, tuple) else value
        if self.rope_theta == int(self.rope_theta):
            d["rope_theta"] = int(self.rope_theta)
            d["rope_parameters"]["rope_theta"] = int(self.rope_theta)
        if (n := self.full_attention_interval) is not None:
            d["full_attention_interval"] = n
        return d

    def save_hf(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` into ``directory`` atomically (temporary name, then rename)."""
        path = Path(directory) / "config.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_hf(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path


def _interval_layer_types(num_layers: int, interval: int) -> tuple[str, ...]:
    return tuple("full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers))


def _hf_to_fields(raw: dict[str, Any], source: str) -> dict[str, Any]:
    model_type = raw.get("model_type", "qwen3_next")
    if model_type != "qwen3_next":
        raise ValueError(f"{source}: model_type={model_type!r}, expected 'qwen3_next'")
    raw = dict(raw)
    # unsupported architecture variants: refuse rather than build a different model silently
    unsupported = {
        "mlp_only_layers": (lambda v: v in (None, []), "dense MLP layers are not supported"),
        "decoder_sparse_step": (lambda v: v in (None, 1), "every layer must be MoE (decoder_sparse_step=1)"),
        "attention_bias": (lambda v: not v, "attention biases are not supported"),
        "hidden_act": (lambda v: v in (None, "silu"), "only silu experts are supported"),
        "rope_scaling": (lambda v: v is None or v.get("rope_type", v.get("type")) == "default",
                         "rope scaling is not supported"),
        "use_sliding_window": (lambda v: not v, "sliding-window attention is not supported"),
    }
    for key, (ok, why) in unsupported.items():
        if key in raw and not ok(raw[key]):
            raise ValueError(f"{source}: {key}={raw[key]!r}: {why}")
    fields: dict[str, Any] = {}
    rope = raw.pop("rope_parameters", None) or {}
    if rope and rope.get("rope_type", "default") != "default":
        raise ValueError(f"{source}: rope_parameters.rope_type={rope.get('rope_type')!r}: only 'default' is supported")
    for key in ("rope_theta", "partial_rotary_factor"):
        value = rope.get(key, raw.get(key))
        raw.pop(key, None)
        if value is not None:
            fields[key] = value
    interval = raw.pop("full_attention_interval", None)
    n_layers = raw.get("num_hidden_layers", Qwen3NextConfig.model_fields["num_hidden_layers"].default)
    if raw.get("layer_types") is None:
        raw.pop("layer_types", None)
        fields["layer_types"] = _interval_layer_types(n_layers, interval or 4)
    elif interval is not None and tuple(raw["layer_types"]) != _interval_layer_types(n_layers, interval):
        raise ValueError(f"{source}: layer_types disagrees with full_attention_interval={interval}")
    mtp = raw.pop("num_nextn_predict_layers", None)
    if mtp is not None:
        fields["mtp_num_layers"] = mtp
    for key in ("mlp_only_layers", "decoder_sparse_step", "attention_bias", "hidden_act"):
        raw.pop(key, None)
    known = set(Qwen3NextConfig.model_fields)
    for key, value in raw.items():
        if key in known:
            fields[key] = tuple(value) if key == "layer_types" else value
        elif key not in _HF_INFORMATIONAL_KEYS and key not in _generic_hf_keys():
            raise ValueError(f"{source}: unknown key {key!r} (not a Qwen3-Next architecture field)")
    return fields


def _generic_hf_keys() -> frozenset[str]:
    """Keys every transformers config carries (generation, tokenizer, output flags): no architecture."""
    global _GENERIC_HF_KEYS
    if _GENERIC_HF_KEYS is None:
        from transformers import PretrainedConfig

        _GENERIC_HF_KEYS = frozenset(PretrainedConfig().to_dict())
    return _GENERIC_HF_KEYS


_GENERIC_HF_KEYS: frozenset[str] | None = None


def _format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if loc == "config" or msg.startswith("Qwen3NextConfig."):
            parts.append(msg)
        else:
            parts.append(f"Qwen3NextConfig.{loc}={err.get('input')!r}: {msg}")
    return "; ".join(parts)
