"""Pure pieces of the converter: every fused/reordered transform is split(merge(x)) == x bit for bit, and
a tensor-parallel rank's block of a merged tensor is the merge of that rank's share of the HF tensors
(our layouts do not depend on the TP size); the checkpoint key table; sizes."""

from __future__ import annotations

import pytest
import torch
from convert_helpers import tiny_config

from qwen3_next_mcore.convert import mapping as M
from qwen3_next_mcore.convert import transforms as T
from qwen3_next_mcore.convert.output import parse_size


def _bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_glu(dtype, tp):
    F, H = 8, 6
    gate, up = _randn(F, H, dtype=dtype, seed=1), _randn(F, H, dtype=dtype, seed=2)
    fused = T.merge_glu(gate, up)
    shards = [T.tp_shard(fused, 0, r, tp, glu=True) for r in range(tp)]
    for r, s in enumerate(shards):  # rank r holds [gate_r; up_r]
        assert _bits(s, T.merge_glu(gate.chunk(tp)[r], up.chunk(tp)[r]))
    back = T.split_glu(T.tp_unshard(shards, 0, glu=True))
    assert _bits(back[0], gate) and _bits(back[1], up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("nk, nv, dk, dv", [(4, 8, 3, 5), (4, 4, 2, 2), (8, 24, 4, 3)])
def test_gdn_conv(dtype, tp, nk, nv, dk, dv):
    W = 4
    hf = _randn(2 * nk * dk + nv * dv, 1, W, dtype=dtype)
    ours = T.merge_gdn_conv(hf, nk, dk, nv, dv)
    assert _bits(T.split_gdn_conv(ours, nk, dk, nv, dv), hf)
    q, k, v = hf.split([nk * dk, nk * dk, nv * dv])
    for r in range(tp):  # rank r's contiguous block is the conv of its own key-head groups
        share = torch.cat([q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]])
        assert _bits(T.tp_shard(ours, 0, r, tp), T.merge_gdn_conv(share, nk // tp, dk, nv // tp, dv))
    assert _bits(T.split_gdn_conv(T.tp_unshard([T.tp_shard(ours, 0, r, tp) for r in range(tp)], 0),
                                  nk, dk, nv, dv), hf)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("nh, nkv, d", [(4, 2, 3), (8, 2, 4), (2, 2, 5)])
def test_attention_qkv(dtype, tp, nh, nkv, d):
    H = 7
    q, k, v = _randn(2 * nh * d, H, dtype=dtype, seed=1), _randn(nkv * d, H, dtype=dtype, seed=2), \
        _randn(nkv * d, H, dtype=dtype, seed=3)
    ours = T.merge_attention_qkv(q, k, v, nh, nkv, d)
    back = T.split_attention_qkv(ours, nh, nkv, d)
    assert all(_bits(a, b) for a, b in zip(back, (q, k, v)))
    for r in range(tp):  # a TP rank's rows are the merge of its own query groups
        share = T.merge_attention_qkv(q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r], nh // tp, nkv // tp, d)
        assert _bits(T.tp_shard(ours, 0, r, tp), share)


def test_fused_experts_unfuse():
    gate_up = _randn(3, 8, 5)
    gate, up = T.unfuse_experts_gate_up(gate_up, 1)
    assert _bits(T.merge_glu(gate, up), gate_up[1])


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=True, mtp_num_layers=0)])
def test_rules_round_trip_and_shapes(overrides):
    """to_hf(to_ours(x)) == x for every rule; ours_shape agrees with the transform."""
    cfg = tiny_config(**overrides)
    shapes = M.expected_hf_shapes(cfg)
    for i, rule in enumerate(M.build_rules(cfg)):
        hf = [_randn(*shapes[n], seed=i + j) for j, n in enumerate(rule.hf)]
        ours = M.to_ours(rule, hf, cfg)
        assert tuple(ours.shape) == M.ours_shape(rule, cfg, shapes), rule
        assert all(_bits(a, b) for a, b in zip(M.to_hf(rule, ours, cfg), hf)), rule


def test_checkpoint_keys():
    assert M.mcore_key("decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight") == (
        "decoder.layers.3.mlp.experts.experts.linear_fc1.weight", 5)
    assert M.mcore_key("decoder.layers.0.self_attention.in_proj_qkvz.weight") == (
        "decoder.layers.0.self_attention.in_proj_qkvz.weight", None)
    cfg = tiny_config()
    shapes = M.mcore_tensor_shapes(cfg)
    assert shapes["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"] == (8, 64, 64)
    assert shapes["mtp.layers.0.mtp_model_layer.layers.1.mlp.experts.experts.linear_fc2.weight"] == (8, 64, 32)
    objects = M.mcore_object_keys(cfg)
    assert "decoder.layers.1.mlp.experts.experts.linear_fc1._extra_state/shard_7_8" in objects
    assert "output_layer._extra_state/shard_0_1" in objects


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5KB") == 1500
    assert parse_size(123) == 123
    for bad in ("", "5XB", "-1GB", "0"):
        with pytest.raises(ValueError, match="expected a positive size"):
            parse_size(bad)
