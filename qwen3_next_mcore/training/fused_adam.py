"""torch's one-pass fused Adam kernel under megatron-core's optimizer when it falls back to torch.

megatron-core steps with Transformer Engine's or Apex's ``FusedAdam`` when either is installed. Without
them (our GPU machines have neither) it builds ``torch.optim.AdamW`` with torch's default implementation,
``foreach``: a dozen multi-tensor passes over the fp32 main weights, gradients and moments per step. torch
also has a fused AdamW kernel (one pass; CUDA, and CPU since torch 2.4) with the same update rule; megatron
just never asks for it. :func:`use_fused_adam` switches the torch optimizers megatron built to it; call
it again after loading a checkpoint (torch's ``load_state_dict`` takes the implementation flags from the
saved parameter groups).

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


def use_fused_adam(optimizer) -> str:
    """Switch megatron-core's torch Adam(W) optimizers to torch's fused kernel where every parameter is a
    floating-point tensor on a device the kernel supports; existing step counters move to the weights'
    device as float32, where the fused kernel reads them. Idempotent. Returns the
    implementation now in use ("fused", "foreach" or "not torch" when megatron chose TE/Apex), and logs it."""
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
    log.info("optimizer: torch AdamW, fused kernel (%d tensors, %s)", len(params),
             ", ".join(sorted({p.device.type for p in params})))
    return "fused"


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
        log.info("gradient clipping folded into torch's fused AdamW (grad_scale) where it steps")


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
