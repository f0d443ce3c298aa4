"""Inputs shaped like the real Gated DeltaNet: g = -exp(A) * softplus(a) <= 0, beta = sigmoid(b) in (0, 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||, in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gdn_inputs(
    B,
    T,
    H,
    HV,
    K,
    V,
    *,
    dtype=torch.float64,
    device="cpu",
    h0=True,
    n_states=None,
    seed=0,
    decay=1.0,
    g_dtype=None,
    state_dtype=None,
):
    """Leaf tensors q, k, v, g, beta, h0 (h0 None when not asked for), all requiring grad.

    k is drawn with norm about 1 so the delta rule stays contractive without l2norm too; ``decay``
    scales -g (the model's A = exp(A_log) lies in (0.01, 16); a moderate range keeps memory long)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    q = randn(B, T, H, K)
    k = randn(B, T, H, K, scale=K**-0.5)
    v = randn(B, T, HV, V)
    A = torch.empty(HV, dtype=torch.float64).uniform_(0.05, 1.0, generator=gen) * decay
    g = -A * F.softplus(randn(B, T, HV) - 1.0)
    beta = torch.sigmoid(randn(B, T, HV))
    state = randn(n_states or B, HV, K, V, scale=0.5) if h0 else None
    tensors = [q, k, v, g, beta, state]
    dtypes = [dtype, dtype, dtype, g_dtype or dtype, dtype, state_dtype or dtype]
    return [
        None if t is None else t.to(device=device, dtype=d).requires_grad_() for t, d in zip(tensors, dtypes)
    ]


@pytest.fixture
def make_gdn_inputs():
    return gdn_inputs


@pytest.fixture(name="rel")
def rel_fixture():
    return rel


def _run_interpreted(code: str) -> dict:
    """Run ``code`` in a fresh Python with TRITON_INTERPRET=1 set before Triton is imported (Triton builds
    its own helpers, tl.zeros/sigmoid/sum, for the interpreter only when the mode is set at import: the
    test processes that preload torch and megatron-core have already imported it); returns the JSON object
    its last output line prints."""
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def run_interpreted():
    """:func:`_run_interpreted`: our Triton kernels on CPU under Triton's interpreter, in a fresh process."""
    return _run_interpreted
