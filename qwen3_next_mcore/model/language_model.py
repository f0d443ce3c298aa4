"""``Qwen3NextModel``: megatron-core's ``HybridModel`` whose language-model loss (the LM loss and each MTP
depth's) is our vocab-parallel cross-entropy (:mod:`qwen3_next_mcore.ops.cross_entropy`).

Why a subclass: ``HybridModel`` computes both losses through its ``compute_language_model_loss``, which
offers megatron-core's unfused cross-entropy, its ``native`` fusion or Transformer Engine's; the first
two make fp32 copies of the [tokens, 151936] logits and keep an fp32 softmax for the backward (17.2 ms
of a 148 ms proxy step on an H100, and 5 GB). Transformer Engine's, when asked for
(``cross_entropy_loss_fusion`` with ``cross_entropy_fusion_impl="te"``), is left in place.
"""

from __future__ import annotations

import torch
from megatron.core.models.hybrid.hybrid_model import HybridModel

from ..ops.cross_entropy import vocab_parallel_cross_entropy


class Qwen3NextModel(HybridModel):
    """``HybridModel`` with :func:`~qwen3_next_mcore.ops.cross_entropy.vocab_parallel_cross_entropy` as
    its language-model loss; everything else (parameters, checkpoint keys, forward) is megatron-core's."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """labels ``[b, s]`` int64, logits ``[s, b, V / tp]`` -> per-token loss ``[b, s]`` fp32."""
        if self.config.cross_entropy_loss_fusion and self.config.cross_entropy_fusion_impl == "te":
            return super().compute_language_model_loss(labels, logits)
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(), self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()
