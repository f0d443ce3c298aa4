"""One Qwen3-Next MoE layer (80B widths: 512 experts, top-10, width 512, shared expert) forward+backward in
each experts layout and SwiGLU backend, without the transformers baseline (``bench moe-block`` has it).

    python -m benchmarks.moe_layouts [--tokens 16384] [--experts 512]   # one CUDA GPU

Times (CUDA events, median of 10 after 3 warm-up calls) ``Qwen3NextMoELayer`` with the experts' rows in the
grouped layout (grouped GEMMs, no host read) and in the padded one (batched GEMMs, one host read), each with
the experts' weighted SwiGLU on our Triton kernels and on megatron-core's compiled fusion; bf16 weights
and activations, random routing (near balanced). Results: benchmarks/results/<card>-<date>-<rev>/.
"""

from __future__ import annotations

import argparse

import torch

from qwen3_next_mcore import parallel
from qwen3_next_mcore.bench.timing import measure
from qwen3_next_mcore.config import get_preset
from qwen3_next_mcore.layers.moe import Qwen3NextMoELayer, set_experts_layout
from qwen3_next_mcore.model import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--experts", type=int, default=512)
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a dry run: eager SwiGLU)")
    args = p.parse_args()
    dev = torch.device(args.device)
    parallel.initialize(seed=0)
    cfg = get_preset("proxy", num_hidden_layers=1, layer_types=("full_attention",), mtp_num_layers=0,
                     num_experts=args.experts)
    model = build_model(cfg, dtype=torch.bfloat16).to(dev)
    moe = next(m for m in model.modules() if isinstance(m, Qwen3NextMoELayer))
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(args.tokens, 1, cfg.hidden_size, device=dev, generator=gen).to(torch.bfloat16)
    dy = torch.randn_like(x)
    print(torch.cuda.get_device_name() if dev.type == "cuda" else "CPU", "torch", torch.__version__, f"{args.tokens} tokens, {args.experts} experts")
    ref = None
    xi = x.clone().requires_grad_()
    for layout in ("grouped", "padded"):
        for act in ("triton", "compile") if dev.type == "cuda" else ("torch",):
            set_experts_layout(model, layout)
            moe.experts.activation_backend = act

            def fwd_bwd():
                moe.zero_grad(set_to_none=True)
                xi.grad = None
                y = moe(xi)[0]
                y.backward(dy)
                return y

            y = fwd_bwd().detach().float()
            ref = y if ref is None else ref
            err = float((y - ref).norm() / ref.norm())
            with torch.no_grad():
                fwd = measure(lambda: moe(x)[0], warmup=3, reps=10, device=dev).median_ms
            both = measure(fwd_bwd, warmup=3, reps=10, device=dev).median_ms
            print(f"layout {layout:8s} swiglu {act:8s} fwd {fwd:7.3f} ms  fwd+bwd {both:7.3f} ms  "
                  f"(output vs the first row: {err:.1e})", flush=True)
    parallel.destroy()


if __name__ == "__main__":
    main()
