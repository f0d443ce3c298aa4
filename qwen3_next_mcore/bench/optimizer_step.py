"""``optimizer-step``: one AdamW step over the ``proxy`` model's weights (fp32 main weights, gradients and
moments, then the bf16 model weights), the way mixed-precision training does it, candidate by candidate:

- megatron-core's default without Transformer Engine or Apex: torch's ``foreach`` AdamW, then a
  ``_foreach_copy_`` to the bf16 weights (megatron-core copies tensor by tensor; ours replaced that);
- torch's fused AdamW kernel, then the same copy (what training ran before ``ops/adamw``);
- ours: :func:`qwen3_next_mcore.ops.adamw.adamw_multi_tensor`, one pass writing the bf16 weights too.

Correctness first: each candidate steps the same initial state once and every tensor is compared with
:func:`~qwen3_next_mcore.ops.adamw.adamw_reference` (float64 inside) before timing (relative error per
tensor at most 1e-6 for the fp32 weights and moments, one bf16 unit for the copies); a candidate over
the tolerance is not timed. The floor is the bytes a one-pass step must move (30 per weight: read the
weight, gradient and two moments, write the weight, the moments and the bf16 copy) at the copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .timing import measure

log = logging.getLogger(__name__)

BYTES_PER_WEIGHT = 30
HYPER = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def proxy_shapes(config) -> list[tuple[int, ...]]:
    """The weight shapes of our model for ``config`` as megatron-core holds them: HF's per-tensor shapes,
    with each MoE layer's experts as two grouped tensors [E, 2F, H] and [E, H, F]."""
    from ..convert.mapping import expected_hf_shapes

    shapes = [s for n, s in expected_hf_shapes(config).items() if ".mlp.experts." not in n]
    E, F, H = config.num_experts, config.moe_intermediate_size, config.hidden_size
    moe_layers = config.num_hidden_layers + config.mtp_num_layers
    return shapes + [(E, 2 * F, H), (E, H, F)] * moe_layers


def _initial(shape, index: int, device) -> tuple[torch.Tensor, ...]:
    """Deterministic (weight, gradient, first moment, second moment) of tensor ``index``, fp32."""
    g = torch.Generator(device=device).manual_seed(1000 + index)
    p = torch.randn(shape, generator=g, device=device) * 0.02
    grad = torch.randn(shape, generator=g, device=device) * 1e-3
    m = torch.randn(shape, generator=g, device=device) * 1e-4
    v = torch.rand(shape, generator=g, device=device) * 1e-6
    return p, grad, m, v


class _State:
    def __init__(self, shapes, device):
        self.params, self.grads, self.m, self.v = (list(t) for t in zip(*(_initial(s, i, device)
                                                                             for i, s in enumerate(shapes))))
        self.steps = [torch.full((), 10.0, device=device) for _ in shapes]
        self.models = [torch.empty_like(p, dtype=torch.bfloat16) for p in self.params]


FOREACH = "torch foreach AdamW + bf16 copy (megatron-core's default)"
FUSED = "torch fused AdamW + bf16 copy"
OURS = "ours (one Triton pass, bf16 written)"
CANDIDATES = (FOREACH, FUSED, OURS)


def _candidates(state: _State) -> dict[str, Callable[[], None]]:
    from torch.optim.adamw import adamw

    from ..ops.adamw import adamw_multi_tensor

    # the foreach implementation keeps its step counters on the host (as torch creates them for it)
    host_steps = [s.cpu() for s in state.steps]

    def torch_impl(fused: bool):
        steps = state.steps if fused else host_steps

        def step():
            adamw(state.params, state.grads, state.m, state.v, [], steps, foreach=not fused, fused=fused,
                  amsgrad=False, maximize=False, **HYPER)
            torch._foreach_copy_(state.models, state.params)
        return step

    cache: dict = {}

    def ours():
        adamw_multi_tensor(state.params, state.grads, state.m, state.v, state.steps, model_params=state.models,
                           plan_cache=cache, **HYPER)

    return {FOREACH: torch_impl(False), FUSED: torch_impl(True), OURS: ours}


def _check(state: _State, shapes, device) -> tuple[float, float]:
    """Largest relative errors per tensor after one step from the initial state, against the float64
    reference: (fp32 weights and moments, bf16 copies)."""
    from ..ops.adamw import adamw_reference

    worst, worst_bf16 = 0.0, 0.0
    for i, shape in enumerate(shapes):
        p, g, m, v = _initial(shape, i, device)
        w = torch.empty_like(p, dtype=torch.bfloat16)
        adamw_reference([p], [g], [m], [v], [torch.full((), 10.0, device=device)], model_params=[w], **HYPER)
        for got, want in ((state.params[i], p), (state.m[i], m), (state.v[i], v), (state.models[i], w)):
            err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
            if got.dtype == torch.bfloat16:
                worst_bf16 = max(worst_bf16, err)
            else:
                worst = max(worst, err)
        del p, g, m, v, w
    return worst, worst_bf16


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device memory bandwidth of a large ``copy_`` (read + write), GB/s, measured now."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), warmup=3, reps=10, device=device)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def run_optimizer_step(config, *, device: torch.device, warmup: int, reps: int, tolerance: float = 1e-6,
                       bf16_tolerance: float = 2**-8) -> dict:
    """The case's result dict: rows per candidate (median ms, GB/s at 30 bytes per weight, ratio to the
    floor, max relative error), the weight count and the measured copy bandwidth. On a CPU (tests: toy
    config) our Triton candidate is listed as unavailable."""
    shapes = proxy_shapes(config)
    numel = sum(torch.Size(s).numel() for s in shapes)
    bandwidth = copy_bandwidth_gbps(device)
    floor_ms = BYTES_PER_WEIGHT * numel / (bandwidth * 1e9) * 1e3
    rows = []
    unavailable = {} if device.type == "cuda" else {OURS: "needs CUDA (Triton)"}
    for name in CANDIDATES:
        if name in unavailable:
            continue
        state = _State(shapes, device)
        step = _candidates(state)[name]
        step()
        err, err_bf16 = _check(state, shapes, device)
        row = {"candidate": name, "max_rel_error": err, "max_rel_error_bf16": err_bf16}
        if not (err <= tolerance and err_bf16 <= bf16_tolerance):
            row["refused"] = (f"wrong: max rel error {err:.2e} (tolerance {tolerance:g}), bf16 copies {err_bf16:.2e} "
                              f"(tolerance {bf16_tolerance:.2e}: one bf16 unit)")
        else:
            t = measure(step, warmup=warmup, reps=reps, device=device)
            row.update(t.as_dict(), gbps=BYTES_PER_WEIGHT * numel / (t.median_ms * 1e-3) / 1e9,
                       vs_floor=t.median_ms / floor_ms)
        rows.append(row)
        log.info("optimizer-step %s: %s", name, row)
        del state, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timed = {r["candidate"]: r for r in rows if "median_ms" in r}
    for r in timed.values():
        r["speedup"] = {o: other["median_ms"] / r["median_ms"] for o, other in timed.items() if o != r["candidate"]}
    return {"rows": rows, "unavailable": unavailable, "weights": numel, "tensors": len(shapes),
            "copy_gbps": bandwidth, "floor_ms": floor_ms, "tolerance": tolerance, "bf16_tolerance": bf16_tolerance,
            "hyper": HYPER}
