"""The weight-gradient passes into fp32 main grads that training/wgrad_fusion.py and the grouped experts replace.

    python -m benchmarks.main_grad_adds      # one CUDA GPU (offline machine: source scripts/gpu_env.sh)

At the proxy model's sizes (one MoE layer's 64 experts x 3 x 2048 x 512 = 201 M weights; Qwen3-Next's
151,936 x 2048 word embedding, one 2 x 4096-token micro-batch), times with CUDA events, mean of 20 calls
after 3 warm-up (10 for the embedding):

- ``main_grad += bf16 grad``: torch's mixed-dtype ``add_`` (what megatron-core's DDP hook runs), the same
  ``add_`` compiled (what the experts' backward runs, ``layers.grouped_experts.add_into_main_grad``), its
  compiled copy (the step's first gradient), and the grad cast to fp32 first; a fp32 fill for the
  bandwidth reference;
- the embedding: torch's dense embedding backward then the add (the plain path) against the looked-up rows
  added into the fp32 main grad (``index_put_`` with accumulation: ``embedding_rows_into_main_grad``; and
  ``index_add_``, which uses atomics, for comparison);
- the experts' weight-gradient grouped GEMM (bf16 out; torch's grouped GEMM takes no fp32 output).

Results: benchmarks/results/<card>-<date>-<rev>/main_grad_adds.txt.
"""

from __future__ import annotations

import torch

from qwen3_next_mcore.layers.grouped_experts import add_into_main_grad
from qwen3_next_mcore.training.wgrad_fusion import embedding_rows_into_main_grad


def _ms(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    n = 64 * 3 * 2048 * 512
    main_grad = torch.zeros(n, device=dev)
    grad = torch.randn(n, device=dev, dtype=torch.bfloat16)
    for name, fn in (("torch add_ (fp32 += bf16)", lambda: main_grad.add_(grad)),
                     ("compiled add_ (add_into_main_grad)", lambda: add_into_main_grad(main_grad, grad)),
                     ("compiled copy_ (add_into_main_grad, first=True)",
                      lambda: add_into_main_grad(main_grad, grad, first=True)),
                     ("add_(grad.float())", lambda: main_grad.add_(grad.float()))):
        ms = _ms(fn)
        moved = 6 if "copy" in name else 10  # bytes per value
        print(f"{name}, {n / 1e6:.0f} M values: {ms:.3f} ms, {n * moved / ms / 1e9:.2f} TB/s ({moved} bytes/value)")
    ms = _ms(lambda: main_grad.fill_(0))
    print(f"fp32 fill, {n / 1e6:.0f} M values: {ms:.3f} ms, {n * 4 / ms / 1e9:.2f} TB/s")

    vocab, hidden, tokens = 151936, 2048, 8192
    ids = torch.randint(0, vocab, (tokens,), device=dev)
    rows = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
    emb_main = torch.zeros(vocab, hidden, device=dev)

    def dense():
        emb_main.add_(torch.ops.aten.embedding_dense_backward(rows, ids, vocab, -1, False))

    for name, fn in (("embedding: dense backward + add_ (plain path)", dense),
                     ("embedding: index_put_ into main grad (embedding_rows_into_main_grad)",
                      lambda: embedding_rows_into_main_grad(emb_main, ids, rows)),
                     ("embedding: index_add_ into main grad (atomics)",
                      lambda: emb_main.index_add_(0, ids, rows.float()))):
        print(f"{name}, {vocab} x {hidden}, {tokens} tokens: {_ms(fn, reps=10):.3f} ms")

    experts, ffn, routed = 64, 512, tokens * 10
    x = torch.randn(routed, hidden, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(routed, 2 * ffn, device=dev, dtype=torch.bfloat16)
    offs = torch.arange(1, experts + 1, device=dev, dtype=torch.int32) * (routed // experts)
    ms = _ms(lambda: torch._grouped_mm(dy.t(), x, offs=offs))
    print(f"experts' fc1 weight-gradient grouped GEMM, {experts} x {2 * ffn} x {hidden} from {routed} rows: "
          f"{ms:.3f} ms, {2 * routed * 2 * ffn * hidden / ms / 1e9:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
