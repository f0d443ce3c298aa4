"""Training building blocks on megatron-core: the forward/backward step (more in later modules)."""

from .step import forward_backward, lm_loss_func

__all__ = ["forward_backward", "lm_loss_func"]
