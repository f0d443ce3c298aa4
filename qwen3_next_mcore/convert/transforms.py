"""Pure layout transforms between Hugging Face Qwen3-Next weights and ours (no I/O, no process groups).

Each ``merge_*`` builds our full (unsharded) tensor from HF tensors and each ``split_*`` is its exact
inverse (bit-exact: only slicing and concatenation, never arithmetic). Our layouts do not depend on the
tensor-parallel size: a TP rank's share is always a contiguous block (see the module docstrings of
``layers/gated_deltanet.py`` and megatron-core's attention ``linear_qkv``).
"""

from __future__ import annotations

import torch


# ----- GDN depthwise conv: HF channels [all q | all k | all v]  <->  ours group-major [q_g, k_g, v_g]* -----
def merge_gdn_conv(w: torch.Tensor, num_k_heads: int, dk: int, num_v_heads: int, dv: int) -> torch.Tensor:
    """HF conv1d.weight [2*nk*dk + nv*dv, 1, W] -> ours, group-major, same shape."""
    r = num_v_heads // num_k_heads
    q, k, v = torch.split(w, [num_k_heads * dk, num_k_heads * dk, num_v_heads * dv], dim=0)
    tail = w.shape[1:]
    parts = [q.reshape(num_k_heads, dk, *tail), k.reshape(num_k_heads, dk, *tail),
             v.reshape(num_k_heads, r * dv, *tail)]
    return torch.cat(parts, dim=1).reshape(w.shape)


def split_gdn_conv(w: torch.Tensor, num_k_heads: int, dk: int, num_v_heads: int, dv: int) -> torch.Tensor:
    """Inverse of :func:`merge_gdn_conv`."""
    r = num_v_heads // num_k_heads
    tail = w.shape[1:]
    g = w.reshape(num_k_heads, 2 * dk + r * dv, *tail)
    q, k, v = torch.split(g, [dk, dk, r * dv], dim=1)
    return torch.cat([q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)], dim=0)


# ----- gated attention: HF q_proj (per head [query, gate]), k_proj, v_proj  <->  megatron linear_qkv -----
def merge_attention_qkv(q_proj: torch.Tensor, k_proj: torch.Tensor, v_proj: torch.Tensor,
                        num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """-> linear_qkv.weight [nkv * (2*hpg + 2) * d, H]; per KV group: [queries, gates, key, value]."""
    hidden = q_proj.shape[-1]
    hpg = num_heads // num_kv_heads
    qg = q_proj.reshape(num_kv_heads, hpg, 2, head_dim, hidden)
    query, gate = qg[:, :, 0].reshape(num_kv_heads, hpg * head_dim, hidden), qg[:, :, 1].reshape(
        num_kv_heads, hpg * head_dim, hidden)
    k = k_proj.reshape(num_kv_heads, head_dim, hidden)
    v = v_proj.reshape(num_kv_heads, head_dim, hidden)
    return torch.cat([query, gate, k, v], dim=1).reshape(-1, hidden)


def split_attention_qkv(w: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """Inverse of :func:`merge_attention_qkv` -> (q_proj, k_proj, v_proj)."""
    hidden = w.shape[-1]
    hpg = num_heads // num_kv_heads
    g = w.reshape(num_kv_heads, (2 * hpg + 2) * head_dim, hidden)
    query, gate, k, v = torch.split(g, [hpg * head_dim, hpg * head_dim, head_dim, head_dim], dim=1)
    q_proj = torch.stack([query.reshape(num_kv_heads, hpg, head_dim, hidden),
                          gate.reshape(num_kv_heads, hpg, head_dim, hidden)], dim=2)
    return q_proj.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


# ----- SwiGLU fc1: HF gate_proj, up_proj  <->  megatron linear_fc1 [gate; up] -----
def merge_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_glu(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = w.chunk(2, dim=0)
    return gate, up


# ----- transformers 5.x fused experts (in memory) -> per-expert tensors -----
def unfuse_experts_gate_up(gate_up: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mlp.experts.gate_up_proj`` [E, 2F, H] (gate rows first) -> (gate [F, H], up [F, H]) of ``expert``."""
    return split_glu(gate_up[expert])


# ----- tensor-parallel shares (contiguous blocks) -----
def tp_shard(full: torch.Tensor, dim: int, rank: int, size: int, glu: bool = False) -> torch.Tensor:
    """This rank's block of ``full`` along ``dim``. ``glu``: [gate; up] is split in each half, as
    megatron-core shards a SwiGLU fc1 (rank r holds [gate_r; up_r])."""
    if size == 1:
        return full
    if glu:
        gate, up = split_glu(full)
        return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    if full.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split into {size} ranks")
    return full.chunk(size, dim=dim)[rank]


def tp_unshard(shards: list[torch.Tensor], dim: int, glu: bool = False) -> torch.Tensor:
    """Inverse of :func:`tp_shard` over all ranks' shares (in rank order)."""
    if len(shards) == 1:
        return shards[0]
    if glu:
        halves = [split_glu(s) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves], dim=dim), torch.cat([h[1] for h in halves], dim=dim)],
                         dim=dim)
    return torch.cat(shards, dim=dim)
