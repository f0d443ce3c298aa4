"""Causal depthwise conv: torch path vs a hand loop and transformers; packed vs unpacked."""

from __future__ import annotations

import importlib.util
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from qwen3_next_mcore.ops import causal_conv1d


def hand_loop(x, weight, bias, activation):
    """y[t] = sum_i w[:, i] * x[t - (W - 1) + i], zero before the start."""
    T, W = x.shape[1], weight.shape[1]
    y = torch.zeros_like(x)
    for t in range(T):
        for i in range(W):
            s = t - (W - 1) + i
            if s >= 0:
                y[:, t] += weight[:, i] * x[:, s]
    if bias is not None:
        y = y + bias
    return F.silu(y) if activation else y


def inputs(B, T, D, W, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(D, W, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    b = torch.randn(D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("with_bias", [True, False])
def test_torch_matches_hand_loop(W, activation, with_bias):
    x, w, b = inputs(2, 11, 6, W)
    b = b if with_bias else None
    y = causal_conv1d(x, w, bias=b, activation=activation)
    torch.testing.assert_close(y, hand_loop(x, w, b, activation), rtol=1e-12, atol=1e-12)


def test_matches_transformers_fallback():
    if importlib.util.find_spec("causal_conv1d") is not None:
        pytest.skip("with causal-conv1d installed, transformers routes its reference to that kernel")
    hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    x, w, _ = inputs(2, 9, 8, 4, dtype=torch.float32)
    ref = hf.causal_conv1d_fn(x.transpose(1, 2), w, None, activation="silu").transpose(1, 2)
    torch.testing.assert_close(causal_conv1d(x, w), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_packed_equals_unpacked(rel, index_dtype):
    bounds = [0, 1, 3, 3, 12, 20]  # shorter than the kernel, empty, longer
    x, w, b = inputs(1, bounds[-1], 5, 4, seed=1)
    dy = torch.randn(x.shape, dtype=x.dtype)
    y = causal_conv1d(x, w, bias=b, cu_seqlens=torch.tensor(bounds, dtype=index_dtype))
    grads = torch.autograd.grad((y * dy).sum(), (x, w, b))

    pieces = [causal_conv1d(x[:, s:e], w, bias=b) for s, e in pairwise(bounds)]
    y_ref = torch.cat(pieces, 1)
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), (x, w, b))
    assert rel(y, y_ref) < 1e-14
    for name, a, r in zip("xwb", grads, grads_ref):
        assert rel(a, r) < 1e-14, name
    # and a token never sees the previous sequence: it differs from the unpacked run at the boundary
    assert not torch.allclose(y[:, 12], causal_conv1d(x, w, bias=b)[:, 12])


def test_dtype_and_errors():
    x, w, b = inputs(1, 7, 4, 4, dtype=torch.bfloat16)
    assert causal_conv1d(x, w, bias=b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="batch size 1"):
        causal_conv1d(torch.zeros(2, 4, 3), torch.zeros(3, 4), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(torch.zeros(1, 4, 3), torch.zeros(3, 4), activation="relu")
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(torch.zeros(1, 4, 3), torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match="needs CUDA"):
        causal_conv1d(torch.zeros(1, 4, 3), torch.zeros(3, 4), backend="fla")
