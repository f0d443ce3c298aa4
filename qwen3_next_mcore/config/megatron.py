"""The one translation from :class:`Qwen3NextConfig` to megatron-core's ``TransformerConfig``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model import Qwen3NextConfig
from .parallel import ParallelConfig

if TYPE_CHECKING:
    import torch


def to_transformer_config(
    config: Qwen3NextConfig,
    parallel: ParallelConfig | None = None,
    *,
    params_dtype: torch.dtype | None = None,
    **overrides: Any,
):
    """Build megatron-core's ``TransformerConfig`` for ``config`` split as ``parallel``.

    ``params_dtype`` (default float32) sets ``bf16``/``fp16`` accordingly. ``overrides`` are passed through to
    ``TransformerConfig`` last (training options such as recompute, dispatcher, fp8), after being
    checked to be real fields. ``num_layers`` counts megatron hybrid layers: each Qwen3-Next decoder
    layer is two (its mixer and its MoE block). Raises ValueError when the split does not fit.
    """
    import dataclasses

    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    params_dtype = params_dtype or torch.float32
    parallel = parallel or ParallelConfig()
    parallel.check(config)
    on_gpu = torch.cuda.is_available()
    fields: dict[str, Any] = dict(
        # sizes
        num_layers=2 * config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads,
        kv_channels=config.head_dim,
        ffn_hidden_size=config.intermediate_size,
        # norms: our own zero-centred RMSNorm modules carry the (1 + w); megatron's flag stays off so
        # no megatron-built norm applies it a second time
        normalization="RMSNorm",
        layernorm_epsilon=config.rms_norm_eps,
        layernorm_zero_centered_gamma=False,
        # attention
        qk_layernorm=True,
        attention_output_gate=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        rotary_interleaved=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        # the language-model loss is ours (model/language_model.py, ops/cross_entropy.py) unless Transformer
        # Engine's fused cross-entropy is asked for here (cross_entropy_loss_fusion, impl "te")
        cross_entropy_loss_fusion=False,
        # gated DeltaNet
        linear_conv_kernel_dim=config.linear_conv_kernel_dim,
        linear_key_head_dim=config.linear_key_head_dim,
        linear_value_head_dim=config.linear_value_head_dim,
        linear_num_key_heads=config.linear_num_key_heads,
        linear_num_value_heads=config.linear_num_value_heads,
        # MoE: softmax over the top-k logits == softmax, top-k, renormalise (norm_topk_prob)
        gated_linear_unit=True,
        activation_func=F.silu,
        num_moe_experts=config.num_experts,
        moe_router_topk=config.num_experts_per_tok,
        moe_ffn_hidden_size=config.moe_intermediate_size,
        moe_shared_expert_intermediate_size=config.shared_expert_intermediate_size,
        moe_shared_expert_gate=True,
        moe_router_pre_softmax=not config.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if config.router_aux_loss_coef > 0 else "none",
        moe_aux_loss_coeff=config.router_aux_loss_coef,
        moe_token_dispatcher_type="alltoall",  # our ExpertSortedAlltoAllDispatcher (layers/moe.py)
        moe_grouped_gemm=False,
        # MTP
        mtp_num_layers=config.mtp_num_layers or None,
        # init (transformers: N(0, initializer_range))
        init_method_std=config.initializer_range,
        # parallel
        **parallel.megatron_sizes(),
        sequence_parallel=parallel.sequence_parallel,
        # precision
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"to_transformer_config: {key!r} is not a TransformerConfig field")
    fields.update(overrides)
    return TransformerConfig(**fields)
