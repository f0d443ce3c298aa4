"""AdamW over many fp32 tensors in one pass that also writes the bf16/fp16 copy of each updated weight.

Mixed-precision training keeps fp32 main weights, steps them, then copies them into the model's bf16
weights. torch's fused AdamW (what megatron-core's optimizer runs without Transformer Engine or Apex,
once :mod:`qwen3_next_mcore.training.fused_adam` switches it on) reads and writes the weight and both
moments and reads the gradient (28 bytes per weight), and the copy is a second pass (6 more). On an H100
that was 20.1 ms plus 3.5 ms per proxy training step for 1.57 B weights, 2.2 TB/s of the card's 3.35.
:func:`adamw_multi_tensor` is one Triton pass over all tensors of a parameter group (a table of
their addresses, each program one block of one tensor; whole blocks unmasked with 16-byte vector loads,
each tensor's last partial block in a second launch) that writes the low-precision weight as it writes
the fp32 one (30 bytes per weight), and it leaves the gradients as they are (torch's kernel writes back
the gradients it divided by ``grad_scale``; megatron-core clears them before the next use). Over the
proxy model's weights on an H100: 16.84 ms against 20.84 ms for torch's fused AdamW + the copy
(``qwen3-next-mcore bench optimizer-step``, docs/performance.md).

Same update as ``torch.optim.AdamW`` (decoupled weight decay, bias correction from each tensor's own
step count, ``grad_scale`` dividing the gradient as torch's fused kernels do); computed in fp32 where
torch's CUDA kernel computes in double and rounds to fp32 (a few units in the last place apart), with
the scalars (``lr * weight_decay``, ``1 - beta``, the bias corrections) made in float64 and rounded once.
:func:`adamw_reference` is the plain torch version (fp64 inside, one rounding) the tests compare with.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .backends import triton_interpreted

BLOCK = 4096  # weights per program: 16 per thread at 8 warps


def adamw_reference(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                    exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], *, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float, grad_scale: torch.Tensor | None = None,
                    model_params: Sequence[torch.Tensor | None] | None = None) -> None:
    """One AdamW step in place, tensor by tensor: ``steps`` (0-d fp32 counters) += 1, then the weight
    ``params[i]`` (fp32), moments ``exp_avgs[i]``/``exp_avg_sqs[i]`` (fp32) updated from ``grads[i]``
    (fp32, divided by ``grad_scale`` if given, a one-element tensor), computed in float64 and rounded once;
    ``model_params[i]`` (bf16/fp16 or None) receives the updated weight rounded to its dtype."""
    for i, (p, g, m, v, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True)):
        step += 1
        t = float(step)
        g64 = g.double() / grad_scale.double().reshape(()) if grad_scale is not None else g.double()
        p64 = p.double() * (1 - lr * weight_decay)
        m64 = beta1 * m.double() + (1 - beta1) * g64
        v64 = beta2 * v.double() + (1 - beta2) * g64 * g64
        denom = v64.sqrt() / (1 - beta2 ** t) ** 0.5 + eps
        p64 = p64 - lr / (1 - beta1 ** t) * m64 / denom
        p.copy_(p64)
        m.copy_(m64)
        v.copy_(v64)
        if model_params is not None and model_params[i] is not None:
            model_params[i].copy_(p)


@functools.cache
def _get_kernel():
    """The Triton kernel (Triton is imported only when it is first needed)."""
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_kernel(tensor_of_block, block_in_tensor, numels, p_base, p_off, g_base, g_off, m_base, m_off,
                     v_base, v_off, w_base, w_off, w_has, step_sizes, bias2_sqrts, grad_scale, lr_wd, beta1,
                     one_minus_beta1, beta2, one_minus_beta2, eps, HAS_SCALE: tl.constexpr, WRITE_MODEL: tl.constexpr, UNIT: tl.constexpr,
                     W_UNIT: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr):
        # The tables hold each tensor's offset from a base tensor of its role, in units of UNIT elements
        # (16 bytes: 4 fp32, W_UNIT = 8 bf16, when every address is 16-byte aligned; else 1):
        # p_base + p_off[t] * UNIT is tensor t's weight, and so on. Offsets that are known
        # multiples of 16 bytes from an aligned base, and (EVEN: blocks entirely inside their tensor) no
        # mask, let Triton use 16-byte vector loads and stores.
        pid = tl.program_id(0)
        t = tl.load(tensor_of_block + pid)
        offs = tl.load(block_in_tensor + pid).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        if EVEN:
            mask, other = None, None
        else:
            mask, other = offs < tl.load(numels + t), 0.0
        p_ptr = p_base + tl.load(p_off + t) * UNIT + offs
        g_ptr = g_base + tl.load(g_off + t) * UNIT + offs
        m_ptr = m_base + tl.load(m_off + t) * UNIT + offs
        v_ptr = v_base + tl.load(v_off + t) * UNIT + offs
        # lr / (1 - beta1^step) and sqrt(1 - beta2^step) of this tensor's step, made in float64 on the device
        # (in fp32, 1 - 0.999^step loses four digits to cancellation)
        step_size = tl.load(step_sizes + t)
        bias2_sqrt = tl.load(bias2_sqrts + t)
        p = tl.load(p_ptr, mask=mask, other=other)
        g = tl.load(g_ptr, mask=mask, other=other)
        m = tl.load(m_ptr, mask=mask, other=other)
        v = tl.load(v_ptr, mask=mask, other=other)
        if HAS_SCALE:
            g = g / tl.load(grad_scale)
        p = p - lr_wd * p
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * g * g
        p = p - step_size * m / (tl.sqrt(v) / bias2_sqrt + eps)
        tl.store(p_ptr, p, mask=mask)
        tl.store(m_ptr, m, mask=mask)
        tl.store(v_ptr, v, mask=mask)
        if WRITE_MODEL:  # noqa: SIM102 (a compile-time branch around a run-time one: Triton needs two ifs)
            if tl.load(w_has + t) != 0:  # this tensor has a low-precision copy
                w_ptr = w_base + tl.load(w_off + t) * W_UNIT + offs
                tl.store(w_ptr, p.to(w_base.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    return adamw_kernel


@dataclass
class _Plan:
    """The launch tables of one parameter group (device tensors), valid while its tensors stay put:
    ``work[EVEN]`` = (tensor of each block, block index in it) for the blocks entirely inside their
    tensor (EVEN=True) and for the last, partial block of each tensor (EVEN=False)."""

    work: dict[bool, tuple[torch.Tensor, torch.Tensor]]
    numels: torch.Tensor
    offsets: dict[str, torch.Tensor]
    bases: dict[str, torch.Tensor]
    unit: int
    w_unit: int
    write_model: bool


def _offsets(tensors: Sequence[torch.Tensor | None], base: torch.Tensor, unit_bytes: int) -> list[int]:
    """Each tensor's start from ``base``'s in units of ``unit_bytes`` (0 for None)."""
    out = []
    for t in tensors:
        if t is None:
            out.append(0)
            continue
        delta = t.data_ptr() - base.data_ptr()
        if delta % unit_bytes:
            raise ValueError(f"adamw_multi_tensor: a tensor starts {delta} bytes from the first one of its kind, "
                             f"not a multiple of {unit_bytes}")
        out.append(delta // unit_bytes)
    return out


def _plan(params, grads, exp_avgs, exp_avg_sqs, steps, model_params) -> _Plan:
    roles = {"p": params, "g": grads, "m": exp_avgs, "v": exp_avg_sqs}
    lows = [w for w in model_params if w is not None]
    if lows:
        roles["w"] = model_params
    device = params[0].device
    aligned = all(t.data_ptr() % 16 == 0 for ts in roles.values() for t in ts if t is not None)
    bases = {name: next(t for t in ts if t is not None) for name, ts in roles.items()}
    # offsets may be negative (another allocation below the base)
    offsets = {name: _offsets(ts, bases[name], 16 if aligned else bases[name].element_size())
               for name, ts in roles.items()}
    offsets["has_w"] = [int(w is not None) for w in model_params]
    numels = [p.numel() for p in params]
    full = [(i, b) for i, n in enumerate(numels) for b in range(n // BLOCK)]
    tail = [(i, n // BLOCK) for i, n in enumerate(numels) if n % BLOCK]

    def dev(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=False)

    work = {even: (dev([i for i, _ in blocks], torch.int32), dev([b for _, b in blocks], torch.int32))
            for even, blocks in ((True, full), (False, tail)) if blocks}
    return _Plan(work=work, numels=dev(numels, torch.int64),
                 offsets={name: dev(o, torch.int64) for name, o in offsets.items()}, bases=bases,
                 unit=4 if aligned else 1, w_unit=8 if aligned else 1, write_model=bool(lows))


def adamw_multi_tensor(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                       steps: Sequence[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                       weight_decay: float, grad_scale: torch.Tensor | None = None,
                       model_params: Sequence[torch.Tensor | None] | None = None,
                       plan_cache: dict | None = None) -> None:
    """:func:`adamw_reference`'s step (same arguments and effects) as two Triton kernel launches (the
    blocks inside a tensor, unmasked, and each tensor's last partial block) plus one ``_foreach_add_`` for
    the step counters. CUDA tensors (CPU ones only under Triton's interpreter, ``TRITON_INTERPRET=1``,
    which the tests use; it rounds to bf16 toward zero); every tensor contiguous, params/grads/moments fp32
    of equal sizes, ``model_params`` entries bf16/fp16 (one dtype) of the same size or None. The launch
    tables (a host-to-device copy) are kept in ``plan_cache`` (the caller's dict; an optimizer keeps one)
    per set of tensor addresses and reused; without it they are built for this call."""
    if not params:
        return
    model_params = list(model_params) if model_params is not None else [None] * len(params)
    interpreted = triton_interpreted()  # Triton's CPU interpreter (tests)
    for i, (p, g, m, v, s, w) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps, model_params,
                                               strict=True)):
        on_device = p.is_cuda or (interpreted and p.device.type == "cpu")
        if not (on_device and p.dtype == g.dtype == m.dtype == v.dtype == s.dtype == torch.float32):
            raise ValueError(f"adamw_multi_tensor: tensor {i}: fp32 CUDA weights, gradients, moments and step "
                             f"counters expected, got {p.dtype}/{g.dtype}/{m.dtype}/{v.dtype}/{s.dtype} on "
                             f"{p.device}")
        if not (p.numel() == g.numel() == m.numel() == v.numel() and s.numel() == 1):
            raise ValueError(f"adamw_multi_tensor: tensor {i}: sizes differ ({p.numel()}, {g.numel()}, "
                             f"{m.numel()}, {v.numel()}; step {s.numel()})")
        if not all(t.is_contiguous() for t in (p, g, m, v)) or (w is not None and not w.is_contiguous()):
            raise ValueError(f"adamw_multi_tensor: tensor {i} is not contiguous")
        if w is not None and (w.numel() != p.numel() or w.dtype not in (torch.bfloat16, torch.float16)):
            raise ValueError(f"adamw_multi_tensor: tensor {i}: the low-precision copy must be bf16/fp16 of "
                             f"{p.numel()} elements, got {w.dtype} of {w.numel()}")
    if len({w.dtype for w in model_params if w is not None}) > 1:
        raise ValueError("adamw_multi_tensor: low-precision copies of more than one dtype in one call")
    key = tuple(t.data_ptr() for ts in (params, grads, exp_avgs, exp_avg_sqs, steps) for t in ts) + tuple(
        0 if w is None else w.data_ptr() for w in model_params)
    plan = None if plan_cache is None else plan_cache.get(key)
    if plan is None:
        plan = _plan(params, grads, exp_avgs, exp_avg_sqs, steps, model_params)
        if plan_cache is not None:
            plan_cache.clear()  # the tensors moved: the old tables point at freed memory
            plan_cache[key] = plan
    torch._foreach_add_(list(steps), 1.0)
    # the scalars the kernel takes: rounded to fp32 from float64 (Triton passes Python floats as fp32;
    # 1 - 0.999 in fp32 arithmetic on fp32(0.999) is off by 1.3e-5)
    step64 = torch.stack(list(steps)).double()
    step_sizes = (lr / (1.0 - torch.pow(beta1, step64))).float()
    bias2_sqrts = torch.sqrt(1.0 - torch.pow(beta2, step64)).float()
    b, o = plan.bases, plan.offsets
    w_base, w_off = (b["w"], o["w"]) if plan.write_model else (b["p"], o["p"])
    scale = grad_scale.reshape(1).to(torch.float32) if grad_scale is not None else b["p"]
    for even, (tensor_of_block, block_in_tensor) in plan.work.items():
        _get_kernel()[(tensor_of_block.numel(),)](
            tensor_of_block, block_in_tensor, plan.numels, b["p"], o["p"], b["g"], o["g"], b["m"], o["m"], b["v"],
            o["v"], w_base, w_off, o["has_w"], step_sizes, bias2_sqrts, scale, float(lr * weight_decay),
            float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps),
            HAS_SCALE=grad_scale is not None, WRITE_MODEL=plan.write_model, UNIT=plan.unit, W_UNIT=plan.w_unit,
            EVEN=even, BLOCK=BLOCK, num_warps=8)
