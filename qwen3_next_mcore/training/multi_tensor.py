"""torch ``_foreach`` versions of the multi-tensor ops megatron-core's optimizer falls back on.

Without Transformer Engine or Apex (our GPU machines have neither), megatron-core's optimizer uses
``megatron.core.utils.local_multi_tensor_l2_norm`` for the gradient norm, which turns every gradient's
norm into a Python float (one host synchronisation per parameter tensor, hundreds per step), and
``local_multi_tensor_scale`` for clipping, a Python loop of two kernels per tensor; its bf16 optimizer also
copies the fp32 main weights into the model's bf16 weights one ``copy_`` per tensor. torch's ``_foreach``
ops do each of these in a few multi-tensor kernels and leave the norm on the device (megatron-core reads
it once afterwards). :func:`use_foreach_multi_tensor_ops` puts them in megatron-core's place; where TE or
Apex provides the ops, those stay.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def foreach_l2_norm(chunk_size: int, noop_flag, tensor_lists, per_tensor: bool, *args):
    """Apex ``amp_C.multi_tensor_l2norm``'s contract for ``tensor_lists = [tensors]``: returns (the l2 norm
    of all of them together as a ``[1]`` fp32 tensor on their device, None). ``per_tensor`` must be False."""
    if per_tensor:
        raise NotImplementedError("foreach_l2_norm: per-tensor norms are not needed by megatron-core's fallback")
    tensors = list(tensor_lists[0])
    if not tensors:
        return torch.zeros(1, dtype=torch.float32), None
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def foreach_scale(chunk_size: int, noop_flag, tensor_lists, scale: float) -> None:
    """Apex ``amp_C.multi_tensor_scale``: ``dst[i] = src[i] * scale`` for ``tensor_lists = [src, dst]`` (dst may
    be src itself, or tensors of another dtype)."""
    src, dst = list(tensor_lists[0]), list(tensor_lists[1])
    if not src:
        return
    if scale == 1.0:
        torch._foreach_copy_(dst, src)
    elif all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def foreach_copy_this_to_that(this: list[torch.Tensor], that: list[torch.Tensor], overflow_buf=None) -> None:
    """megatron-core's ``_multi_tensor_copy_this_to_that``: ``that[i].copy_(this[i])`` for all i, in
    multi-tensor kernels (megatron loops over the tensors for bf16)."""
    if this:
        torch._foreach_copy_(list(that), list(this))


def use_foreach_multi_tensor_ops() -> list[str]:
    """Replace megatron-core's local multi-tensor fallbacks (only those) with the ``_foreach`` versions
    above; idempotent. Returns the replaced names, and logs them."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mopt

    replaced = []
    for module, name, local, ours in (
        (clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm, foreach_l2_norm),
        (clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale, foreach_scale),
        (mopt, "multi_tensor_scale_impl", utils.local_multi_tensor_scale, foreach_scale),
    ):
        if getattr(module, name) is local:
            setattr(module, name, ours)
            replaced.append(f"{module.__name__}.{name}")
    if mopt._multi_tensor_copy_this_to_that is not foreach_copy_this_to_that:
        mopt._multi_tensor_copy_this_to_that = foreach_copy_this_to_that
        replaced.append(f"{mopt.__name__}._multi_tensor_copy_this_to_that")
    if replaced:
        log.info("megatron-core's multi-tensor fallbacks replaced by torch _foreach ops: %s", ", ".join(replaced))
    return replaced
