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
"""

from __future__ import annotations

import functools
import logging
import types

import torch

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


def use_wgrad_accumulation_fusion(model) -> int:
    """Turn on megatron-core's gradient-accumulation fusion for every ``ColumnParallelLinear`` /
    ``RowParallelLinear`` under ``model`` (a megatron-core DDP wrapper or its module) whose weight has an
    fp32 ``main_grad`` on CUDA; supply the GEMM (see the module docstring) when apex's extension is missing.
    Returns how many linears use it (0 on CPU, logged with the reason)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, layers

    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
               and m.weight is not None and getattr(m.weight, "main_grad", None) is not None
               and m.weight.main_grad.dtype == torch.float32]
    if not linears:
        return 0
    why_not = fused_wgrad_unavailable(linears[0].weight.device)
    if why_not is not None:
        log.info("weight gradients: bf16 GEMM then added to the fp32 main grads (fused accumulation %s)", why_not)
        return 0
    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = _TORCH_EXTENSION
        layers._grad_accum_fusion_available = True
    source = ("torch.addmm(out_dtype=float32)" if layers.fused_weight_gradient_mlp_cuda is _TORCH_EXTENSION
              else "apex's fused_weight_gradient_mlp_cuda")
    for m in linears:
        m.gradient_accumulation_fusion = True
    log.info("weight gradients: accumulated into the fp32 main grads by the GEMM (%s) in %d linears",
             source, len(linears))
    return len(linears)
