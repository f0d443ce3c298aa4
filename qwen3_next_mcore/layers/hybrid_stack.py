"""megatron-core's ``HybridStack`` with a zero-centred final norm.

``HybridStack`` hard-codes Transformer Engine's ``TENorm`` for its final norm; Qwen3-Next needs a
zero-centred RMSNorm and must build without Transformer Engine, so this subclass builds the stack
without megatron's final norm and adds ours under the same attribute name (``final_norm``), keeping the
forward and the checkpoint keys of the parent.
"""

from __future__ import annotations

from megatron.core.models.hybrid.hybrid_block import HybridStack

from .norms import ZeroCenteredRMSNorm


class Qwen3NextHybridStack(HybridStack):
    def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = ZeroCenteredRMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
