"""Training on megatron-core: options (``TrainConfig``), the reference loop (``train``), the
forward/backward step, checkpoints, model FLOPs (``forward_flops``, ``training_flops``) and the
Pai-Megatron-Patch argument mapping (docs/training.md).

Names are imported lazily, so ``qwen3_next_mcore.training.arguments`` (the CLI's parser) loads no torch.
"""

from __future__ import annotations

from qwen3_next_mcore._lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "arguments",
    "make_config": "arguments",
    "parse_args": "arguments",
    "TrainingDiverged": "loop",
    "forward_flops": "flops",
    "training_flops": "flops",
    "train": "loop",
    "forward_backward": "step",
    "lm_loss_func": "step",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = ["TrainConfig", "TrainingDiverged", "forward_backward", "forward_flops", "lm_loss_func", "make_config",
           "parse_args", "train", "training_flops"]
