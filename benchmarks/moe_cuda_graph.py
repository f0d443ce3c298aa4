"""How much of one MoE layer's forward+backward is host time: the layer eager against the same layer
captured as CUDA graphs (``torch.cuda.make_graphed_callables``: one graph for the forward, one for the
backward), at the 80B widths (512 experts, top-10, width 512, shared expert), bf16.

    python -m benchmarks.moe_cuda_graph [--tokens 16384] [--experts 512]   # one CUDA GPU

The grouped experts layout at one rank has static shapes and no host read (the counts stay on the device),
which is what a CUDA graph needs; the script checks the graphed layer's output and input gradient against
the eager layer's before timing it, and prints the capture's error instead if it cannot be captured.
This is a measurement, not a training feature: megatron-core's own CUDA-graph support would be the way
to use graphs in training. Results: benchmarks/results/<card>-<date>-<rev>/.
"""

from __future__ import annotations

import argparse

import torch

from qwen3_next_mcore import parallel
from qwen3_next_mcore.bench.timing import measure
from qwen3_next_mcore.config import get_preset
from qwen3_next_mcore.layers.moe import Qwen3NextMoELayer
from qwen3_next_mcore.model import build_model


class _OutputOnly(torch.nn.Module):
    """The MoE layer's output tensor alone (its second output, the bias, is None: graphs take tensors)."""

    def __init__(self, moe: torch.nn.Module):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--experts", type=int, default=512)
    args = p.parse_args()
    dev = torch.device("cuda")
    parallel.initialize(seed=0)
    cfg = get_preset("proxy", num_hidden_layers=1, layer_types=("full_attention",), mtp_num_layers=0,
                     num_experts=args.experts)
    model = build_model(cfg, dtype=torch.bfloat16)
    layer = _OutputOnly(next(m for m in model.modules() if isinstance(m, Qwen3NextMoELayer)))
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(args.tokens, 1, cfg.hidden_size, device=dev, generator=gen).to(torch.bfloat16)
    dy = torch.randn_like(x)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, f"{args.tokens} tokens, {args.experts} experts")

    def run(fn):
        xi = x.clone().requires_grad_()

        def step():
            layer.zero_grad(set_to_none=True)
            xi.grad = None
            y = fn(xi)
            y.backward(dy)
            return y, xi.grad

        return step, [t.detach().float().clone() for t in step()]

    rel = lambda a, b: float((a - b).norm() / b.norm())
    eager_step, (y_ref, dx_ref) = run(layer)
    print(f"{'eager':28s} fwd+bwd {measure(eager_step, warmup=3, reps=10, device=dev).median_ms:7.3f} ms", flush=True)
    try:
        graphed = torch.cuda.make_graphed_callables(layer, (x.clone().requires_grad_(),))
        graphed_step, (y, dx) = run(graphed)
    except Exception as e:  # noqa: BLE001 - the measurement reports why the layer cannot be captured
        print(f"CUDA graph capture failed: {type(e).__name__}: {e}")
        return
    errors = rel(y, y_ref), rel(dx, dx_ref)
    print(f"graphed vs eager: output {errors[0]:.1e}, input gradient {errors[1]:.1e}")
    if max(errors) > 1e-2:
        print("graphed layer differs from the eager one: not timed")
        return
    ms = measure(graphed_step, warmup=3, reps=10, device=dev).median_ms
    print(f"{'CUDA graphs (fwd, bwd)':28s} fwd+bwd {ms:7.3f} ms", flush=True)
    parallel.destroy()

if __name__ == "__main__":
    main()
