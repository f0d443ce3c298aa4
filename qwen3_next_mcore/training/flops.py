"""Model FLOPs of Qwen3-Next training, counted from the architecture (not ``6 * params``).

Conventions (all counts are floating-point operations, a multiply-add is 2):

- A matmul [m, k] x [k, n] is ``2 * m * k * n``. Every projection is counted per token, so a layer with
  weight [out, in] costs ``2 * s * in * out`` for a sequence of ``s`` tokens. No bias exists anywhere.
- Not counted (they are O(s * width), well under 1% of the total): norms, activations (SiLU, sigmoid,
  softmax), RoPE, residual adds, the routing top-k and its renormalisation, the MoE probability scaling,
  the GDN decay/beta gates, the L2 norms and the gated output norm, the loss. Embedding lookups are 0.
- Gated attention (spec 3.3): ``q_proj`` carries the output gate (``heads * head_dim * 2`` outputs), then
  ``k_proj``, ``v_proj`` (``kv_heads * head_dim`` each) and ``o_proj``. The core (QK^T and PV, each
  ``2 * s * s * heads * head_dim`` for the full square) is halved for the causal mask:
  ``attn_core = (2 + 2) * s * s * heads * head_dim / 2``, i.e. half the s x s score matrix (s^2 / 2,
  not s (s + 1) / 2), Megatron-LM's convention. Packed sequences are counted as one sequence of
  ``seq_length`` tokens (an upper bound on their attention cost).
- Gated DeltaNet (spec 3.4): ``in_proj_qkvz`` (h -> 2 kh kd + 2 vh vd), ``in_proj_ba`` (h -> 2 vh) and
  ``out_proj`` (vh vd -> h) are ``gdn_proj``. The depthwise causal conv over the [q | k | v] channels
  (2 kh kd + vh vd of them) costs ``2 * kernel`` per channel and token (``gdn_conv``). The recurrence
  (``gdn_recurrence``) is counted in its token-recurrent form, per token and value head, on the state
  S [kd x vd]: ``S = exp(g) S`` (kd vd), ``S^T k`` (2 kd vd), ``S += k u^T`` with u = beta (v - S^T k)
  (outer product and add, 2 kd vd), ``o = S^T q`` (2 kd vd): **7 kd vd** per token per value head. The
  chunked kernels do somewhat more work (intra-chunk products of O(chunk) per token); like the causal
  attention count, this is the algorithm's FLOPs, not a kernel's.
- MoE block (every layer, spec 3.5): ``router`` h -> num_experts; ``routed_experts`` the top-k experts per
  token, each a SwiGLU MLP (gate+up h -> 2 moe_ffn, down moe_ffn -> h), dropless (no capacity factor);
  ``shared_expert`` a SwiGLU MLP of ``shared_expert_intermediate_size`` plus its sigmoid gate (h -> 1).
- ``lm_head``: h -> vocab for every token.
- ``mtp``: per MTP layer, ``eh_proj`` (2h -> h), one full-attention decoder layer with its MoE block
  (projections, causal core, router, routed and shared experts as above) and its own logits (the shared
  output weight is one more h x vocab matmul per token). Megatron computes MTP on all ``s`` positions.

Training: the backward pass costs twice the forward (gradients with respect to activations and to
weights), so one step is ``3 * forward`` per sequence. Recomputation adds work actually executed:
``recompute="full"`` one more forward of the whole model (``4 * forward``; an upper bound when
``--recompute-num-layers`` covers fewer layers), ``recompute="selective"`` one more forward of the
softmax-attention cores (main and MTP layers; megatron-core's default selective module ``core_attn``).
With ``recompute=None`` the count is the model FLOPs used for MFU.
"""

from __future__ import annotations

from ..config import Qwen3NextConfig

COMPONENTS = ("gdn_proj", "gdn_conv", "gdn_recurrence", "attn_proj", "attn_core", "router", "routed_experts",
              "shared_expert", "mtp", "lm_head")


def _matmul(tokens: float, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def _attention(c: Qwen3NextConfig, s: int) -> tuple[float, float]:
    """(projections, causal core) of one gated-attention layer over ``s`` tokens."""
    h, q_width, kv_width = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    proj = (_matmul(s, h, 2 * q_width)  # q_proj: query and output gate
            + 2 * _matmul(s, h, kv_width)  # k_proj, v_proj
            + _matmul(s, q_width, h))  # o_proj
    core = 2 * 2.0 * s * s * q_width / 2  # QK^T and PV, causal: half the score matrix
    return proj, core


def _moe(c: Qwen3NextConfig, s: int) -> tuple[float, float, float]:
    """(router, routed experts, shared expert) of one MoE block over ``s`` tokens."""
    h = c.hidden_size

    def swiglu(ffn: int) -> float:
        return _matmul(s, h, 2 * ffn) + _matmul(s, ffn, h)

    router = _matmul(s, h, c.num_experts)
    routed = c.num_experts_per_tok * swiglu(c.moe_intermediate_size)
    shared = swiglu(c.shared_expert_intermediate_size) + _matmul(s, h, 1)
    return router, routed, shared


def _gdn(c: Qwen3NextConfig, s: int) -> tuple[float, float, float]:
    """(projections, conv, recurrence) of one Gated DeltaNet layer over ``s`` tokens."""
    h, kd, vd = c.hidden_size, c.linear_key_head_dim, c.linear_value_head_dim
    proj = (_matmul(s, h, 2 * c.linear_key_dim + 2 * c.linear_value_dim)  # in_proj_qkvz
            + _matmul(s, h, 2 * c.linear_num_value_heads)  # in_proj_ba
            + _matmul(s, c.linear_value_dim, h))  # out_proj
    conv = 2.0 * c.linear_conv_kernel_dim * c.linear_conv_dim * s
    recurrence = 7.0 * kd * vd * c.linear_num_value_heads * s
    return proj, conv, recurrence


def forward_flops(config: Qwen3NextConfig, seq_length: int) -> dict[str, float]:
    """Forward FLOPs of one sequence of ``seq_length`` tokens, by component (:data:`COMPONENTS`) and
    ``"total"`` (their sum). Conventions in the module docstring."""
    c, s = config, seq_length
    n_gdn, n_attn, n_mtp = c.num_linear_layers, c.num_full_layers, c.mtp_num_layers
    gdn_proj, gdn_conv, gdn_rec = _gdn(c, s)
    attn_proj, attn_core = _attention(c, s)
    router, routed, shared = _moe(c, s)
    lm_head = _matmul(s, c.hidden_size, c.vocab_size)
    mtp_layer = _matmul(s, 2 * c.hidden_size, c.hidden_size) + attn_proj + attn_core + router + routed + shared \
        + lm_head
    out = {
        "gdn_proj": n_gdn * gdn_proj,
        "gdn_conv": n_gdn * gdn_conv,
        "gdn_recurrence": n_gdn * gdn_rec,
        "attn_proj": n_attn * attn_proj,
        "attn_core": n_attn * attn_core,
        "router": c.num_hidden_layers * router,
        "routed_experts": c.num_hidden_layers * routed,
        "shared_expert": c.num_hidden_layers * shared,
        "mtp": n_mtp * mtp_layer,
        "lm_head": lm_head,
    }
    out["total"] = sum(out.values())
    return out


def training_flops(config: Qwen3NextConfig, seq_length: int, sequences: int, *,
                   recompute: str | None = None) -> float:
    """FLOPs of one training step over ``sequences`` sequences of ``seq_length`` tokens: forward and
    backward (``3 * forward``), plus the recomputed forward work: ``"full"`` one more forward
    (``4 * forward``), ``"selective"`` one more forward of every softmax-attention core (MTP included)."""
    if recompute not in (None, "full", "selective"):
        raise ValueError(f"recompute={recompute!r}: expected None, 'full' or 'selective'")
    fwd = forward_flops(config, seq_length)
    per_sequence = 3 * fwd["total"]
    if recompute == "full":
        per_sequence += fwd["total"]
    elif recompute == "selective":
        per_sequence += (config.num_full_layers + config.mtp_num_layers) * _attention(config, seq_length)[1]
    return per_sequence * sequences


# Dense (not sparse) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, matched in this order
# against torch.cuda.get_device_name: the denominator of MFU (model FLOPs utilisation).
DENSE_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H800", 989.4),
    ("GH200", 989.4),
    ("H200 NVL", 835.5),
    ("H200", 989.4),
    ("A100", 312.0),
)


def dense_bf16_peak_tflops(device_name: str) -> float | None:
    """The card's datasheet dense bf16 peak (TFLOP/s) for ``device_name``, None for a card not listed."""
    return next((peak for key, peak in DENSE_BF16_PEAK_TFLOPS if key in device_name), None)
