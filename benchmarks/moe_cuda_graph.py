"""How much of one MoE layer's forward+backward is host time: the layer eager against the same step
(forward and backward) captured as one CUDA graph and replayed, at the 80B widths (512 experts, top-10,
width 512, shared expert), bf16.

    python -m benchmarks.moe_cuda_graph [--tokens 16384] [--experts 512]   # one CUDA GPU

First one eager step runs under ``torch.cuda.set_sync_debug_mode("warn")`` and every synchronising
operation is listed with the innermost Python frames that issued it (what a capture cannot contain). Then, for the configured layer and for the same layer without the auxiliary load-balancing loss,
the step is captured (after warm-up on a side stream, grads kept in place; CUDA's capture error mode
"global" and "thread_local", each variant in its own process: a failed capture leaves the process's
random generators unusable) and, when the capture works, its output and gradients are checked against
the eager step's before the replay is timed; a capture error is printed with the frames that raised it. The grouped experts layout at one rank keeps the per-expert counts
on the device, which is what a capture needs. This is a measurement, not a training feature.
Results: benchmarks/results/<card>-<date>-<rev>/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import traceback
import warnings

import torch

from qwen3_next_mcore import parallel
from qwen3_next_mcore.bench.timing import measure
from qwen3_next_mcore.config import get_preset
from qwen3_next_mcore.layers.moe import Qwen3NextMoELayer
from qwen3_next_mcore.model import build_model


def _frames(stack) -> str:
    """The six innermost frames of a stack, innermost first."""
    return " <- ".join(f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno} {f.name}" for f in reversed(list(stack)[-6:]))


def report_syncs(step) -> list[str]:
    """Run ``step`` once with CUDA sync debugging on; the distinct call sites of synchronising ops."""
    sites: list[str] = []

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            site = _frames(traceback.extract_stack()[:-1])
            if site not in sites:
                sites.append(site)

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return sites


def build_layer(experts: int, aux_loss: bool):
    """One proxy layer's MoE block at ``experts`` experts, bf16; (layer, config)."""
    cfg = get_preset("proxy", num_hidden_layers=1, layer_types=("full_attention",), mtp_num_layers=0,
                     num_experts=experts, **({} if aux_loss else {"router_aux_loss_coef": 0.0}))
    model = build_model(cfg, dtype=torch.bfloat16)
    return next(m for m in model.modules() if isinstance(m, Qwen3NextMoELayer)), cfg


def measure_variant(tokens: int, experts: int, aux_loss: bool, mode: str, dev: torch.device) -> None:
    """Sync sites, eager time, and (if it captures and matches) the one-graph time of one layer's step."""
    layer, cfg = build_layer(experts, aux_loss)
    label = f"{'with' if aux_loss else 'without'} aux loss, capture mode {mode}"
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, 1, cfg.hidden_size, device=dev, generator=gen).to(torch.bfloat16)
    dy = torch.randn_like(x)
    xi = x.clone().requires_grad_()
    params = [q for q in layer.parameters() if q.requires_grad]

    def step():
        y = layer(xi)[0]
        y.backward(dy)
        return y

    def zero():
        for t in [xi] + params:
            if t.grad is not None:
                t.grad.zero_()

    y_ref = step().detach().clone()
    ref = [t.grad.clone() for t in [xi] + params]
    for site in report_syncs(step) or ["none"]:
        print(f"[{label}] synchronising op in one eager step: {site}", flush=True)
    eager = measure(step, warmup=3, reps=10, device=dev).median_ms
    print(f"[{label}] eager             fwd+bwd {eager:7.3f} ms", flush=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode=mode):
            y_static = step()
    except Exception as e:  # noqa: BLE001 - the measurement reports why the step cannot be captured
        first = e
        while first.__context__ is not None:
            first = first.__context__
        print(f"[{label}] capture failed: {type(first).__name__}: {str(first).splitlines()[0]}")
        print(f"[{label}]     raised at: {_frames(traceback.extract_tb(first.__traceback__))}")
        return
    zero()
    graph.replay()
    torch.cuda.synchronize()
    errors = [rel(y_static, y_ref)] + [rel(t.grad, r) for t, r in zip([xi] + params, ref)]
    print(f"[{label}] graph vs eager: output {errors[0]:.1e}, largest gradient error {max(errors[1:]):.1e}")
    if max(errors) > 1e-2:
        print(f"[{label}] the graph differs from the eager step: not timed")
        return
    ms = measure(graph.replay, warmup=3, reps=10, device=dev).median_ms
    print(f"[{label}] one CUDA graph    fwd+bwd {ms:7.3f} ms  (host time eager - graph: {eager - ms:.3f} ms)",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--experts", type=int, default=512)
    p.add_argument("--variant", help="aux-loss on|off and capture mode, e.g. 'on,global' (default: each in turn)")
    args = p.parse_args()
    if args.variant is None:
        for variant in ("on,global", "on,thread_local", "off,thread_local"):
            subprocess.run([sys.executable, "-m", "benchmarks.moe_cuda_graph", "--tokens", str(args.tokens),
                            "--experts", str(args.experts), "--variant", variant], check=False)
        return
    aux, mode = args.variant.split(",")
    dev = torch.device("cuda")
    parallel.initialize(seed=0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, f"{args.tokens} tokens, {args.experts} experts")
    measure_variant(args.tokens, args.experts, aux == "on", mode, dev)
    parallel.destroy()


if __name__ == "__main__":
    main()
