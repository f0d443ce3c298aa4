"""Pure tensor functions (no nn.Module, no process groups) behind the Qwen3-Next layers.

Layout: fla's ``[B, T, H, K]`` (batch, time, heads, head dim) and channel-last ``[B, T, D]``.
Each op picks its backend from the tensors' device (CPU -> plain torch, CUDA -> fused kernels, raising
when they are missing); see docs/kernels.md.
"""

from .backends import (
    KernelEnv,
    conv_backend_report,
    conv_split_backend_report,
    detect_kernel_env,
    gdn_backend_report,
    grouped_gemm_backend_report,
    norm_backend_report,
    router_topk_backend_report,
)
from .causal_conv1d import causal_conv1d
from .gated_delta_rule import (
    chunk_gated_delta_rule,
    gated_delta_rule,
    l2norm,
    naive_recurrent_gated_delta_rule,
)
from .gdn_conv_split import conv_split_qkvz, conv_split_qkvz_reference
from .norms import gated_rms_norm, zero_centered_rms_norm
from .router_topk import row_topk_indices, row_topk_reference

__all__ = [
    "KernelEnv",
    "causal_conv1d",
    "chunk_gated_delta_rule",
    "conv_backend_report",
    "conv_split_backend_report",
    "conv_split_qkvz",
    "conv_split_qkvz_reference",
    "detect_kernel_env",
    "gated_delta_rule",
    "gated_rms_norm",
    "gdn_backend_report",
    "grouped_gemm_backend_report",
    "l2norm",
    "naive_recurrent_gated_delta_rule",
    "norm_backend_report",
    "router_topk_backend_report",
    "row_topk_indices",
    "row_topk_reference",
    "zero_centered_rms_norm",
]
