"""The layer specs of Qwen3-Next for megatron-core's ``HybridModel``, for two backends.

- ``local`` (always available): megatron-core's own parallel linears, our zero-centred RMSNorm, our Gated
  DeltaNet, our gated attention (megatron-core's ``SelfAttention`` minus a copy) with SDPA core
  attention, megatron-core's ``MoELayer`` (as :class:`Qwen3NextMoELayer`) with grouped-GEMM experts.
  Runs on CPU.
- ``te`` (when Transformer Engine is installed): the same modules with Transformer Engine linears and
  core attention. Parameter names are the same for every slot whose module is only swapped for its TE
  twin (``weight`` stays ``weight``); the checkpoint keys (``sharded_state_dict``) are identical, which is
  what conversion and resharding use.

One Qwen3-Next decoder layer is two hybrid layers: its mixer (``G`` Gated DeltaNet or ``*`` gated
attention, with the input norm) and its MoE block (``E``, with the post-attention norm).
"""

from __future__ import annotations

import functools
from typing import Literal

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from ..config import Qwen3NextConfig
from ..layers.core_attention import SDPACoreAttention
from ..layers.gated_attention import Qwen3NextSelfAttention
from ..layers.gated_deltanet import GatedDeltaNetSubmodules, Qwen3NextGatedDeltaNet
from ..layers.grouped_experts import GroupedGemmExperts
from ..layers.hybrid_stack import Qwen3NextHybridStack
from ..layers.moe import Qwen3NextMoELayer, Qwen3NextRouter
from ..layers.norms import GatedRMSNorm, ZeroCenteredRMSNorm

Backend = Literal["local", "te"]


def _linears(backend: Backend):
    if backend == "local":
        return ColumnParallelLinear, RowParallelLinear, SDPACoreAttention
    if backend == "te":
        try:
            import transformer_engine  # noqa: F401
            from megatron.core.extensions.transformer_engine import (
                TEColumnParallelLinear,
                TEDotProductAttention,
                TERowParallelLinear,
            )
        except ImportError as e:
            raise ValueError(f"backend='te' needs Transformer Engine, which is not importable ({e}); "
                             "use backend='local' or install the 'te' extra") from None
        return TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention
    raise ValueError(f"backend={backend!r}: expected 'local' or 'te'")


def hybrid_layer_pattern(config: Qwen3NextConfig, pipeline_parallel: int = 1) -> str:
    """megatron-core's hybrid pattern: per layer 'G' or '*' then 'E'; '|' between pipeline stages;
    '/*E' per MTP layer. E.g. the 80B model at PP=1: 'GEGEGE*E' * 12 + '/*E'."""
    per_layer = ["GE" if t == "linear_attention" else "*E" for t in config.layer_types]
    if config.num_hidden_layers % pipeline_parallel:
        raise ValueError(f"Qwen3NextConfig.num_hidden_layers={config.num_hidden_layers} is not divisible "
                         f"by pipeline_parallel={pipeline_parallel}")
    n = config.num_hidden_layers // pipeline_parallel
    main = "|".join("".join(per_layer[i:i + n]) for i in range(0, len(per_layer), n))
    return main + "/*E" * config.mtp_num_layers


def _moe_spec(config: Qwen3NextConfig, backend: Backend, experts: str):
    """megatron-core's MoE layer as :class:`Qwen3NextMoELayer` (its router GEMM and token permutation
    made faster, same math); routed experts: ``grouped`` (:class:`GroupedGemmExperts`, local backend
    default), ``sequential`` (megatron's per-expert loop) or, with ``te``, TE's grouped MLP."""
    import dataclasses

    if experts not in ("grouped", "sequential"):
        raise ValueError(f"experts={experts!r}: expected 'grouped' or 'sequential'")
    spec = get_moe_module_spec(use_te=backend == "te", num_experts=config.num_experts,
                               moe_grouped_gemm=backend == "te")
    sub = dataclasses.replace(spec.keywords["submodules"], router=Qwen3NextRouter)
    if backend == "local" and experts == "grouped":
        sub = dataclasses.replace(sub, experts=GroupedGemmExperts)
    return functools.partial(Qwen3NextMoELayer, *spec.args, **{**spec.keywords, "submodules": sub})


def get_qwen3_next_stack_spec(config: Qwen3NextConfig, backend: Backend = "local",
                              op_backends: dict | None = None, experts: str = "grouped") -> ModuleSpec:
    """The ``HybridStack`` spec of Qwen3-Next for ``backend``. ``op_backends`` picks the GDN op
    backends (``{"gdn": "torch"|"fla"|"naive", "conv": ...}``; default: automatic per device);
    ``experts`` the routed-expert computation (see :func:`_moe_spec`)."""
    column, row, core_attention = _linears(backend)
    norm = ZeroCenteredRMSNorm
    gdn_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=Qwen3NextGatedDeltaNet,
                submodules=GatedDeltaNetSubmodules(in_proj_qkvz=column, in_proj_ba=column, out_norm=GatedRMSNorm,
                                                   out_proj=row, backend=dict(op_backends or {})),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=Qwen3NextSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(linear_qkv=column, core_attention=core_attention,
                                                   linear_proj=row, q_layernorm=norm, k_layernorm=norm),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )
    moe_layer = ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm,
            mlp=_moe_spec(config, backend, experts),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    mtp = ModuleSpec(
        module=MultiTokenPredictionBlock,
        submodules=MultiTokenPredictionBlockSubmodules(layer_specs=[
            ModuleSpec(module=MultiTokenPredictionLayer,
                       submodules=MultiTokenPredictionLayerSubmodules(
                           enorm=norm, hnorm=norm, eh_proj=column, mtp_model_layer=None, layer_norm=norm))
        ]),
    )
    return ModuleSpec(
        module=Qwen3NextHybridStack,
        submodules=HybridStackSubmodules(gdn_layer=gdn_layer, attention_layer=attention_layer, moe_layer=moe_layer,
                                         mtp_block_spec=mtp if config.mtp_num_layers else None),
    )
