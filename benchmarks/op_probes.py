"""Micro-benchmarks of the single ops behind the MoE and norm choices (one CUDA GPU, bf16, 80B widths).

    python -m benchmarks.op_probes [PROBE...]   # (offline GPU machine: source scripts/gpu_env.sh first)

Times forward and forward+backward (median of 10 after 3 warm-up) of: the routed-expert grouped GEMMs
for 16k tokens x top-10 of 512 experts with balanced routing; the token permutation gather and the
ways to combine the copies back (bf16 scatter_add, fp32 index_add, gather + sum over k); the
zero-centred RMSNorm eager vs torch.compile vs fla's rms_norm; the router GEMM in fp32 vs bf16; the
router's top-k (torch.topk vs our row top-k kernel, ops/router_topk.py); the experts' weighted SwiGLU per
backend (ops/moe_swiglu.py); causal GQA SDPA per backend. Results of an H100 run: benchmarks/results/h100-2026-11-28/op_probes.txt. These
numbers explain design choices in qwen3_next_mcore/ops/token_permutation.py, layers/moe.py and
ops/norms.py; the layer benchmarks (``python -m benchmarks.run``) are the measure of the layers.
"""

import torch
import torch.nn.functional as F

from qwen3_next_mcore.bench.timing import measure, time_fwd_bwd

DEV = torch.device("cuda")
BF16 = torch.bfloat16
T, H, E, K, FFN = 16384, 2048, 512, 10, 512  # tokens, hidden, experts, top-k, expert width
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def rep(name, fwd, *params):
    """Print forward and forward+backward medians of ``fwd`` (gradients of ``params`` cleared each time)."""
    def zero():
        for t in params:
            t.grad = None

    f, b = time_fwd_bwd(fwd, zero, warmup=3, reps=10, device=DEV)
    print(f"{name:60s} fwd {f.median_ms:7.3f} ms  fwd+bwd {b.median_ms:7.3f} ms", flush=True)


def randn(*shape, scale=1.0, dtype=BF16):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype).requires_grad_()


def grouped_gemms():
    n = T * K
    offs = torch.arange(1, E + 1, device=DEV, dtype=torch.int32) * (n // E)  # balanced routing
    x, w1 = randn(n, H), randn(E, 2 * FFN, H, scale=0.02)
    rep("grouped_mm fc1 [163840x2048]x[512,2048,1024]", lambda: _grouped_mm(x, w1.transpose(1, 2), offs=offs), x, w1)
    a, w2 = randn(n, FFN), randn(E, H, FFN, scale=0.02)
    rep("grouped_mm fc2 [163840x512]x[512,512,2048]", lambda: _grouped_mm(a, w2.transpose(1, 2), offs=offs), a, w2)
    print("routed GEMM fwd GFLOP", 2 * n * H * 3 * FFN / 1e9)


def permutation():
    n = T * K
    idx = torch.randn(T, E, device=DEV).softmax(-1).topk(K, dim=-1).indices
    order = torch.argsort(idx.reshape(-1), stable=True)
    src_tok = order // K
    inv = torch.empty_like(order)
    inv[order] = torch.arange(n, device=DEV)
    h, y = randn(T, H), randn(n, H)
    rep("permute index_select", lambda: h.index_select(0, src_tok), h)
    rep("unpermute scatter_add bf16",
        lambda: torch.zeros(T, H, device=DEV, dtype=BF16).scatter_add(0, src_tok.unsqueeze(1).expand(-1, H), y), y)
    rep("unpermute index_add fp32",
        lambda: torch.zeros(T, H, device=DEV).index_add(0, src_tok, y.float()).to(BF16), y)
    rep("unpermute gather + sum(k) fp32", lambda: y.index_select(0, inv).view(T, K, H).float().sum(1).to(BF16), y)
    rep("unpermute gather + sum(k) bf16", lambda: y.index_select(0, inv).view(T, K, H).sum(1), y)
    # our combine's forward (its backward is a gather, not embedding_bag's own)
    rep("unpermute embedding_bag sum (fwd is ours)", lambda: F.embedding_bag(inv.view(T, K), y, mode="sum"), y)


def norms():
    from qwen3_next_mcore.ops.norms import zero_centered_rms_norm

    eager = lambda x, w: zero_centered_rms_norm(x, w, backend="torch")
    compiled = torch.compile(eager)
    x, w = randn(4096, 4, H), torch.zeros(H, device=DEV, dtype=BF16, requires_grad=True)
    rep("zc rmsnorm eager [4096,4,2048]", lambda: eager(x, w), x, w)
    rep("zc rmsnorm torch.compile", lambda: compiled(x, w), x, w)
    try:
        from fla.modules.layernorm import rms_norm

        rep("fla rms_norm (1+w fp32)", lambda: rms_norm(x, 1 + w.float(), None, eps=1e-6), x, w)
    except (ImportError, RuntimeError) as e:
        print("fla rms_norm", type(e).__name__, e)
    q, wq = randn(4096, 4, 16, 256), torch.zeros(256, device=DEV, dtype=BF16, requires_grad=True)
    rep("q norm eager [4096,4,16,256]", lambda: eager(q, wq), q, wq)
    rep("q norm compile", lambda: compiled(q, wq), q, wq)


def router():
    x, w = randn(T, H), randn(E, H, scale=0.02)
    rep("router fp32 GEMM", lambda: x.float() @ w.float().t(), x, w)
    rep("router bf16 GEMM then float", lambda: (x @ w.t()).float(), x, w)


def router_topk():
    from qwen3_next_mcore.ops.router_topk import row_topk_indices

    for n, e in ((T, E), (8192, 64)):  # the 80B layer; the proxy preset's 64 experts
        logits = torch.randn(n, e, device=DEV)
        for name, fn in (("torch.topk", lambda: torch.topk(logits, K, dim=1)),  # noqa: B023
                         ("row_topk_indices (Triton)", lambda: row_topk_indices(logits, K))):  # noqa: B023
            t = measure(fn, warmup=3, reps=20, device=DEV)
            print(f"router top-{K} of [{n}, {e}] fp32, {name:28s} {t.median_ms:7.3f} ms", flush=True)


def moe_swiglu():
    from qwen3_next_mcore.ops.moe_swiglu import weighted_swiglu

    h, p = randn(T * K, 2 * FFN), torch.rand(T * K, device=DEV, requires_grad=True)
    for backend in ("triton", "compile", "torch"):
        rep(f"experts' weighted SwiGLU [{T * K}, {2 * FFN}] bf16, {backend}",
            lambda: weighted_swiglu(h, p, backend=backend), h, p)  # noqa: B023


def sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = randn(4, 16, 4096, 256), randn(4, 2, 4096, 256), randn(4, 2, 4096, 256)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                rep(f"sdpa gqa {backend}",
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), q, k, v)
        except RuntimeError as e:
            print(backend, type(e).__name__, str(e)[:200])


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.op_probes times CUDA kernels: run it on a machine with a CUDA GPU")
    import sys

    probes = {p.__name__: p for p in (grouped_gemms, permutation, norms, router, router_topk, moe_swiglu, sdpa)}
    for name in sys.argv[1:] or probes:
        if name not in probes:
            raise SystemExit(f"unknown probe {name!r}; one of {', '.join(probes)}")
        probes[name]()
        torch.cuda.empty_cache()
