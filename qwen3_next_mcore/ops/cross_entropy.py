"""Vocab-parallel cross-entropy over the output layer's logits, without fp32 copies of them.

Qwen3-Next's vocabulary has 151,936 entries, so the logits of one 2 x 4096 micro-batch are 1.25 G values
(2.5 GB in bf16). megatron-core's cross-entropies (``tensor_parallel.vocab_parallel_cross_entropy`` and its
``native`` fusion) turn them into fp32 copies, keep the fp32 softmax (5 GB) for the backward and return a
bf16 gradient whatever the input; on an H100 its native fusion took 17.2 ms of a 148 ms proxy training step
(docs/performance.md). This one computes the same loss from the logits as they are: the row maximum, the
sum of exponentials and the target's logit in one pass over them (compiled: one online-softmax reduction;
the ranks that hold the vocabulary's slices then combine their maxima and rescaled sums), keeps the logits
and the per-row log-sum-exp for the backward, and writes the gradient ``(softmax - one_hot(target)) *
dloss`` in the logits' dtype in one pass. On CUDA each pass is ``torch.compile`` of the eager code below
(backend "compile", logged); elsewhere the eager code runs (backend "torch").

Targets outside this rank's vocabulary slice (other ranks' ids) contribute no target logit here; ids in
no rank's slice (negative ones such as -100) get megatron-core's value, log(sum(exp(logits - max))), and
no gradient toward any target; the loss mask drops them later.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .backends import compiled_op_backend, compiled_or_eager, env_for


def _row_stats(logits: torch.Tensor, target: torch.Tensor, start: int) -> torch.Tensor:
    """One pass over this rank's logits ``[N, V_local]``: ``[3, N]`` fp32 rows of the row maximum m, the sum
    of exp(logits - m), and the target's logit (0 where the target is not in this slice). Compiled, the
    maximum and the sum become one online-softmax reduction (Inductor), so the logits are read once."""
    x = logits.float()
    row_max = x.amax(-1, keepdim=True)  # keepdim: the form Inductor's online-softmax pattern matches
    sum_exp = torch.exp(x - row_max).sum(-1, keepdim=True)
    local = target - start
    mine = (local >= 0) & (local < x.shape[-1])
    picked = x.gather(-1, torch.where(mine, local, 0).unsqueeze(-1)).squeeze(-1)
    return torch.stack((row_max.squeeze(-1), sum_exp.squeeze(-1), torch.where(mine, picked, 0.0)))


def _logits_grad(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, dloss: torch.Tensor, start: int):
    x = logits.float()
    local = (target - start).unsqueeze(-1)
    columns = torch.arange(x.shape[-1], device=x.device)
    softmax = torch.exp(x - lse.unsqueeze(-1))
    return ((softmax - (columns == local).float()) * dloss.float().unsqueeze(-1)).to(logits.dtype)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, backend):
        if group is not None and dist.get_world_size(group) == 1:
            group = None  # the whole vocabulary is here: nothing to reduce
        rows = logits.reshape(-1, logits.shape[-1])
        flat_target = target.reshape(-1)
        start = 0 if group is None else rows.shape[-1] * dist.get_rank(group)
        row_max, sum_exp, picked = compiled_or_eager(_row_stats, backend)(rows, flat_target, start)
        if group is not None:  # each rank's sum is relative to its own maximum: rescale to the global one
            local_max = row_max
            row_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
            sum_exp, picked = _all_reduce(torch.stack((sum_exp * torch.exp(local_max - row_max), picked)),
                                          dist.ReduceOp.SUM, group)
        vocab = rows.shape[-1] * (1 if group is None else dist.get_world_size(group))
        in_vocab = (flat_target >= 0) & (flat_target < vocab)
        log_sum_exp = torch.log(sum_exp)  # of the logits minus their row maximum
        ctx.save_for_backward(logits, flat_target, log_sum_exp + row_max)
        ctx.start, ctx.backend = start, backend
        return (log_sum_exp - torch.where(in_vocab, picked - row_max, 0.0)).view(target.shape)

    @staticmethod
    def backward(ctx, dloss):
        logits, flat_target, lse = ctx.saved_tensors
        rows = logits.reshape(-1, logits.shape[-1])
        grad = compiled_or_eager(_logits_grad, ctx.backend)(rows, flat_target, lse, dloss.reshape(-1), ctx.start)
        return grad.view(logits.shape), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None, *,
                                 backend: str | None = None) -> torch.Tensor:
    """Per-token cross-entropy of ``logits`` ``[..., V_local]`` (any float dtype; this rank's contiguous slice
    of the vocabulary when ``group``, the tensor-parallel group, has several ranks) against ``target``
    ``[...]`` (int64 vocabulary ids). Returns fp32 ``[...]``; the logits' gradient has their dtype.

    backend: None/"auto" (CUDA -> "compile", else "torch"), "torch" or "compile"; the choice is logged once."""
    if logits.shape[:-1] != target.shape or not logits.is_floating_point() or target.is_floating_point():
        raise ValueError(f"vocab_parallel_cross_entropy: expected float logits [..., V] and integer target [...] "
                         f"with the same leading dims, got logits {logits.dtype} {list(logits.shape)} and target "
                         f"{target.dtype} {list(target.shape)}")
    name = compiled_op_backend("cross_entropy", env_for(logits), backend)
    return _VocabParallelCrossEntropy.apply(logits, target, group, name)
