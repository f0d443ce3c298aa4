"""The routed experts' six grouped GEMMs one by one, on each grouped-GEMM backend, against a dense GEMM.

    python -m benchmarks.grouped_gemm_shapes [--experts 512] [--tokens 16384]   # one CUDA GPU

At Qwen3-Next-80B's widths (hidden 2048, expert width 512, top-10 of 512 experts; 16,384 tokens is the
`moe-block` case's B=4 x T=4096), the grouped GEMMs of ``layers.grouped_experts`` (``grouped_gemm``):

- fc1 forward  ``x [rows, 2048] @ w1^T -> [rows, 1024]`` (rows grouped by expert), fc2 forward
  ``a [rows, 512] @ w2^T -> [rows, 2048]``;
- their input gradients (the same ragged-rows form) and weight gradients (``dy^T [N, rows] @ x [rows, K]
  -> [E, N, K]``: the contraction runs over each expert's rows).

Each is timed (CUDA events, median of 20 after 3 warm-up calls) with torch's kernel and, where it runs, the
"autotune" backend (Inductor max-autotune; its choice among its Triton templates and torch's kernel shows
in Inductor's AUTOTUNE log on stderr), at two routings: a router-like one (each token's top-10 of random
scores: counts spread around 320 rows per expert) and an even 320 rows each. The dense GEMM with the same
FLOPs (one [rows, K] x [K, N] matrix) is the rate a grouped GEMM could approach.

Results: benchmarks/results/<card>-<date>-<rev>/grouped_gemm_shapes.txt.
"""

from __future__ import annotations

import argparse
import time

import torch

from qwen3_next_mcore.layers.grouped_experts import add_into_main_grad, grouped_gemm
from qwen3_next_mcore.ops.backends import detect_kernel_env, grouped_gemm_backend_report


def _ms(fn, *args, reps: int = 20, warmup: int = 3, **kwargs) -> float:
    for _ in range(warmup):
        fn(*args, **kwargs)
    if not torch.cuda.is_available():  # (a CPU dry run of the script at small sizes)
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args, **kwargs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0).to(torch.int32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=512)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--backends", nargs="+", default=["torch", "autotune"], choices=["torch", "autotune"],
                   help="grouped_gemm backends to time (autotune: where it runs)")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    E, H, F, k = args.experts, args.hidden, args.ffn, args.top_k
    print(torch.cuda.get_device_name() if dev.type == "cuda" else "CPU", "torch", torch.__version__)
    auto_error = grouped_gemm_backend_report(detect_kernel_env(dev.type), "autotune")["error"]
    backends = [b for b in args.backends if b == "torch" or auto_error is None]
    if auto_error is not None and "autotune" in args.backends:
        print(f"autotune backend unavailable: {auto_error}")
    gen = torch.Generator(device=dev).manual_seed(0)
    picks = torch.rand(args.tokens, E, device=dev, generator=gen).topk(k, dim=1).indices
    routings = {"router-like": torch.bincount(picks.flatten(), minlength=E),
                "even": torch.full((E,), args.tokens * k // E, device=dev)}
    w1 = torch.randn(E, 2 * F, H, device=dev, generator=gen).to(torch.bfloat16)  # [E, 2F, H]
    w2 = torch.randn(E, H, F, device=dev, generator=gen).to(torch.bfloat16)  # [E, H, F]
    for name, counts in routings.items():
        offs = _offsets(counts)
        rows = int(offs[-1])
        print(f"\n{name} routing: {rows} rows over {E} experts, rows per expert min {int(counts.min())} "
              f"median {int(counts.median())} max {int(counts.max())}")
        x, dy1 = (torch.randn(rows, n, device=dev, generator=gen).to(torch.bfloat16) for n in (H, 2 * F))
        a, dy2 = (torch.randn(rows, n, device=dev, generator=gen).to(torch.bfloat16) for n in (F, H))
        gemms = {  # name: (a, b, dense equivalent [M, K] x [K, N])
            "fc1 forward": (x, w1.transpose(1, 2), (rows, H, 2 * F)),
            "fc2 forward": (a, w2.transpose(1, 2), (rows, F, H)),
            "fc1 input grad": (dy1, w1, (rows, 2 * F, H)),
            "fc2 input grad": (dy2, w2, (rows, H, F)),
            "fc1 weight grad": (dy1.t(), x, (2 * F, rows, H)),
            "fc2 weight grad": (dy2.t(), a, (H, rows, F)),
        }
        C = -(-int(counts.max()) // 64) * 64  # every expert's rows padded to the largest count (multiple of 64)
        xp, dy1p = (torch.randn(E, C, n, device=dev, generator=gen).to(torch.bfloat16) for n in (H, 2 * F))
        ap, dy2p = (torch.randn(E, C, n, device=dev, generator=gen).to(torch.bfloat16) for n in (F, H))
        padded = {  # the same GEMMs as batched GEMMs over [E, C, *] (zero rows past each expert's count)
            "fc1 forward": (xp, w1.transpose(1, 2)), "fc2 forward": (ap, w2.transpose(1, 2)),
            "fc1 input grad": (dy1p, w1), "fc2 input grad": (dy2p, w2),
            "fc1 weight grad": (dy1p.transpose(1, 2), xp), "fc2 weight grad": (dy2p.transpose(1, 2), ap),
        }
        columns = backends + ["dense", f"bmm C={C}"]
        total = dict.fromkeys(columns, 0.0)
        print(f"{'GEMM':<18}" + "".join(f"{c + ' ms':>16}{'TFLOP/s':>9}" for c in columns))
        for gname, (lhs, rhs, (M, K, N)) in gemms.items():
            flops = 2 * M * K * N
            times = {b: _ms(grouped_gemm, lhs, rhs, offs, backend=b) for b in backends}
            da = torch.randn(M, K, device=dev, generator=gen).to(torch.bfloat16)
            db = torch.randn(K, N, device=dev, generator=gen).to(torch.bfloat16)
            times["dense"] = _ms(torch.mm, da, db)
            times[f"bmm C={C}"] = _ms(torch.bmm, *padded[gname])
            for c in columns:
                total[c] += times[c]
            print(f"{gname:<18}" + "".join(f"{times[c]:>16.3f}{flops / times[c] / 1e9:>9.0f}" for c in columns))
        flops = 3 * 2 * rows * 3 * H * F
        print(f"{'all six':<18}" + "".join(f"{total[c]:>16.3f}{flops / total[c] / 1e9:>9.0f}" for c in columns))
        # the weight gradients into fp32 main grads: grouped GEMM (bf16) then the compiled add (our path today)
        # against one batched GEMM accumulating into the fp32 buffer in its epilogue
        for gname, w in (("fc1 weight grad", w1), ("fc2 weight grad", w2)):
            main = torch.zeros(w.shape, device=dev, dtype=torch.float32)
            lhs, rhs = gemms[gname][:2]
            grouped_then_add = _ms(lambda: add_into_main_grad(main, grouped_gemm(lhs, rhs, offs)))  # noqa: B023
            if dev.type != "cuda":  # (baddbmm's out_dtype is CUDA-only)
                break
            fused = _ms(torch.baddbmm, main, *padded[gname], out_dtype=torch.float32, out=main)
            print(f"{gname} into fp32 main grad: grouped GEMM + compiled add {grouped_then_add:.3f} ms, "
                  f"baddbmm (C={C}) accumulating in fp32 {fused:.3f} ms")
        # the permutation's gather, plain and into the padded layout
        tokens = torch.randn(args.tokens + 1, H, device=dev, generator=gen).to(torch.bfloat16)
        plain_idx = torch.randint(0, args.tokens, (rows,), device=dev, generator=gen)
        pad_idx = torch.full((E * C,), args.tokens, device=dev)  # the zero row (here: the last row)
        pad_idx[:rows] = plain_idx
        print(f"gather of {rows} rows x {H}: {_ms(torch.index_select, tokens, 0, plain_idx):.3f} ms; "
              f"into [E, C={C}] rows: {_ms(torch.index_select, tokens, 0, pad_idx):.3f} ms")

if __name__ == "__main__":
    main()
