"""ops/rope.py: our partial RoPE against megatron-core's unfused one (the code it replaces in the
attention) and a float64 reference, packed sequences against megatron-core's per-sequence loop, the
compiled form against the eager one, and the model's attention calling it."""

from __future__ import annotations

import pytest
import torch

from qwen3_next_mcore.ops.rope import (
    apply_rotary_pos_emb,
    packed_positions,
    partial_rotary,
    partial_rotary_packed,
)


def _freqs(s: int, rot: int, base: float = 10000.0) -> torch.Tensor:
    """megatron-core's RotaryEmbedding layout: [s, 1, 1, rot] = cat(angles, angles)."""
    inv = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    return torch.cat((ang, ang), dim=-1)[:, None, None, :]


def _inputs(s=37, b=2, h=3, d=32, rot=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, h, d, generator=g) * 2).to(dtype), _freqs(s, rot)


def _megatron(t, freqs):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    return _apply_rotary_pos_emb_bshd(t, freqs)


def test_equals_megatron_fp32_and_is_closer_to_fp64_in_bf16():
    t, f = _inputs()
    torch.testing.assert_close(partial_rotary(t, f), _megatron(t, f), rtol=1e-6, atol=1e-6)
    assert torch.equal(partial_rotary(t, f)[..., 8:], t[..., 8:])  # pass-through dims untouched
    ref = _megatron(t.double(), f.double())
    t16 = t.bfloat16()
    ours, theirs = partial_rotary(t16, f), _megatron(t16, f)
    assert ours.dtype == torch.bfloat16 and ours.shape == t.shape
    err = lambda x: ((x.double() - ref).norm() / ref.norm()).item()
    # megatron rounds cos/sin and every product to bf16; ours rounds once
    assert err(ours) <= err(theirs) and err(ours) < 4e-3


def test_gradients_equal_megatron():
    t, f = _inputs(dtype=torch.float64)
    a, b = t.clone().requires_grad_(), t.clone().requires_grad_()
    g = torch.randn_like(t)
    (partial_rotary(a, f.double()) * g).sum().backward()
    (_megatron(b, f.double()) * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_bad_rotary_width_is_refused():
    t, _ = _inputs(d=8)
    with pytest.raises(ValueError, match="rotary dims 10"):
        partial_rotary(t, _freqs(t.shape[0], 10))


def test_packed_positions_restart_per_sequence():
    cu = torch.tensor([0, 3, 3, 7, 9], dtype=torch.int32)  # an empty sequence too
    assert packed_positions(cu, 9).tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("whole_batch_freqs", [False, True])
def test_packed_equals_megatron_thd(whole_batch_freqs):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd

    class OneRank:
        def size(self):
            return 1

        def rank(self):
            return 0

    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    t = torch.randn(20, 3, 16, generator=torch.Generator().manual_seed(1))
    f = _freqs(20 if whole_batch_freqs else 8, 8)
    ours = partial_rotary_packed(t, cu, f)
    theirs = _apply_rotary_pos_emb_thd(t, cu, f, cp_group=OneRank())
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_compiled_equals_eager():
    """Also on a strided view (q and k are slices of the fused projection): the compiled op gets a
    contiguous copy (ops.backends.compiled_or_eager) and the gradient still reaches the base tensor."""
    t, f = _inputs(s=16)
    g = torch.randn_like(t)
    for make in (lambda x: x, lambda x: torch.cat((x, x[..., :8]), dim=-1)[..., :-8]):
        a, b = t.clone().requires_grad_(), t.clone().requires_grad_()
        ya, yb = partial_rotary(make(a), f, backend="compile"), partial_rotary(make(b), f, backend="torch")
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_megatron_options_we_do_not_cover_go_to_megatron(monkeypatch, caplog):
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings import rope_utils

    from qwen3_next_mcore.ops import backends

    monkeypatch.setattr(backends, "_LOGGED", set())
    caplog.set_level("INFO", logger="qwen3_next_mcore.ops.rope")
    calls = []
    monkeypatch.setattr(rope_utils, "apply_rotary_pos_emb", lambda *a, **k: calls.append(k) or "megatron")
    plain = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False)
    t, f = _inputs()
    assert torch.equal(apply_rotary_pos_emb(t, f, plain), partial_rotary(t, f)) and not calls
    assert apply_rotary_pos_emb(t, f, plain, mscale=0.5) == "megatron"
    assert apply_rotary_pos_emb(t, f, SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=True)) == "megatron"
    assert apply_rotary_pos_emb(t, f, SimpleNamespace(apply_rope_fusion=True, rotary_interleaved=False)) == "megatron"
    assert apply_rotary_pos_emb(t, f, plain, mscale=0.5) == "megatron"
    assert len(calls) == 4
    prefix = "rotary embedding: megatron-core's "
    logged = [r.getMessage().removeprefix(prefix) for r in caplog.records if r.getMessage().startswith(prefix)]
    assert logged == ["(mscale 0.5)", "(interleaved rotary)", "(TE's fused RoPE asked for)"]  # once per reason


def test_the_models_attention_uses_it(monkeypatch):
    from megatron.core.transformer import attention

    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.model import build_model
    from qwen3_next_mcore.ops import rope

    parallel.initialize()
    try:
        model = build_model(get_preset("tiny", vocab_size=128))
        assert attention.apply_rotary_pos_emb is rope.apply_rotary_pos_emb
        calls = []
        real = rope.partial_rotary
        monkeypatch.setattr(rope, "partial_rotary", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
        ids = torch.randint(0, 128, (1, 12))
        model(ids, torch.arange(12)[None], attention_mask=None)
        # q and k of every attention layer (the main stack and MTP)
        n_attention = sum(1 for m in model.modules() if isinstance(m, attention.SelfAttention))
        assert n_attention >= 1 and len(calls) == 2 * n_attention
    finally:
        parallel.destroy()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_on_cuda_equals_megatron_at_the_80b_shape():
    """The attention's q at the real widths (16 heads x 256, 64 rotary dims), bf16: the compiled op (the
    CUDA default) against megatron-core's unfused chain in fp32, forward and input gradient."""
    t, f = _inputs(s=1024, b=2, h=16, d=256, rot=64)
    t, f = t.cuda(), f.cuda()
    ref_in = t.clone().requires_grad_()
    g = torch.randn_like(t)
    (_megatron(ref_in, f) * g).sum().backward()
    x = t.bfloat16().requires_grad_()
    y = partial_rotary(x, f)  # auto: compile on CUDA
    (y.float() * g).sum().backward()
    ref_out = _megatron(t, f)
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
    print(f"rope compiled bf16 vs megatron fp32: y {rel(y, ref_out):.1e}, dx {rel(x.grad, ref_in.grad):.1e}")
    assert rel(y, ref_out) < 4e-3 and rel(x.grad, ref_in.grad) < 4e-3
