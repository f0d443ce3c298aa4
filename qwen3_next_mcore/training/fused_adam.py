"""torch's one-pass fused Adam kernel under megatron-core's optimizer when it falls back to torch.

megatron-core steps with Transformer Engine's or Apex's ``FusedAdam`` when either is installed. Without
them (our GPU machines have neither) it builds ``torch.optim.AdamW`` with torch's default implementation,
``foreach``: a dozen multi-tensor passes over the fp32 main weights, gradients and moments per step. torch
also has a fused AdamW kernel (one pass; CUDA, and CPU since torch 2.4) with the same update rule; megatron
just never asks for it. :func:`use_fused_adam` switches the torch optimizers megatron built to it; call
it again after loading a checkpoint (torch's ``load_state_dict`` takes the implementation flags from the
saved parameter groups).
"""

from __future__ import annotations

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
    log.info("optimizer: torch AdamW, fused kernel (%d tensors, %s)", len(params),
             ", ".join(sorted({p.device.type for p in params})))
    return "fused"
