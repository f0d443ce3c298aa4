"""torch's one-pass fused Adam kernel under megatron-core's optimizer when it falls back to torch.

megatron-core steps with Transformer Engine's or Apex's ``FusedAdam`` when either is installed. Without
them (our GPU machines have neither) it builds ``torch.optim.AdamW`` with torch's default implementation,
``foreach``: a dozen multi-tensor passes over the fp32 main weights, gradients and moments per step. torch
also has a fused AdamW kernel (one pass; CUDA, and CPU since torch 2.4) with the same update rule; megatron
just never asks for it. :func:`use_fused_adam` switches the torch optimizers megatron built to it; call
it again after loading a checkpoint (torch's ``load_state_dict`` takes the implementation flags from the
saved parameter groups).

On CUDA (``kernel="auto"``) the step then runs :func:`qwen3_next_mcore.ops.adamw.adamw_multi_tensor`
instead of torch's kernel: the same update in one Triton pass that also writes megatron's bf16/fp16 model
weights, so megatron's separate main -> model copy is skipped after it (1.24x torch's fused AdamW + copy
over the proxy model's weights on an H100; docs/performance.md). torch's fused kernel stays where that
pass does not apply (CPU, L2-coupled Adam, amsgrad/maximize/capturable, tensor learning rates).

It also folds gradient clipping into the fused kernel. megatron-core clips by multiplying every fp32 main
gradient by ``max_norm / norm`` in place (one more read and write of all gradients, 3.4 ms per proxy step
on an H200, and most steps clip); the fused kernel can divide the gradients by a ``grad_scale`` as it
reads them (torch's AMP interface for fused optimizers). For parameters whose optimizer folds, megatron's
``clip_grad_by_total_norm_fp32`` records the coefficient on the parameter instead of scaling, and the
optimizer's step turns it into ``grad_scale``; anything else (TE/Apex or foreach optimizers, decoupled
gradients) is clipped by megatron as before. With the norm kept on the device (:mod:`.multi_tensor`) the
coefficient is a device tensor and becomes ``grad_scale`` on the device.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


def torch_adams(optimizer) -> list[torch.optim.Adam]:
    """The ``torch.optim.Adam``/``AdamW`` instances inside a megatron-core optimizer (a
    ``ChainedOptimizer`` or one ``MegatronOptimizer``); TE/Apex/offloading optimizers are not among them."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    inner = [getattr(p, "optimizer", None) for p in parts]
    return [o for o in inner if isinstance(o, torch.optim.Adam)]


def use_fused_adam(optimizer, kernel: str = "auto") -> str:
    """Switch megatron-core's torch Adam(W) optimizers to torch's fused kernel where every parameter is a
    floating-point tensor on a device the kernel supports; existing step counters move to the weights'
    device as float32, where the fused kernel reads them. Idempotent. Returns the
    implementation now in use ("fused", "foreach" or "not torch" when megatron chose TE/Apex), and logs it.

    ``kernel``: which one-pass kernel steps a fused optimizer: "torch" (torch's fused AdamW), "triton"
    (:func:`qwen3_next_mcore.ops.adamw.adamw_multi_tensor`, which also writes megatron's bf16/fp16 model
    weights in the same pass, so megatron's copy from the main weights is skipped; CUDA, decoupled
    weight decay, no amsgrad/maximize/capturable), or "auto" (the Triton one where it applies)."""
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"use_fused_adam: kernel must be 'auto', 'torch' or 'triton', got {kernel!r}")
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    adams = torch_adams(optimizer)
    if not adams:
        log.info("optimizer: megatron-core's own choice (%s)", type(optimizer).__name__)
        return "not torch"
    supported = set(_get_fused_kernels_supported_devices())
    params = [p for o in adams for g in o.param_groups for p in g["params"]]
    blockers = sorted({f"{p.device.type}/{p.dtype}" for p in params
                       if p.device.type not in supported or not p.is_floating_point()})
    if blockers or any(g.get("differentiable") for o in adams for g in o.param_groups):
        why = f"parameters on {', '.join(blockers)}" if blockers else "differentiable optimizer"
        log.info("optimizer: torch AdamW, foreach implementation (fused kernel not usable: %s)", why)
        return "foreach"
    for o in adams:
        for g in o.param_groups:
            g["foreach"], g["fused"] = False, True
        for p, state in o.state.items():
            if "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)
        _fold_clipping(o)
    blockers = _multi_tensor_blockers(adams)
    if kernel == "triton" and blockers:
        raise ValueError(f"use_fused_adam: kernel='triton' is not usable here: {blockers}")
    if kernel != "torch" and not blockers:
        copies = _use_multi_tensor_kernel(optimizer, adams)
        log.info("optimizer: AdamW, one Triton pass over %d tensors (qwen3_next_mcore.ops.adamw) writing %d "
                 "bf16/fp16 model weights", len(params), copies)
    else:
        for o in adams:
            setattr(o, _KERNEL, "torch")
        why = f" ({blockers})" if kernel == "auto" else " (asked for)"
        log.info("optimizer: torch AdamW, fused kernel (%d tensors, %s)%s", len(params),
                 ", ".join(sorted({p.device.type for p in params})), why if blockers or kernel == "torch" else "")
    return "fused"


_KERNEL = "_qnm_adamw_kernel"  # on each torch Adam: "torch" or "triton", the kernel its step runs
_COPIES = "_qnm_adamw_model_copies"  # {id(main weight): megatron's bf16/fp16 model weight}
_WROTE = "_qnm_adamw_wrote_model_params"  # set by a Triton step, consumed by megatron's copy


def _multi_tensor_blockers(adams) -> str:
    """Why the Triton multi-tensor AdamW cannot step these optimizers ("" when it can)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    for o in adams:
        for g in o.param_groups:
            decoupled = g.get("decoupled_weight_decay", isinstance(o, torch.optim.AdamW))
            if not decoupled and g.get("weight_decay", 0):
                return "Adam with L2 weight decay (not decoupled)"
            for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
                if g.get(flag):
                    return f"{flag}=True"
            if isinstance(g["lr"], torch.Tensor):
                return "a tensor learning rate"
            for p in g["params"]:
                if not (p.is_cuda and p.dtype == torch.float32):
                    return f"a {p.dtype} parameter on {p.device.type}"
    return ""


def _use_multi_tensor_kernel(optimizer, adams) -> int:
    """Route ``adams``' steps through the Triton kernel and let it write megatron's low-precision model
    weights (Float16OptimizerWithFloat16Params: ``float16_groups`` beside ``fp32_from_float16_groups``);
    returns how many it writes."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    copies = 0
    for adam in adams:
        setattr(adam, _KERNEL, "triton")
        setattr(adam, _COPIES, {})
        adam._qnm_adamw_plans = {}
    for part in parts:
        adam = getattr(part, "optimizer", None)
        if adam not in adams or type(part) is not Float16OptimizerWithFloat16Params:
            continue  # the distributed optimizer's shards keep megatron-core's copy
        mapping = getattr(adam, _COPIES)
        for models, mains in zip(part.float16_groups, part.fp32_from_float16_groups):
            for model, main in zip(models, mains):
                if model.dtype in (torch.bfloat16, torch.float16) and model.is_contiguous():
                    mapping[id(main)] = model
        if mapping and not getattr(part, "_qnm_copy_skips", False):
            part._copy_main_params_to_model_params = functools.partial(
                _copy_unless_written, adam, part._copy_main_params_to_model_params)
            part._qnm_copy_skips = True
        copies += len(mapping)
    return copies


def _copy_unless_written(adam, copy) -> None:
    """megatron-core's main -> model weight copy, skipped once after a Triton step that wrote every model
    weight already."""
    if getattr(adam, _WROTE, False):
        setattr(adam, _WROTE, False)
        return
    copy()


@torch.no_grad()
def _multi_tensor_step(adam: torch.optim.Adam, grad_scale: torch.Tensor | None) -> None:
    """``adam.step()`` as :func:`qwen3_next_mcore.ops.adamw.adamw_multi_tensor` per parameter group (the
    state initialised as torch's fused AdamW does), writing the model weights it knows."""
    from ..ops.adamw import adamw_multi_tensor

    mapping = getattr(adam, _COPIES)
    written = 0
    for index, group in enumerate(adam.param_groups):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        states = []
        for p in params:
            state = adam.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states.append(state)
        models = [mapping.get(id(p)) for p in params]
        written += sum(m is not None for m in models)
        beta1, beta2 = group["betas"]
        adamw_multi_tensor(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                           [s["exp_avg_sq"] for s in states], [s["step"] for s in states], lr=group["lr"],
                           beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                           grad_scale=grad_scale, model_params=models,
                           plan_cache=adam._qnm_adamw_plans.setdefault(index, {}))
    # megatron's copy is skipped only if it had nothing left to do (a weight without a gradient this step
    # was not stepped, and megatron copies every weight)
    setattr(adam, _WROTE, bool(mapping) and written == len(mapping))


# Attributes megatron-style on the main parameters: "this parameter's optimizer folds clipping" and the
# clip coefficient waiting for that optimizer's next step.
_FOLDS = "_qnm_fused_adam_folds_clipping"
_PENDING = "_qnm_pending_clip_coeff"


def _fold_clipping(adam: torch.optim.Adam) -> None:
    """Make ``adam`` (fused) take clipping coefficients from its parameters as ``grad_scale``; idempotent."""
    _install_deferred_clip()
    for g in adam.param_groups:
        for p in g["params"]:
            setattr(p, _FOLDS, True)
    if not getattr(adam, _FOLDS, False):
        adam.step = functools.partial(_step_with_clip_coeff, adam, adam.step)
        setattr(adam, _FOLDS, True)


def _step_with_clip_coeff(adam: torch.optim.Adam, step, *args, **kwargs):
    """``adam.step`` with the pending clip coefficients applied: one coefficient for every parameter with a
    gradient (megatron-core's case: one norm, one coefficient) becomes ``grad_scale = 1 / coeff``; mixed
    ones (some parameters clipped by another norm group, or not at all) are applied in place as megatron
    would, and the step runs unscaled. A coefficient may be a float or a one-element device tensor (the
    norm kept on the device, :mod:`.multi_tensor`); neither is read on the host here."""
    with_grad = [p for g in adam.param_groups for p in g["params"] if p.grad is not None]
    coeffs = [getattr(p, _PENDING, None) for p in with_grad]
    for p in with_grad:
        if hasattr(p, _PENDING):
            delattr(p, _PENDING)
    adam.grad_scale = None
    first = coeffs[0] if coeffs else None
    if first is not None and all(_same_coeff(c, first) for c in coeffs):
        device = with_grad[0].device
        if isinstance(first, torch.Tensor):
            adam.grad_scale = first.reshape(()).to(device=device, dtype=torch.float32).reciprocal()
        else:  # a fill on the device, not a copy from the host
            adam.grad_scale = torch.full((), 1.0 / first, dtype=torch.float32, device=device)
    else:
        groups: list[tuple[object, list[torch.Tensor]]] = []
        for p, c in zip(with_grad, coeffs):
            if c is not None:
                match = next((g for k, g in groups if _same_coeff(k, c)), None)
                if match is None:
                    groups.append((c, match := []))
                match.append(p.grad)
        for c, grads in groups:
            torch._foreach_mul_(grads, c.reshape(()) if isinstance(c, torch.Tensor) else c)
    try:
        if getattr(adam, _KERNEL, "torch") == "triton" and not args and not kwargs:
            return _multi_tensor_step(adam, adam.grad_scale)
        return step(*args, **kwargs)
    finally:
        adam.grad_scale = None


def _same_coeff(a, b) -> bool:
    """The same clip coefficient: the same tensor object (one per clipping call), or equal floats."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a == b


def _install_deferred_clip() -> None:
    """Put :func:`_deferred_clip` in place of megatron-core's ``clip_grad_by_total_norm_fp32`` where its
    optimizers call it; idempotent."""
    from megatron.core.optimizer import optimizer as mopt

    current = mopt.clip_grad_by_total_norm_fp32
    if getattr(current, "func", None) is not _deferred_clip:
        mopt.clip_grad_by_total_norm_fp32 = functools.partial(_deferred_clip, current)
        log.info("gradient clipping folded into the fused AdamW step (grad_scale) where it steps")


def _deferred_clip(megatron_clip, parameters, max_norm, total_norm, use_decoupled_grad: bool = False):
    """megatron-core's ``clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm)``: when every
    parameter with a gradient belongs to a folding fused Adam, record ``max_norm / (total_norm + 1e-6)`` on
    them instead of scaling: a float coefficient only if it is below 1 (megatron scales only then), a
    tensor norm's coefficient clamped to at most 1 on the device (as megatron does it). Otherwise
    megatron's own clipping."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    with_grad = [p for p in params if p.grad is not None]
    if use_decoupled_grad or not with_grad or not all(getattr(p, _FOLDS, False) for p in with_grad):
        return megatron_clip(parameters, max_norm, total_norm, use_decoupled_grad)
    if isinstance(total_norm, torch.Tensor):
        coeff = (max_norm / (total_norm.float() + 1.0e-6)).clamp_max(1.0)
    else:
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff >= 1.0:
            return None
    for p in with_grad:
        setattr(p, _PENDING, coeff)
    return None
