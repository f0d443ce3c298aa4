"""Norms vs transformers' Qwen3NextRMSNorm / Qwen3NextRMSNormGated."""

from __future__ import annotations

import pytest
import torch

from qwen3_next_mcore.ops import gated_rms_norm, zero_centered_rms_norm

hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
EPS = 1e-6


def make(dtype, D=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 5, D, generator=gen) * 3).to(dtype)
    gate = torch.randn(3, 5, D, generator=gen).to(dtype)
    w = torch.randn(D, generator=gen) * 0.2
    return x, gate, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_centered_matches_transformers(dtype):
    x, _, w = make(dtype)
    ref_mod = hf.Qwen3NextRMSNorm(x.shape[-1], eps=EPS)
    with torch.no_grad():
        ref_mod.weight.copy_(w)
    ref = ref_mod(x)
    out = zero_centered_rms_norm(x, w.to(dtype) if dtype == torch.float32 else w, EPS)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # same fp32 math, one rounding


def test_gated_matches_transformers_fp32():
    x, gate, w = make(torch.float32)
    ref_mod = hf.Qwen3NextRMSNormGated(x.shape[-1], eps=EPS)
    with torch.no_grad():
        ref_mod.weight.copy_(1 + w)
    torch.testing.assert_close(gated_rms_norm(x, gate, 1 + w, EPS), ref_mod(x, gate), rtol=1e-6, atol=1e-6)


def test_gated_bf16_rounds_once(rel):
    """transformers rounds the normalised x to bf16 before the weight; we stay in fp32 (as fla's kernel).
    Both are within bf16 rounding of the fp64 value; ours is never further from it."""
    x, gate, w = make(torch.bfloat16)
    w = (1 + w).to(torch.bfloat16)
    ref_mod = hf.Qwen3NextRMSNormGated(x.shape[-1], eps=EPS).to(torch.bfloat16)
    with torch.no_grad():
        ref_mod.weight.copy_(w)
    hf_out = ref_mod(x, gate)
    out = gated_rms_norm(x, gate, w, EPS)
    exact = gated_rms_norm(x.double(), gate.double(), w.double(), EPS)
    assert out.dtype == torch.bfloat16
    assert rel(out, exact) < 2**-8 and rel(hf_out, exact) < 2**-7
    assert rel(out, exact) <= rel(hf_out, exact)
    assert rel(out, hf_out) < 1e-2


def test_gradients_fp64():
    x, gate, w = (t.double().requires_grad_() for t in make(torch.float64, D=8))
    assert torch.autograd.gradcheck(lambda a, b: zero_centered_rms_norm(a, b, EPS), (x, w))
    assert torch.autograd.gradcheck(lambda a, g, b: gated_rms_norm(a, g, b, EPS), (x, gate, w))


def test_errors():
    x, gate, w = make(torch.float32)
    with pytest.raises(ValueError, match="weight be"):
        gated_rms_norm(x, gate, w[:-1])
    with pytest.raises(RuntimeError, match="needs CUDA"):
        gated_rms_norm(x, gate, w, backend="fla")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_centered_compiled_matches_eager(dtype, rel):
    """The fused (torch.compile) norm, CUDA's default, against the eager one: forward and gradients,
    with the input and weight layouts the layers use ([S, B, H] and [S, B, heads, d])."""
    gen = torch.Generator().manual_seed(1)
    for shape in ((7, 2, 64), (7, 2, 3, 32)):
        x = (torch.randn(*shape, generator=gen) * 3).to(dtype).requires_grad_()
        w = (torch.randn(shape[-1], generator=gen) * 0.2).to(dtype).requires_grad_()
        g = torch.randn(*shape, generator=gen).to(dtype)
        outs = {}
        for backend in ("torch", "compile"):
            x.grad = w.grad = None
            out = zero_centered_rms_norm(x, w, EPS, backend=backend)
            out.backward(g)
            outs[backend] = (out.detach(), x.grad, w.grad)
        for a, b in zip(outs["compile"], outs["torch"]):
            assert a.dtype == b.dtype == dtype
            # fp32: the same math, reassociated by the fused kernel; bf16: one rounding apart at most
            assert rel(a, b) < (1e-6 if dtype == torch.float32 else 4e-3), (shape, rel(a, b))
    with pytest.raises(ValueError, match="backend must be"):
        zero_centered_rms_norm(x, w, backend="fla")


def _recompile_failures() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["total"] - counters["frames"]["ok"]


def _scale(x, w):
    return (x.float() * (1 + w.float())).to(x.dtype)


def _scale_too(x, w):  # the same function under another name: a compile cache of its own
    return (x.float() * (1 + w.float())).to(x.dtype)


def _run_variants(fn):
    """Training and evaluation (grad on and off), fp32 and bf16, the hidden states' rank and the attention
    heads' rank, two sequence lengths (the second makes dynamo retrace with a dynamic length): 8 variants
    and a retrace. Returns the largest difference from the eager function."""
    worst = 0.0
    for grad in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            for shape in ((2, 32), (2, 4, 8)):
                for seq in (16, 24):
                    x = torch.randn(seq, *shape, dtype=dtype)
                    w = torch.randn(shape[-1], dtype=dtype)
                    with torch.set_grad_enabled(grad):
                        y = fn(x, w)
                    worst = max(worst, (y.float() - _scale(x, w).float()).abs().max().item())
    return worst


def test_compiled_ops_keep_their_graphs_past_dynamos_recompile_limit():
    """One op serving several variants compiles each into its own graphs (ops/backends.py ``compiled``);
    one plain torch.compile of the same function passes dynamo's limit of 8 graphs per code object and
    falls back to eager from then on."""
    from qwen3_next_mcore.ops.backends import compiled

    with torch._dynamo.config.patch(recompile_limit=8):
        before = _recompile_failures()
        _run_variants(torch.compile(_scale_too, dynamic=None))
        assert _recompile_failures() > before  # the scenario does pass the limit
        before = _recompile_failures()
        worst = _run_variants(compiled(_scale))
        assert _recompile_failures() == before
    assert worst == 0.0  # Inductor's fp32 math rounded once, as the eager function
