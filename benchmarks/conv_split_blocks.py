"""Block sizes of the fused GDN conv + q/k/v/z split kernels (ops/gdn_conv_split.py), and the unfused ops.

    python -m benchmarks.conv_split_blocks      # one CUDA GPU (offline machine: source scripts/gpu_env.sh)

At the 80B layer's widths (16 key-head groups, dk = dv = 128, 2 value heads per key head, conv width 4),
B=4 x T=4096 tokens, bf16: times the forward and the backward kernel alone per (tokens per program,
channels per program, warps), with the bytes each must move (forward: read the projection, write q, k,
v, z; backward: read the parts' gradients and the projection, write and read back the pre-SiLU gradient,
write the projection's gradient), and the
whole op forward+backward against the unfused ops (split, fla's conv, copies) through autograd.
Median of triton.testing.do_bench. Results: benchmarks/results/<card>-<date>-<rev>/conv_split_blocks.txt.
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

from qwen3_next_mcore.ops.gdn_conv_split import conv_split_bwd, conv_split_fwd, conv_split_qkvz

B, T, G, DK, DV, R, W = 4, 4096, 16, 128, 128, 2, 4


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    C = 2 * DK + 2 * R * DV
    x = torch.randn(B, T, G, C, device=dev, dtype=dt)
    w = (0.5 * torch.randn(G * (2 * DK + R * DV), W, device=dev)).to(dt)
    grads = [torch.randn(s, device=dev, dtype=dt) for s in
             ((B, T, G, DK), (B, T, G, DK), (B, T, G * R, DV), (B, T, G * R, DV))]
    elt = 2
    fwd_bytes = 2 * x.numel() * elt  # read the projection, write the four parts (as many elements)
    conv = G * (2 * DK + R * DV) * B * T
    # dy parts + x (conv part) + dpre written and read back (W-1 rows of halo aside) + dx
    bwd_bytes = (x.numel() + conv + 2 * conv + x.numel()) * elt
    print(f"{torch.cuda.get_device_name()}: B={B} T={T} G={G} dk={DK} dv={DV} r={R} W={W} bf16")
    print(f"forward moves {fwd_bytes / 1e9:.3f} GB, backward {bwd_bytes / 1e9:.3f} GB")
    print("forward kernel:\n| BT | BD | warps | ms | GB/s |\n|---|---|---|---|---|")
    for bt, bd, warps in [(32, 128, 4), (16, 128, 4), (32, 64, 4), (64, 128, 8), (32, 128, 8)]:
        cfg = {"block_t": bt, "block_d": bd, "num_warps": warps}
        f = do_bench(lambda cfg=cfg: conv_split_fwd(x, w, None, DK, DV, R, blocks=cfg))
        print(f"| {bt} | {bd} | {warps} | {f:.3f} | {fwd_bytes / f / 1e6:.0f} |")
    print("backward (both passes), one pass's blocks varied from BWD_BLOCKS:\n| pass | BT | BD | warps | ms | GB/s |")
    print("|---|---|---|---|---|---|")
    for name in ("dpre", "dx"):
        for bt, bd, warps in [(64, 64, 4), (32, 64, 4), (32, 128, 4), (16, 128, 4), (64, 32, 4), (128, 64, 8),
                              (64, 128, 8)]:
            cfg = {f"{name}_block_t": bt, f"{name}_block_d": bd, f"{name}_warps": warps}
            b = do_bench(lambda cfg=cfg: conv_split_bwd(x, w, None, *grads, DK, DV, R, blocks=cfg))
            print(f"| {name} | {bt} | {bd} | {warps} | {b:.3f} | {bwd_bytes / b / 1e6:.0f} |")
    copy = torch.empty_like(x)
    c = do_bench(lambda: copy.copy_(x))
    print(f"plain copy of the projection: {c:.3f} ms, {2 * x.numel() * elt / c / 1e6:.0f} GB/s")
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    for backend in ("triton", "fla"):
        def step(backend=backend):
            xl.grad = wl.grad = None
            outs = conv_split_qkvz(xl, wl, dk=DK, dv=DV, r=R, backend=backend)
            torch.autograd.backward(outs, grads)
        ms = do_bench(step)
        print(f"op fwd+bwd through autograd, backend {backend}: {ms:.3f} ms")


if __name__ == "__main__":
    main()
