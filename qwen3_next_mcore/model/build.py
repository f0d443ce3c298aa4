"""``build_model``: the megatron-core ``HybridModel`` of Qwen3-Next for this rank (``Qwen3NextModel``, which
only swaps in our cross-entropy: model/language_model.py).

megatron-core 0.19 deprecates ``GPTModel`` in favour of ``HybridModel``; Qwen3-Next is a hybrid
(GDN + attention) stack, which is what ``HybridModel``'s layer pattern expresses, so we build that
(docs/architecture.md records the decision).
"""

from __future__ import annotations

import logging

import torch

from ..config import ParallelConfig, Qwen3NextConfig, to_transformer_config
from ..specs import Backend, get_qwen3_next_stack_spec, hybrid_layer_pattern

log = logging.getLogger(__name__)


def build_model(
    config: Qwen3NextConfig,
    *,
    dtype: torch.dtype = torch.float32,
    backend: Backend = "local",
    sequence_parallel: bool = False,
    op_backends: dict | None = None,
    experts: str = "grouped",
    vp_stage: int | None = None,
    **transformer_overrides,
):
    """The model chunk of this rank (its pipeline stage), on this rank's device, parameters in ``dtype``.

    Installs our partial RoPE in megatron-core's attention (``ops.rope.use_fused_partial_rotary``: one
    fused op instead of megatron's unfused chain where Transformer Engine's is not asked for). Uses the
    layout of :func:`qwen3_next_mcore.parallel.initialize` (a single local process is set up when nothing
    was initialised). ``transformer_overrides`` go to ``TransformerConfig`` (e.g.
    ``recompute_granularity``). Raises ValueError when the config cannot be split as asked.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    from .. import parallel
    from ..ops.rope import use_fused_partial_rotary
    from .language_model import Qwen3NextModel

    if not parallel.is_initialized():
        parallel.initialize()
    layout = parallel.current_layout()
    layout = ParallelConfig(**{**layout.model_dump(), "sequence_parallel": sequence_parallel})
    if layout.context_parallel > 1:
        raise ValueError("context_parallel > 1 is not supported yet: the Gated DeltaNet mixer has no "
                         "context-parallel recurrence and the local attention backend none either")
    tc = to_transformer_config(config, layout, params_dtype=dtype, **transformer_overrides)
    use_fused_partial_rotary()
    spec = get_qwen3_next_stack_spec(config, backend, op_backends, experts)
    pattern = hybrid_layer_pattern(config, layout.pipeline_parallel)
    model = Qwen3NextModel(
        config=tc,
        hybrid_stack_spec=spec,
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        hybrid_layer_pattern=pattern,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=True),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=True),
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=config.partial_rotary_factor,
        rotary_base=config.rope_theta,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        vp_stage=vp_stage,
    )
    model.qwen3_next_config = config  # what this model was built from (used by loaders and exporters)
    device = parallel.device()
    model.to(device)
    log.info("built Qwen3-Next %s on %s: pattern %s, %.1fM parameters on this rank", backend, device, pattern,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model
