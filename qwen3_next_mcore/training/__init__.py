"""Training on megatron-core: options (``TrainConfig``), the reference loop (``train``), the
forward/backward step, checkpoints and the Pai-Megatron-Patch argument mapping (docs/training.md).

Names are imported lazily, so ``qwen3_next_mcore.training.arguments`` (the CLI's parser) loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "arguments",
    "make_config": "arguments",
    "parse_args": "arguments",
    "TrainingDiverged": "loop",
    "train": "loop",
    "forward_backward": "step",
    "lm_loss_func": "step",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen3_next_mcore.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = ["TrainConfig", "TrainingDiverged", "forward_backward", "lm_loss_func", "make_config", "parse_args",
           "train"]
