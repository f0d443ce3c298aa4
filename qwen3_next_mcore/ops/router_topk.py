"""The router's top-k: which k experts each token picks, from its ``[N, E]`` scores.

Why our own: at Qwen3-Next's 512 experts and top-10, ``torch.topk`` on CUDA runs a multi-pass radix
select (four kernels) that took 0.40 ms per MoE layer for 16k tokens on an H200, about as long as the
router's GEMM forward and backward together. The routing needs only the indices (megatron-core's
``topk_routing_with_score_function`` takes them as ``precomputed_indices`` and gathers the scores, so
autograd is unchanged), and a row of 512 scores fits in one program's registers: the Triton kernel
(``_router_topk_kernels``) picks the k largest in k rounds of a row maximum: 0.133 ms against 0.447 ms
(H200, 16k x 512, top-10). At 64 experts ``torch.topk`` is faster (0.048 against 0.076 ms), so the
automatic choice uses the kernel from :data:`TRITON_MIN_EXPERTS` experts on.

Order: descending scores; equal scores in ascending column order (``torch.topk`` leaves ties
unspecified). NaN: a positive-signed NaN ranks above every number, a negative-signed one below (torch
ranks every NaN first); router logits with NaN have already broken the step.

Reference: :func:`row_topk_reference` (a stable sort); ``tests/ops/test_router_topk.py`` compares them
(on CPU under Triton's interpreter, and on CUDA).
"""

from __future__ import annotations

import torch

from .backends import AUTO, env_for, router_topk_backend, triton_interpreted

ROWS_PER_PROGRAM = 4
# below this many experts the automatic choice keeps torch.topk: on an H200, 8192 tokens x 64 experts
# top-10 took 0.048 ms with torch.topk against 0.076 ms with the kernel (16k x 512: 0.447 vs 0.133 ms)
TRITON_MIN_EXPERTS = 128


def row_topk_indices(scores: torch.Tensor, k: int, *, backend: str | None = None) -> torch.Tensor:
    """scores [N, E] (fp32/bf16/fp16) -> int64 [N, k]: each row's k largest columns, largest first (ties:
    lower column first). backend None/"auto": "triton" on CUDA from :data:`TRITON_MIN_EXPERTS` experts on,
    "torch" (``torch.topk``) otherwise and on CPU."""
    if scores.dim() != 2:
        raise ValueError(f"row_topk_indices: scores must be [tokens, experts], got {tuple(scores.shape)}")
    N, E = scores.shape
    if not 0 < k <= E:
        raise ValueError(f"row_topk_indices: k={k} must be in 1..{E} (the number of experts)")
    if backend in AUTO and E < TRITON_MIN_EXPERTS:
        backend = "torch"
    if router_topk_backend(env_for(scores), backend, interpreted=triton_interpreted()) == "torch":
        return torch.topk(scores, k, dim=1).indices
    import triton

    from ._router_topk_kernels import row_topk_kernel

    if scores.stride(1) != 1:
        scores = scores.contiguous()
    out = torch.empty(N, k, dtype=torch.int64, device=scores.device)
    if N:
        block_e = max(16, triton.next_power_of_2(E))
        row_topk_kernel[(-(-N // ROWS_PER_PROGRAM),)](scores, out, N, E, scores.stride(0), K=k, BLOCK_E=block_e,
                                                       ROWS=ROWS_PER_PROGRAM, num_warps=4)
    return out


def row_topk_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`row_topk_indices` by a stable descending sort of each row (ties: lower column first)."""
    return torch.sort(scores.float(), dim=1, descending=True, stable=True).indices[:, :k]
