"""Weight gradients accumulated into the fp32 main gradients by the GEMM itself, without apex.

megatron-core's linears can add their weight gradient straight into the fp32 ``main_grad`` that its
``DistributedDataParallel`` keeps for every parameter (``gradient_accumulation_fusion``), but only through
apex's ``fused_weight_gradient_mlp_cuda`` extension, which our GPU machines (and most pip installs) lack.
Without it each linear writes a bf16 weight gradient that DDP's hook then adds to ``main_grad``: one more
pass over every weight each step (about 1.9 ms of a 102 ms proxy step on an H100 for the dense weights,
docs/performance.md) and a wgrad rounded to bf16 before it is accumulated. torch's
``addmm(..., out_dtype=torch.float32)`` on CUDA is the same fused GEMM (bf16 inputs, fp32 accumulator read
and written in place), so :func:`use_wgrad_accumulation_fusion` supplies megatron-core the function it
calls from apex's extension for fp32 main grads and turns the fusion on for the linears whose weights
DDP gave an fp32 ``main_grad``. Modules outside DDP keep the plain path (megatron-core's fused path needs ``main_grad``).

Where apex's extension is installed, megatron-core's own import is kept and used.

The word embedding's weight gradient has the same problem at a larger scale: torch's embedding backward
writes a dense bf16 ``[vocab, hidden]`` gradient (311 M values for Qwen3-Next's vocabulary, almost all
zero: a batch touches a few thousand rows) that DDP's hook then adds to the fp32 ``main_grad`` in full.
:class:`MainGradVocabParallelEmbedding` adds the looked-up rows' gradients straight into ``main_grad``
(:func:`embedding_rows_into_main_grad`: one sorted ``index_put_`` with accumulation, deterministic, fp32
sums, no bf16 rounding); :func:`use_wgrad_accumulation_fusion` turns it on, on any device, for the
embeddings whose weight DDP gave an fp32 ``main_grad``, and the same for our grouped experts' two stacked
weights (their backward adds its grouped-GEMM weight gradients with one vectorised kernel:
:mod:`qwen3_next_mcore.layers.grouped_experts`).
"""

from __future__ import annotations

import functools
import logging
import types

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import VocabParallelEmbedding

log = logging.getLogger(__name__)


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` in one GEMM: total_input ``[tokens, in]`` and grad_output
    ``[tokens, out]`` bf16/fp16 (CUDA), main_grad ``[out, in]`` fp32, updated in place (fp32 accumulation,
    no bf16 rounding of the product)."""
    torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)


# what megatron-core calls of apex's extension for fp32 main grads (the only ones we turn the fusion on for)
_TORCH_EXTENSION = types.SimpleNamespace(wgrad_gemm_accum_fp32=wgrad_gemm_accum_fp32)


def fused_wgrad_unavailable(device: torch.device) -> str | None:
    """Why the fused wgrad GEMM cannot run on ``device`` (None when it can): it needs CUDA and a torch whose
    ``addmm`` takes ``out_dtype`` with an fp32 accumulator; checked once on small matrices against fp32."""
    if device.type != "cuda":
        return f"needs CUDA (device {device})"
    return _probe(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache  # once per device
def _probe(index: int) -> str | None:
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(24, 40, generator=g)
    x, dy = (torch.randn(64, n, generator=g).to(torch.bfloat16) for n in (40, 24))
    want = acc + dy.float().t() @ x.float()
    dev = torch.device("cuda", index)
    try:
        got = acc.to(dev)
        wgrad_gemm_accum_fp32(x.to(dev), dy.to(dev), got)
        err = float((got.cpu() - want).abs().max())
        reason = None if err < 1e-3 else f"torch.addmm(out_dtype=float32) differs from fp32 by {err:.2e}"
    except (RuntimeError, TypeError) as e:
        reason = f"torch.addmm(out_dtype=float32) failed: {e}"
    return reason


class _RowsIntoMainGrad(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward adds into ``weight.main_grad`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        embedding_rows_into_main_grad(weight.main_grad, ids, grad)
        weight.grad_added_to_main_grad = True
        return None, main_grad_placeholder(weight)


def main_grad_placeholder(weight: torch.Tensor) -> torch.Tensor:
    """What a backward that added its weight gradient into ``weight.main_grad`` returns to autograd for
    it, megatron-core's fused linears' contract: uninitialised memory, which DDP's hook drops (it sees
    ``grad_added_to_main_grad``), or zeros where megatron-core marked the weight ``zero_out_wgrad`` (a
    weight used twice on one pipeline stage: the embedding with MTP or tied output weights), whose
    summed gradient DDP's hook adds (then only the other use's plain gradient)."""
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


def embedding_rows_into_main_grad(main_grad: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor) -> None:
    """``main_grad[ids[i]] += grad[i]`` for every looked-up token, repeated ids summed: main_grad
    ``[vocab, hidden]`` fp32 (updated in place), ids ``[...]`` int, grad ``[..., hidden]`` any float dtype
    (converted to main_grad's). One ``index_put_`` with accumulation: sorted by id and summed in that
    order (deterministic on CPU and CUDA, no atomics)."""
    main_grad.index_put_((ids.reshape(-1),), grad.reshape(-1, grad.shape[-1]).to(main_grad.dtype),
                         accumulate=True)


class MainGradVocabParallelEmbedding(VocabParallelEmbedding):
    """megatron-core's ``VocabParallelEmbedding`` whose training lookup adds its weight gradient into the
    fp32 ``weight.main_grad`` (:func:`embedding_rows_into_main_grad`) instead of returning a dense one.

    The forward is megatron-core 0.19's for a plain weight (tensor-parallel vocabulary masking, the
    tensor-parallel reduction or sequence-parallel reduce-scatter), with the lookup replaced; evaluation,
    no-grad calls and generalized-TP weights run megatron-core's forward unchanged.
    :func:`use_wgrad_accumulation_fusion` switches DDP-wrapped embeddings to this class."""

    def forward(self, input_):
        if not (self.training and torch.is_grad_enabled() and self.gtp_remat_size <= 1):
            return super().forward(input_)
        from megatron.core.tensor_parallel.mappings import (
            reduce_from_tensor_model_parallel_region,
            reduce_scatter_to_sequence_parallel_region,
        )

        tp = self.tp_group.size()
        if tp > 1:
            input_mask = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            masked_input = input_.clone() - self.vocab_start_index
            masked_input[input_mask] = 0
        else:
            masked_input = input_
        output_parallel = _RowsIntoMainGrad.apply(masked_input, self.weight)
        if tp > 1:
            output_parallel[input_mask, :] = 0.0  # (their gradient rows are zeroed before the backward)
        if self.reduce_scatter_embeddings:  # [b, s, h] -> [s, b, h], then the sequence-parallel split
            return reduce_scatter_to_sequence_parallel_region(output_parallel.transpose(0, 1).contiguous(),
                                                              group=self.tp_group)
        if tp > 1:
            return reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)
        return output_parallel


def _has_fp32_main_grad(p) -> bool:
    return p is not None and getattr(p, "main_grad", None) is not None and p.main_grad.dtype == torch.float32


def use_wgrad_accumulation_fusion(model) -> dict[str, int]:
    """Make the weight gradients of ``model`` (a megatron-core DDP wrapper or its module) go straight into
    their fp32 ``main_grad``: on CUDA megatron-core's gradient-accumulation fusion for every
    ``ColumnParallelLinear`` / ``RowParallelLinear`` (the GEMM supplied when apex's extension is missing,
    see the module docstring); on any device :class:`MainGradVocabParallelEmbedding` for every
    ``VocabParallelEmbedding`` and ``wgrad_into_main_grad`` for our grouped experts
    (:class:`~qwen3_next_mcore.layers.grouped_experts.GroupedGemmExperts`). Only modules whose weights have
    an fp32 ``main_grad`` are changed. Returns
    how many of each were switched (logged, with the reason where the linears' fusion is off)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, layers

    from ..layers.grouped_experts import GroupedGemmExperts

    modules = list(model.modules())
    linears = [m for m in modules if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
               and _has_fp32_main_grad(m.weight)]
    embeddings = [m for m in modules if isinstance(m, VocabParallelEmbedding) and _has_fp32_main_grad(m.weight)]
    for m in embeddings:
        m.__class__ = MainGradVocabParallelEmbedding  # (a subclass: only the training lookup differs)
    experts = [m for m in modules if isinstance(m, GroupedGemmExperts)
               and _has_fp32_main_grad(m.weight1) and _has_fp32_main_grad(m.weight2)]
    for m in experts:
        m.wgrad_into_main_grad = True
    if embeddings or experts:
        log.info("weight gradients: added into the fp32 main grads by the backward in %d embeddings (the "
                 "looked-up rows, index_put_) and %d grouped experts", len(embeddings), len(experts))
    done = {"linears": 0, "embeddings": len(embeddings), "experts": len(experts)}
    if not linears:
        return done
    why_not = fused_wgrad_unavailable(linears[0].weight.device)
    if why_not is not None:
        log.info("weight gradients: bf16 GEMM then added to the fp32 main grads (fused accumulation %s)", why_not)
        return done
    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = _TORCH_EXTENSION
        layers._grad_accum_fusion_available = True
    source = ("torch.addmm(out_dtype=float32)" if layers.fused_weight_gradient_mlp_cuda is _TORCH_EXTENSION
              else "apex's fused_weight_gradient_mlp_cuda")
    for m in linears:
        m.gradient_accumulation_fusion = True
    log.info("weight gradients: accumulated into the fp32 main grads by the GEMM (%s) in %d linears",
             source, len(linears))
    done["linears"] = len(linears)
    return done
