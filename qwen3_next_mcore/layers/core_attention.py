"""Causal softmax attention through PyTorch's ``scaled_dot_product_attention``.

Drop-in for megatron-core's ``core_attention`` slot (same constructor and forward signature as its
``DotProductAttention``), for the local (non-Transformer-Engine) backend: flash attention on GPU through
SDPA, grouped-query attention without repeating k/v (``enable_gqa``), packed sequences (thd) by
attending within each ``cu_seqlens`` segment, and no CUDA-only mask building (runs on CPU).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """forward(q [S, B, nq, d], k/v [S, B, nkv, d]) -> [S, B, nq*d]; thd: q [T, nq, d] -> [T, nq*d]."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None, **_: object):
        super().__init__(config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPACoreAttention does not support context_parallel > 1; use the "
                             "Transformer Engine backend for context parallelism")
        self.layer_number = layer_number
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def _sdpa(self, q_bhsd, k_bhsd, v_bhsd):
        gqa = q_bhsd.shape[1] != k_bhsd.shape[1]
        return F.scaled_dot_product_attention(
            q_bhsd, k_bhsd, v_bhsd, is_causal=True, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=gqa)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[PackedSeqParams] = None):
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention: attention_bias is not supported")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            # query [T, nq, d]; attend within each sequence
            bounds = packed_seq_params.cu_seqlens_q.tolist()
            outs = []
            for start, end in zip(bounds[:-1], bounds[1:]):
                if end == start:
                    continue
                q, k, v = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
                outs.append(self._sdpa(q, k, v)[0].transpose(0, 1))
            out = torch.cat(outs, dim=0)
            if out.shape[0] != query.shape[0]:  # tokens after the last boundary (padding) get zeros
                pad = out.new_zeros(query.shape[0] - out.shape[0], *out.shape[1:])
                out = torch.cat([out, pad], dim=0)
            return out.reshape(out.shape[0], -1)
        # [S, B, n, d] -> [B, n, S, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self._sdpa(q, k, v)  # [B, nq, S, d]
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)
