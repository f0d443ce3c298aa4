"""torch ``_foreach`` versions of the multi-tensor ops megatron-core's optimizer falls back on.

Without Transformer Engine or Apex (our GPU machines have neither), megatron-core's optimizer uses
``megatron.core.utils.local_multi_tensor_l2_norm`` for the gradient norm, which turns every gradient's
norm into a Python float (one host synchronisation per parameter tensor, hundreds per step), and
``local_multi_tensor_scale`` for clipping, a Python loop of two kernels per tensor; its bf16 optimizer also
copies the fp32 main weights into the model's bf16 weights one ``copy_`` per tensor. torch's ``_foreach``
ops do each of these in a few multi-tensor kernels and leave the norm on the device (megatron-core reads
it once afterwards). :func:`use_foreach_multi_tensor_ops` puts them in megatron-core's place; where TE or
Apex provides the ops, those stay.

It also supplies ``multi_tensor_scale_tensor`` (a scale read from a device tensor; Transformer Engine has
it, Apex and megatron-core's fallbacks do not). Its presence is megatron-core's signal to keep the gradient
norm on the device: ``get_grad_norm_fp32`` returns a tensor instead of calling ``.item()`` and clipping
takes a tensor coefficient, so the optimizer step no longer waits for the GPU to drain (which left it idle
while the host issued the next kernels). :func:`keep_chained_grad_norm_on_device` does the same for a
``ChainedOptimizer`` whose parts have different gradient-statistics groups (the dense and the expert
optimizers of an MoE model), where megatron-core combines the parts' norms with ``math.sqrt`` on the host.
"""

from __future__ import annotations

import functools
import logging
import math
import types

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


def foreach_scale_tensor(chunk_size: int, noop_flag, tensor_lists, scale: torch.Tensor) -> None:
    """TE's ``multi_tensor_scale_tensor``: ``dst[i] = src[i] * scale`` for ``tensor_lists = [src, dst]``, with
    ``scale`` a one-element tensor on the tensors' device (read there: no host synchronisation)."""
    src, dst = list(tensor_lists[0]), list(tensor_lists[1])
    if not src:
        return
    scale = scale.reshape(())
    if all(s is d for s, d in zip(src, dst)):
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
    if clip_grads.multi_tensor_scale_tensor_impl is None:
        clip_grads.multi_tensor_scale_tensor_impl = foreach_scale_tensor
        replaced.append(f"{clip_grads.__name__}.multi_tensor_scale_tensor_impl")
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


def keep_chained_grad_norm_on_device(optimizer) -> bool:
    """Give a megatron-core ``ChainedOptimizer`` whose parts have different gradient-statistics groups a
    ``get_grad_norm`` that combines the parts' norms on the device (the square root of the sum of their
    squares, megatron-core's formula) when they are tensors, rather than through ``bool()`` and
    ``math.sqrt`` on the host (each a synchronisation); parts answering floats or None keep megatron-core's
    host arithmetic. Returns whether it was installed (False for any other optimizer); idempotent."""
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    if not isinstance(optimizer, ChainedOptimizer) or len(optimizer.chained_optimizers) < 2:
        return False
    if not getattr(optimizer, "_qnm_norm_on_device", False):
        original = optimizer.get_grad_norm
        optimizer.get_grad_norm = types.MethodType(functools.partial(_chained_grad_norm, original), optimizer)
        optimizer._qnm_norm_on_device = True
    return True


@torch.no_grad()
def _chained_grad_norm(original, chained):
    if chained.grads_states_parallel_group_is_shared():
        return original()
    norms = [o.get_grad_norm() for o in chained.chained_optimizers]
    tensors = [n for n in norms if isinstance(n, torch.Tensor)]
    if not tensors or len(tensors) != len([n for n in norms if n is not None]):
        return math.sqrt(sum(float(n) ** 2 for n in norms if n))  # megatron-core's own arithmetic
    return torch.linalg.vector_norm(torch.stack([t.reshape(()).float() for t in tensors])).reshape(1)
