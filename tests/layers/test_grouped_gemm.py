"""layers/grouped_experts.py's grouped GEMMs: the backend rule (torch's kernel by default; Inductor's
autotuned choice only where asked and able), the experts' autograd function against torch's own autograd
of the grouped GEMM, and (GPU) the autotuned GEMMs against torch's."""

from __future__ import annotations

import pytest
import torch

from qwen3_next_mcore.layers.grouped_experts import (
    _autotuned_grouped_mm,
    _ExpertsGemm,
    _grouped_mm,
    grouped_gemm,
)
from qwen3_next_mcore.ops.backends import KernelEnv, grouped_gemm_backend_report


def test_backend_rule():
    cpu, ampere = KernelEnv(device="cpu"), KernelEnv(device="cuda", capability=(8, 0), triton="3.6.0")
    hopper = KernelEnv(device="cuda", capability=(9, 0), triton="3.6.0")
    for env in (cpu, ampere, hopper):
        assert grouped_gemm_backend_report(env)["backend"] == "torch"  # the default everywhere
        assert grouped_gemm_backend_report(env, "torch")["backend"] == "torch"
    report = grouped_gemm_backend_report(hopper, "autotune")
    assert report["backend"] == "autotune" and report["error"] is None
    for env in (cpu, ampere, KernelEnv(device="cuda", capability=(9, 0))):  # the last without Triton
        report = grouped_gemm_backend_report(env, "autotune")
        assert report["backend"] is None and "compute capability 9.0" in report["error"], report
    with pytest.raises(ValueError, match="grouped_gemm"):
        grouped_gemm_backend_report(cpu, "cutlass")


def test_autotune_asked_for_on_cpu_raises():
    a, b = torch.randn(6, 8), torch.randn(2, 8, 4)
    with pytest.raises(RuntimeError, match="autotune.*compute capability 9.0"):
        grouped_gemm(a, b, torch.tensor([2, 6], dtype=torch.int32), backend="autotune")


def test_autotune_refuses_fp32_operands(monkeypatch):
    import qwen3_next_mcore.layers.grouped_experts as ge

    monkeypatch.setattr(ge, "grouped_gemm_backend", lambda env, requested: "autotune")  # as on an sm90 GPU
    a, b = torch.randn(6, 8), torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="'autotune' takes bf16/fp16 operands.*got torch.float32"):
        grouped_gemm(a, b, torch.tensor([2, 6], dtype=torch.int32), backend="autotune")


def test_autotuned_wrapper_compiles_the_whole_gemm_once_per_signature():
    """The compiled copy behind "autotune", run where the rule would refuse it (CPU: Inductor has no
    grouped-GEMM template here, so it keeps torch's kernel): whole graph, equal to eager, one copy per
    signature."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 16, generator=g).bfloat16(), torch.randn(2, 16, 24, generator=g).bfloat16()
    offs = torch.tensor([16, 32], dtype=torch.int32)
    signature = (a.shape, a.stride(), b.shape, b.stride(), a.dtype, offs.shape)
    fn = _autotuned_grouped_mm(signature)
    assert torch.equal(fn(a, b, offs), _grouped_mm(a, b, offs=offs))
    assert _autotuned_grouped_mm(signature) is fn
    other = _autotuned_grouped_mm((b.shape,) + signature[1:])
    assert other is not fn and other.__wrapped__.__code__ is not fn.__wrapped__.__code__  # own code object


@pytest.mark.parametrize("rows", [[3, 0, 5], [0, 0, 0]], ids=["an-empty-expert", "no-rows"])
def test_experts_gemm_equals_torch_autograd(rows):
    """Without main grads the function returns the same output and gradients as torch's autograd of the
    grouped GEMM (CPU, fp32)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 16, 8, generator=g)  # [E, out, in]
    x = torch.randn(sum(rows), 8, generator=g)
    dy = torch.randn(sum(rows), 16, generator=g)
    offs = torch.tensor(rows).cumsum(0).to(torch.int32)
    got, want = [], []
    for out, fn in ((got, lambda xi, wi: _ExpertsGemm.apply(xi, wi, offs, None, False)),
                    (want, lambda xi, wi: _grouped_mm(xi, wi.transpose(1, 2), offs=offs))):
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = fn(xi, wi)
        y.backward(dy)
        out += [y.detach(), xi.grad, wi.grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if rows[1] == 0:
        assert torch.equal(got[2][1], torch.zeros(16, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autotuned_grouped_gemms_match_torch_on_cuda():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the autotune backend needs sm90+")
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, experts, k, n = 1024, 8, 256, 512
    counts = torch.tensor([200, 0, 64, 136, 256, 128, 112, 128], device="cuda")
    offs = counts.cumsum(0).to(torch.int32)
    x = torch.randn(rows, k, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(experts, n, k, device="cuda", generator=g).to(torch.bfloat16)
    dy = torch.randn(rows, n, device="cuda", generator=g).to(torch.bfloat16)
    for a, b in ((x, w.transpose(1, 2)), (dy, w), (dy.t(), x)):  # forward, input and weight gradient forms
        want = _grouped_mm(a, b, offs=offs).float()
        got = grouped_gemm(a, b, offs, backend="autotune").float()
        rel = float((got - want).abs().max() / want.abs().max())
        assert rel < 1e-2, rel
