"""Model FLOPs: a hand count of Qwen3-Next-80B-A3B at 4,096 tokens, scaling on the tiny preset, and the
per-token total against ~2 x the 3B active parameters."""

from __future__ import annotations

import pytest

from qwen3_next_mcore.config import get_preset
from qwen3_next_mcore.training.flops import COMPONENTS, forward_flops, training_flops

S = 4096


def hand_count_80b() -> dict[str, float]:
    """The released config written out: hidden 2048; 48 layers = 36 GDN + 12 attention; attention 16 q heads,
    2 kv heads, head_dim 256; GDN 16 key heads x 128, 32 value heads x 128, conv kernel 4; 512 experts top-10,
    expert ffn 512, shared ffn 512; vocab 151936; 1 MTP layer. A matmul [m,k]x[k,n] is 2mkn."""
    s = S
    # GDN, per layer: in_proj_qkvz 2048 -> 2*16*128 + 2*32*128 = 12288, in_proj_ba 2048 -> 64, out_proj 4096 -> 2048
    gdn_proj = 2 * s * 2048 * 12288 + 2 * s * 2048 * 64 + 2 * s * 4096 * 2048
    # depthwise conv over q,k,v = 2048 + 2048 + 4096 = 8192 channels, kernel 4: 2 * 4 per channel and token
    gdn_conv = 2 * 4 * 8192 * s
    # recurrence: 7 * 128 * 128 per token per value head, 32 value heads
    gdn_rec = 7 * 128 * 128 * 32 * s
    # attention, per layer: q_proj 2048 -> 16*256*2 = 8192 (query + gate), k/v 2048 -> 2*256 = 512, o 4096 -> 2048
    attn_proj = 2 * s * 2048 * 8192 + 2 * (2 * s * 2048 * 512) + 2 * s * 4096 * 2048
    # core: (QK^T + PV) 2 * 2 * s * s * 16 * 256, halved by the causal mask
    attn_core = 2 * 2 * s * s * 16 * 256 // 2
    # MoE, per layer: router 2048 -> 512; 10 experts of (2048 -> 1024, 512 -> 2048); shared the same + gate 2048 -> 1
    router = 2 * s * 2048 * 512
    routed = 10 * (2 * s * 2048 * 1024 + 2 * s * 512 * 2048)
    shared = 2 * s * 2048 * 1024 + 2 * s * 512 * 2048 + 2 * s * 2048 * 1
    lm_head = 2 * s * 2048 * 151936
    # MTP: eh_proj 4096 -> 2048, one attention + MoE layer, its own logits
    mtp = 2 * s * 4096 * 2048 + attn_proj + attn_core + router + routed + shared + lm_head
    out = {
        "gdn_proj": 36 * gdn_proj, "gdn_conv": 36 * gdn_conv, "gdn_recurrence": 36 * gdn_rec,
        "attn_proj": 12 * attn_proj, "attn_core": 12 * attn_core,
        "router": 48 * router, "routed_experts": 48 * routed, "shared_expert": 48 * shared,
        "mtp": 1 * mtp, "lm_head": lm_head,
    }
    out["total"] = sum(out.values())
    return out


def test_80b_forward_equals_the_hand_count():
    got = forward_flops(get_preset("qwen3-next-80b-a3b"), S)
    want = hand_count_80b()
    assert set(got) == set(COMPONENTS) | {"total"} == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=0), key


def test_80b_per_token_is_about_twice_the_active_parameters():
    """~3B active parameters per token (3.6B counting the LM head, without the embedding) plus the MTP layer
    and its logits (~0.4B): the forward without the attention core must be 2 x 3-6B per token; we assert
    [4e9, 1.2e10] FLOPs per token."""
    want = hand_count_80b()
    attn_core_per_layer = want["attn_core"] / 12
    no_core = want["total"] - want["attn_core"] - attn_core_per_layer  # main layers and the MTP layer's core
    got = forward_flops(get_preset("qwen3-next-80b-a3b"), S)
    assert got["total"] - got["attn_core"] - got["attn_core"] / 12 == pytest.approx(no_core, rel=1e-12)
    per_token = no_core / S
    assert 4e9 <= per_token <= 1.2e10, per_token
    assert 7.5e9 < per_token < 8.5e9  # 2 x (3.56B main + 0.38B MTP) + GDN conv/recurrence


def test_tiny_scales_with_the_layer_types():
    tiny = get_preset("tiny")  # 3 GDN + 1 attention + 1 MTP layer
    base = forward_flops(tiny, 128)
    # doubling the GDN layers (6 GDN + 1 attention) doubles the GDN terms and adds 3 MoE blocks
    gdn6 = get_preset("tiny", num_hidden_layers=7, layer_types=("linear_attention",) * 3 + ("full_attention",)
                      + ("linear_attention",) * 3)
    got = forward_flops(gdn6, 128)
    for key in ("gdn_proj", "gdn_conv", "gdn_recurrence"):
        assert got[key] == pytest.approx(2 * base[key], rel=1e-12)
    for key in ("attn_proj", "attn_core", "mtp", "lm_head"):
        assert got[key] == pytest.approx(base[key], rel=1e-12)
    for key in ("router", "routed_experts", "shared_expert"):
        assert got[key] == pytest.approx(base[key] * 7 / 4, rel=1e-12)
    # doubling the attention layers doubles the attention terms
    attn2 = get_preset("tiny", num_hidden_layers=5, layer_types=("linear_attention",) * 3 + ("full_attention",) * 2)
    got = forward_flops(attn2, 128)
    for key in ("attn_proj", "attn_core"):
        assert got[key] == pytest.approx(2 * base[key], rel=1e-12)
    # the attention core is quadratic, everything else linear in the sequence length
    long = forward_flops(tiny, 256)
    assert long["attn_core"] == pytest.approx(4 * base["attn_core"], rel=1e-12)
    for key in ("gdn_proj", "gdn_conv", "gdn_recurrence", "attn_proj", "routed_experts", "lm_head"):
        assert long[key] == pytest.approx(2 * base[key], rel=1e-12)
    # top-k scales the routed experts only; no MTP removes the MTP term
    assert forward_flops(get_preset("tiny", num_experts_per_tok=4), 128)["routed_experts"] == \
        pytest.approx(2 * base["routed_experts"], rel=1e-12)
    assert forward_flops(get_preset("tiny", mtp_num_layers=0), 128)["mtp"] == 0
    assert base["total"] == pytest.approx(sum(base[k] for k in COMPONENTS), rel=1e-12)


def test_training_flops_recompute():
    cfg = get_preset("qwen3-next-80b-a3b")
    fwd = hand_count_80b()
    assert training_flops(cfg, S, 8) == pytest.approx(3 * 8 * fwd["total"], rel=1e-12)
    assert training_flops(cfg, S, 8, recompute="full") == pytest.approx(4 * 8 * fwd["total"], rel=1e-12)
    core_with_mtp = fwd["attn_core"] * 13 / 12
    assert training_flops(cfg, S, 8, recompute="selective") == \
        pytest.approx(8 * (3 * fwd["total"] + core_with_mtp), rel=1e-12)
    with pytest.raises(ValueError, match="recompute"):
        training_flops(cfg, S, 1, recompute="block")
