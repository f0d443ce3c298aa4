"""The Qwen3-Next name/layout mapping between Hugging Face checkpoints and our megatron-core model.

One table per block kind (templates), expanded over the layers of a config by :func:`build_rules`. A
rule says which HF tensors make one of our (unsharded) tensors and which pure transform of
:mod:`.transforms` joins or splits them. Our names are the global names of the unsharded model
(``decoder.layers.{global hybrid layer}``; experts by global index); a TP/EP rank's share is a
contiguous block of each, cut by :func:`.transforms.tp_shard`.

megatron-core's distributed checkpoint stores each of our tensors under its global name, except the
routed experts, which it stores as one ``[num_experts, ...]`` tensor per projection (``SequentialMLP``'s
keys, which every expert implementation reproduces): :func:`mcore_key`. Each megatron linear also has an
``_extra_state`` object (None for the local backend, FP8 metadata under Transformer Engine):
:func:`mcore_object_keys`. None of these keys depends on the parallel layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import Qwen3NextConfig
from . import transforms as T

# kinds of rule: how HF tensors become ours
IDENTITY, GLU, GDN_CONV, ATTN_QKV = "identity", "glu", "gdn_conv", "attn_qkv"

# (our suffix, HF suffixes, kind) per block; "{e}" is an expert index
GDN_MIXER = [
    ("input_layernorm.weight", ("input_layernorm.weight",), IDENTITY),
    ("self_attention.in_proj_qkvz.weight", ("linear_attn.in_proj_qkvz.weight",), IDENTITY),
    ("self_attention.in_proj_ba.weight", ("linear_attn.in_proj_ba.weight",), IDENTITY),
    ("self_attention.conv1d_weight", ("linear_attn.conv1d.weight",), GDN_CONV),
    ("self_attention.dt_bias", ("linear_attn.dt_bias",), IDENTITY),
    ("self_attention.A_log", ("linear_attn.A_log",), IDENTITY),
    ("self_attention.out_norm.weight", ("linear_attn.norm.weight",), IDENTITY),
    ("self_attention.out_proj.weight", ("linear_attn.out_proj.weight",), IDENTITY),
]
ATTENTION_MIXER = [
    ("input_layernorm.weight", ("input_layernorm.weight",), IDENTITY),
    ("self_attention.linear_qkv.weight",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), ATTN_QKV),
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), IDENTITY),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), IDENTITY),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), IDENTITY),
]
MOE_BLOCK = [
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), IDENTITY),
    ("mlp.router.weight", ("mlp.gate.weight",), IDENTITY),
    ("mlp.shared_experts.linear_fc1.weight",
     ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"), GLU),
    ("mlp.shared_experts.linear_fc2.weight", ("mlp.shared_expert.down_proj.weight",), IDENTITY),
    ("mlp.shared_experts.gate_weight", ("mlp.shared_expert_gate.weight",), IDENTITY),
]
EXPERT = [
    ("mlp.experts.local_experts.{e}.linear_fc1.weight",
     ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), GLU),
    ("mlp.experts.local_experts.{e}.linear_fc2.weight", ("mlp.experts.{e}.down_proj.weight",), IDENTITY),
]
MTP_HEAD = [
    ("enorm.weight", ("pre_fc_norm_embedding.weight",), IDENTITY),
    ("hnorm.weight", ("pre_fc_norm_hidden.weight",), IDENTITY),
    ("eh_proj.weight", ("fc.weight",), IDENTITY),
    ("final_layernorm.weight", ("norm.weight",), IDENTITY),
]
TOP = [
    ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), IDENTITY),
    ("decoder.final_norm.weight", ("model.norm.weight",), IDENTITY),
]
OUTPUT = [("output_layer.weight", ("lm_head.weight",), IDENTITY)]

# modules that are megatron linears: each has an ``_extra_state`` entry in the checkpoint
LINEAR_MODULES = frozenset({"in_proj_qkvz", "in_proj_ba", "out_proj", "linear_qkv", "linear_proj", "linear_fc1",
                            "linear_fc2", "eh_proj", "output_layer"})


@dataclass(frozen=True)
class Rule:
    ours: str
    hf: tuple[str, ...]
    kind: str


def _block(rules, ours_prefix: str, hf_prefix: str, experts: int = 0) -> list[Rule]:
    out = []
    for ours, hf, kind in rules:
        for e in range(experts) if "{e}" in ours else [None]:
            fmt = {} if e is None else {"e": e}
            out.append(Rule(ours_prefix + ours.format(**fmt), tuple(hf_prefix + h.format(**fmt) for h in hf), kind))
    return out


def decoder_layer_rules(config: Qwen3NextConfig, layer_type: str, ours_mixer: str, ours_moe: str,
                        hf_prefix: str) -> list[Rule]:
    mixer = GDN_MIXER if layer_type == "linear_attention" else ATTENTION_MIXER
    return (_block(mixer, ours_mixer, hf_prefix) + _block(MOE_BLOCK, ours_moe, hf_prefix)
            + _block(EXPERT, ours_moe, hf_prefix, experts=config.num_experts))


def build_rules(config: Qwen3NextConfig) -> list[Rule]:
    """Every rule of the model described by ``config``, in checkpoint order."""
    if config.mtp_num_layers > 1:
        raise ValueError(f"Qwen3NextConfig.mtp_num_layers={config.mtp_num_layers}: HF checkpoints name one MTP "
                         "layer ('mtp.*'); more are not convertible")
    rules = _block(TOP, "", "")
    for i, layer_type in enumerate(config.layer_types):
        rules += decoder_layer_rules(config, layer_type, f"decoder.layers.{2 * i}.", f"decoder.layers.{2 * i + 1}.",
                                     f"model.layers.{i}.")
    if not config.tie_word_embeddings:
        rules += _block(OUTPUT, "", "")
    if config.mtp_num_layers:
        rules += _block(MTP_HEAD, "mtp.layers.0.", "mtp.")
        rules += decoder_layer_rules(config, "full_attention", "mtp.layers.0.mtp_model_layer.layers.0.",
                                     "mtp.layers.0.mtp_model_layer.layers.1.", "mtp.layers.0.")
    return rules


def to_ours(rule: Rule, tensors: list[torch.Tensor], config: Qwen3NextConfig) -> torch.Tensor:
    """HF tensors of ``rule`` (in ``rule.hf`` order) -> our full tensor."""
    if rule.kind == IDENTITY:
        return tensors[0]
    if rule.kind == GLU:
        return T.merge_glu(*tensors)
    if rule.kind == GDN_CONV:
        return T.merge_gdn_conv(tensors[0], config.linear_num_key_heads, config.linear_key_head_dim,
                                config.linear_num_value_heads, config.linear_value_head_dim)
    if rule.kind == ATTN_QKV:
        return T.merge_attention_qkv(*tensors, config.num_attention_heads, config.num_key_value_heads,
                                     config.head_dim)
    raise AssertionError(rule.kind)


def to_hf(rule: Rule, tensor: torch.Tensor, config: Qwen3NextConfig) -> list[torch.Tensor]:
    """Our full tensor -> the HF tensors of ``rule`` (in ``rule.hf`` order). Exact inverse of :func:`to_ours`."""
    if rule.kind == IDENTITY:
        return [tensor]
    if rule.kind == GLU:
        return list(T.split_glu(tensor))
    if rule.kind == GDN_CONV:
        return [T.split_gdn_conv(tensor, config.linear_num_key_heads, config.linear_key_head_dim,
                                 config.linear_num_value_heads, config.linear_value_head_dim)]
    if rule.kind == ATTN_QKV:
        return list(T.split_attention_qkv(tensor, config.num_attention_heads, config.num_key_value_heads,
                                          config.head_dim))
    raise AssertionError(rule.kind)


def expected_hf_shapes(config: Qwen3NextConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor the config implies (per-expert naming, as stored on disk)."""
    H, V = config.hidden_size, config.vocab_size
    nk, nv, dk, dv = (config.linear_num_key_heads, config.linear_num_value_heads, config.linear_key_head_dim,
                      config.linear_value_head_dim)
    nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    F, Fs = config.moe_intermediate_size, config.shared_expert_intermediate_size
    suffix_shapes = {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "linear_attn.in_proj_qkvz.weight": (2 * nk * dk + 2 * nv * dv, H),
        "linear_attn.in_proj_ba.weight": (2 * nv, H),
        "linear_attn.conv1d.weight": (2 * nk * dk + nv * dv, 1, config.linear_conv_kernel_dim),
        "linear_attn.dt_bias": (nv,), "linear_attn.A_log": (nv,), "linear_attn.norm.weight": (dv,),
        "linear_attn.out_proj.weight": (H, nv * dv),
        "self_attn.q_proj.weight": (2 * nh * hd, H), "self_attn.k_proj.weight": (nkv * hd, H),
        "self_attn.v_proj.weight": (nkv * hd, H), "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,), "self_attn.o_proj.weight": (H, nh * hd),
        "mlp.gate.weight": (config.num_experts, H),
        "mlp.shared_expert.gate_proj.weight": (Fs, H), "mlp.shared_expert.up_proj.weight": (Fs, H),
        "mlp.shared_expert.down_proj.weight": (H, Fs), "mlp.shared_expert_gate.weight": (1, H),
        "gate_proj.weight": (F, H), "up_proj.weight": (F, H), "down_proj.weight": (H, F),
        "pre_fc_norm_embedding.weight": (H,), "pre_fc_norm_hidden.weight": (H,), "fc.weight": (H, 2 * H),
        "norm.weight": (H,),
    }
    shapes = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H)}
    for rule in build_rules(config):
        for name in rule.hf:
            if name in shapes:
                continue
            key = name.split(".", 3)[-1] if name.startswith(("model.layers.", "mtp.layers.")) else name.split(".", 1)[-1]
            if key.startswith("mlp.experts."):
                key = key.split(".", 3)[-1]
            shapes[name] = suffix_shapes[key]
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


# ----- megatron-core distributed checkpoint keys -----
_EXPERT = re.compile(r"^(?P<moe>.*\.mlp\.experts)\.local_experts\.(?P<e>\d+)\.(?P<param>linear_fc[12]\.weight)$")


def mcore_key(ours: str) -> tuple[str, int | None]:
    """(checkpoint key, expert index or None) of our tensor ``ours``. A routed expert's tensor is row
    ``expert`` of the checkpoint tensor ``{moe}.experts.linear_fc{1,2}.weight`` [num_experts, ...]."""
    m = _EXPERT.match(ours)
    if m is None:
        return ours, None
    return f"{m['moe']}.experts.{m['param']}", int(m["e"])


def ours_shape(rule: Rule, config: Qwen3NextConfig, hf_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of our full tensor of ``rule``; ``hf_shapes``: :func:`expected_hf_shapes` of ``config``.
    Identity and the conv reorder keep the shape, the other merges stack their sources' rows (tests
    check this against :func:`to_ours`)."""
    shapes = [tuple(hf_shapes[name]) for name in rule.hf]
    if rule.kind in (IDENTITY, GDN_CONV):
        return shapes[0]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def mcore_tensor_shapes(config: Qwen3NextConfig) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor of the megatron-core checkpoint of ``config``, by checkpoint key."""
    out: dict[str, tuple[int, ...]] = {}
    hf_shapes = expected_hf_shapes(config)
    for rule in build_rules(config):
        key, expert = mcore_key(rule.ours)
        if key not in out:
            shape = ours_shape(rule, config, hf_shapes)
            out[key] = shape if expert is None else (config.num_experts, *shape)
    return out


def mcore_object_keys(config: Qwen3NextConfig) -> list[str]:
    """Unique keys of the ``_extra_state`` objects of every megatron linear (per expert for routed
    experts, as megatron's ``SequentialMLP`` and TE's grouped experts write them)."""
    modules = [r.ours.removesuffix(".weight") for r in build_rules(config) if r.ours.endswith(".weight")]
    if config.tie_word_embeddings:
        modules.append("output_layer")  # the output layer keeps its (empty) linear when sharing the embedding
    out = []
    for module in modules:
        if module.rpartition(".")[2] not in LINEAR_MODULES:
            continue
        key, expert = mcore_key(module + ".weight")
        base = key.removesuffix(".weight") + "._extra_state"
        shard = "0_1" if expert is None else f"{expert}_{config.num_experts}"
        out.append(f"{base}/shard_{shard}")
    return out
