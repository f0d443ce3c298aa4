"""The routed experts' weighted SwiGLU (ops/moe_swiglu.py): every backend against the fp64 reference, forward
and both gradients; the Triton kernels on CPU under Triton's interpreter and on CUDA."""

from __future__ import annotations

import pytest
import torch

from qwen3_next_mcore.ops.backends import KernelEnv, moe_swiglu_backend_report
from qwen3_next_mcore.ops.moe_swiglu import weighted_swiglu, weighted_swiglu_reference


def _errors(backend: str, rows: int, F: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> dict:
    """Relative errors (fp64 norms) of ``backend``'s output, h gradient and probs gradient against the
    fp64 reference on the same (rounded) inputs, and the reference's own rounding error in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    h = (2 * torch.randn(rows, 2 * F, generator=g)).to(device, dtype)
    p = torch.rand(rows, generator=g).to(device)
    dy = torch.randn(rows, F, generator=g).to(device, dtype)
    outs = {}
    for name, fn, cast in ((backend, lambda a, b: weighted_swiglu(a, b, backend=backend), dtype),
                           ("fp64", weighted_swiglu_reference, torch.float64)):
        a = h.detach().to(cast).clone().requires_grad_()
        b = p.detach().to(torch.float64 if cast == torch.float64 else p.dtype).clone().requires_grad_()
        y = fn(a, b)
        (y * dy.to(cast)).sum().backward()
        outs[name] = (y, a.grad, b.grad)
    rel = lambda x, y: float((x.detach().double() - y.detach().double()).norm() / y.detach().double().norm().clamp_min(1e-30))
    got, want = outs[backend], outs["fp64"]
    return {"dtype": [str(t.dtype) for t in got], **{k: rel(x, y) for k, x, y in zip(("y", "dh", "dp"), got, want)},
            # the fp64 output and h gradient rounded once to dtype
            "y_rounded": rel(want[0].to(dtype), want[0]), "dh_rounded": rel(want[1].to(dtype), want[1])}


_INTERPRETED = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_moe_swiglu import _errors
print(json.dumps({{"fp32": _errors("triton", 37, 24, torch.float32), "bf16": _errors("triton", 64, 128, torch.bfloat16)}}))
"""


@pytest.fixture(scope="module")
def interpreted(run_interpreted):
    from pathlib import Path

    return run_interpreted(_INTERPRETED.format(tests=str(Path(__file__).parent)))


def test_triton_kernels_under_the_interpreter_match_fp64(interpreted):
    fp32, bf16 = interpreted["fp32"], interpreted["bf16"]
    print(fp32, bf16)
    assert fp32["dtype"] == ["torch.float32"] * 3 and bf16["dtype"] == ["torch.bfloat16", "torch.bfloat16", "torch.float32"]
    assert max(fp32[k] for k in ("y", "dh", "dp")) < 1e-6, fp32  # fp32 arithmetic, rounded once
    # Triton's interpreter truncates to bf16 (the GPU rounds to nearest): up to twice one rounding's error
    assert bf16["y"] < 2.2 * bf16["y_rounded"] and bf16["dh"] < 2.2 * bf16["dh_rounded"] and bf16["dp"] < 1e-5, bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_matches_fp64(dtype):
    e = _errors("torch", 50, 32, dtype)
    assert max(e[k] for k in ("y", "dh", "dp")) < (1e-6 if dtype == torch.float32 else 1e-2), e


def test_backend_rule_and_errors():  # (the rule shared with the other Triton ops: tests/ops/test_gdn_backends.py)
    cpu, gpu = KernelEnv(device="cpu"), KernelEnv(device="cuda", capability=(9, 0), triton="3.6.0")
    assert moe_swiglu_backend_report(gpu, "compile")["backend"] == "compile"
    assert moe_swiglu_backend_report(cpu, "compile")["backend"] == "compile"
    assert "use 'torch' or 'compile'" in moe_swiglu_backend_report(cpu, "triton")["error"]
    with pytest.raises(ValueError, match=r"\[rows, 2F\]"):
        weighted_swiglu(torch.zeros(4, 7), torch.zeros(4))
    with pytest.raises(ValueError, match=r"probs \[rows\]"):
        weighted_swiglu(torch.zeros(4, 8), torch.zeros(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_and_compiled_backends_on_cuda_match_fp64():
    """At the 80B expert width (F = 512) in bf16: ours within one bf16 rounding of fp64 (fp32 inside, rounded
    once; the probability gradient: fp32 sums), megatron-core's compiled fusion printed beside it."""
    errors = {}
    for backend in ("triton", "compile"):
        errors[backend] = e = _errors(backend, 4099, 512, torch.bfloat16, device="cuda")
        print(backend, e)
    e = errors["triton"]
    assert e["y"] < 1.1 * e["y_rounded"] and e["dh"] < 1.1 * e["dh_rounded"] and e["dp"] < 1e-5, e
