"""Backend decisions with injected environments: no GPU needed."""

from __future__ import annotations

import logging

import pytest

from qwen3_next_mcore.ops import backends
from qwen3_next_mcore.ops.backends import (
    KernelEnv,
    conv_backend_report,
    conv_split_backend_report,
    gdn_backend_report,
    moe_swiglu_backend_report,
    norm_backend_report,
    router_topk_backend_report,
)

HOPPER, AMPERE, BLACKWELL = (9, 0), (8, 0), (10, 0)
GOOD = {"device": "cuda", "fla": "0.6.0", "tilelang": "0.1.15", "nvcc": True}


def cuda(**changes) -> KernelEnv:
    return KernelEnv(**{**GOOD, "capability": HOPPER, "triton": "3.6.0", **changes})


@pytest.mark.parametrize(
    "env, backend, fla_backward",
    [
        (KernelEnv(device="cpu"), "torch", None),
        (cuda(), "fla", "tilelang"),  # the GPU test machines: Hopper, Triton 3.6.0, tilelang installed
        (cuda(capability=(9, 0), triton="3.4.0"), "fla", "tilelang"),
        (cuda(tilelang=None, triton="3.7.1"), "fla", "triton"),  # the Triton fix
        (cuda(tilelang=None, triton="3.8.0"), "fla", "triton"),
        (cuda(tilelang=None, triton="3.3.1"), "fla", "triton"),  # before the regression
        (cuda(tilelang=None, capability=AMPERE), "fla", "triton"),  # only Hopper is affected
        (cuda(tilelang=None, capability=BLACKWELL), "fla", "triton"),
        (cuda(tilelang=None, fla="0.5.0", capability=AMPERE), "fla", "triton"),
    ],
)
def test_gdn_decisions(env, backend, fla_backward):
    report = gdn_backend_report(env)
    assert report["error"] is None
    assert (report["backend"], report["fla_backward"]) == (backend, fla_backward)
    assert backends.resolve(report) == backend


@pytest.mark.parametrize(
    "env, reason",
    [
        (cuda(tilelang=None), "tilelang is not importable"),
        (cuda(triton="3.7.0", tilelang=None), "tilelang is not importable"),
        (cuda(triton="3.4.0+git1234", tilelang=None), "tilelang is not importable"),
        (cuda(nvcc=False), "no nvcc"),
        (cuda(fla_tilelang_env="0"), "FLA_TILELANG=0"),
        (cuda(fla_dispatch_disabled=True), "FLA_DISABLE_BACKEND_DISPATCH"),
        (cuda(fla="0.5.0"), "has no TileLang backward"),
    ],
)
def test_gdn_refuses_known_wrong_hopper_backward(env, reason):
    report = gdn_backend_report(env)
    assert report["backend"] is None
    message = report["error"]
    # the message names the cause and both fixes
    for needle in (reason, "wrong gradients", "pip install 'tilelang", "triton>=3.7.1"):
        assert needle in message, (needle, message)
    with pytest.raises(RuntimeError, match="Hopper"):
        backends.resolve(report)


def test_gdn_cuda_without_fla():
    report = gdn_backend_report(KernelEnv(device="cuda", capability=AMPERE, triton="3.6.0"))
    assert report["backend"] is None and "flash-linear-attention" in report["error"]
    assert "qwen3-next-mcore[gpu]" in report["error"] and "backend='torch'" in report["error"]
    # asking for torch (or the reference) explicitly is fine anywhere
    for name in ("torch", "naive"):
        assert gdn_backend_report(KernelEnv(device="cuda"), name)["backend"] == name
        assert gdn_backend_report(cuda(tilelang=None), name)["backend"] == name


def test_gdn_explicit_fla_on_cpu_and_other_devices():
    assert "needs CUDA" in gdn_backend_report(KernelEnv(device="cpu"), "fla")["error"]
    assert "backend='torch'" in gdn_backend_report(KernelEnv(device="mps"))["error"]
    with pytest.raises(ValueError, match="backend must be"):
        gdn_backend_report(KernelEnv(), "tilelang")


def test_gdn_grouped_value_heads_native_from_fla_05():
    assert gdn_backend_report(cuda(capability=AMPERE, fla="0.5.0"))["fla_native_gva"] is True
    assert gdn_backend_report(cuda(capability=AMPERE, fla="0.4.2"))["fla_native_gva"] is False


def test_report_carries_versions():
    report = gdn_backend_report(cuda())
    assert {
        "fla": "0.6.0",
        "triton": "3.6.0",
        "tilelang": "0.1.15",
        "capability": HOPPER,
    }.items() <= report.items()


@pytest.mark.parametrize(
    "env, requested, expected",
    [
        (KernelEnv(device="cpu"), None, "torch"),
        (KernelEnv(device="cpu"), "torch", "torch"),
        (cuda(causal_conv1d="1.5.2"), None, "causal_conv1d"),
        (cuda(), None, "fla"),
        (cuda(causal_conv1d="1.5.2"), "fla", "fla"),
        (KernelEnv(device="cuda"), "torch", "torch"),
    ],
)
def test_conv_decisions(env, requested, expected):
    assert conv_backend_report(env, requested)["backend"] == expected


@pytest.mark.parametrize(
    "env, requested, needle",
    [
        (KernelEnv(device="cuda"), None, "neither causal-conv1d nor flash-linear-attention"),
        (cuda(), "causal_conv1d", "not installed"),
        (KernelEnv(device="cpu"), "fla", "needs CUDA"),
        (KernelEnv(device="cpu"), "causal_conv1d", "needs CUDA"),
    ],
)
def test_conv_refusals(env, requested, needle):
    report = conv_backend_report(env, requested)
    assert report["backend"] is None and needle in report["error"]


def test_norm_decisions():
    assert norm_backend_report(KernelEnv(device="cpu"))["backend"] == "torch"
    assert norm_backend_report(cuda())["backend"] == "fla"
    assert norm_backend_report(KernelEnv(device="cuda"), "torch")["backend"] == "torch"
    assert "flash-linear-attention" in norm_backend_report(KernelEnv(device="cuda"))["error"]
    assert "needs CUDA" in norm_backend_report(KernelEnv(device="cpu"), "fla")["error"]


def test_choice_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(backends, "_LOGGED", set())
    report = gdn_backend_report(cuda())
    with caplog.at_level(logging.INFO, logger="qwen3_next_mcore.ops"):
        for _ in range(3):
            backends.resolve(report)
    lines = [r.getMessage() for r in caplog.records if r.name == "qwen3_next_mcore.ops"]
    assert len(lines) == 1
    assert "backend=fla" in lines[0] and "fla_backward=tilelang" in lines[0] and "triton=3.6.0" in lines[0]


def test_detect_on_cpu():
    assert backends.detect_kernel_env("cpu") == KernelEnv(device="cpu")


def test_gating_from_raw_projections_equals_precomputed_gating():
    """gated_delta_rule(g=a, A_log=..., dt_bias=..., beta=b, beta_is_logit=True) is the rule on
    g = -exp(A_log) * softplus(a + dt_bias) and sigmoid(b), gradients of A_log/dt_bias included (the
    torch path computes them first; fla >= 0.6 inside its kernel: tests/ops/test_ops_gpu.py)."""
    import torch

    from qwen3_next_mcore.ops.gated_delta_rule import gated_delta_rule, gdn_gate

    gen = torch.Generator().manual_seed(0)
    B, T, H, HV, K, V = 2, 37, 2, 4, 16, 8
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, HV, V, generator=gen)
    a, b = torch.randn(B, T, HV, generator=gen), torch.randn(B, T, HV, generator=gen)
    runs = []
    for fused in (False, True):
        A_log = torch.empty(HV).uniform_(0.01, 16, generator=gen).log().requires_grad_(True) if not runs \
            else runs[0][1].detach().clone().requires_grad_(True)
        dt_bias = torch.ones(HV).requires_grad_(True)
        if fused:
            o, _ = gated_delta_rule(q, k, v, g=a, beta=b, A_log=A_log, dt_bias=dt_bias, beta_is_logit=True,
                                    use_qk_l2norm=True, backend="torch")
        else:
            o, _ = gated_delta_rule(q, k, v, g=gdn_gate(a, A_log, dt_bias), beta=b.sigmoid(), use_qk_l2norm=True,
                                    backend="torch")
        o.square().sum().backward()
        runs.append((o.detach(), A_log, dt_bias))
    (o0, A0, d0), (o1, A1, d1) = runs
    assert torch.equal(o0, o1)
    assert torch.equal(A0.grad, A1.grad) and torch.equal(d0.grad, d1.grad) and A0.grad.abs().sum() > 0


@pytest.mark.parametrize("report", [conv_split_backend_report, router_topk_backend_report, moe_swiglu_backend_report])
def test_triton_kernel_ops_share_one_backend_rule(report):
    """Our Triton-kernel ops (the fused conv split, the router top-k, the experts' SwiGLU): automatic "torch"
    on CPU and "triton" on CUDA; "triton" on CPU tensors only under Triton's interpreter; CUDA without
    Triton and unknown backends are named errors (``backends._triton_kernel_error``, ``_check_requested``)."""
    cpu = KernelEnv(device="cpu")
    assert report(cpu)["backend"] == "torch"
    assert report(cuda())["backend"] == "triton"
    assert "needs CUDA tensors (or CPU ones under TRITON_INTERPRET=1)" in report(cpu, "triton")["error"]
    assert report(cpu, "triton", interpreted=True)["backend"] == "triton"
    assert "Triton is not installed" in report(KernelEnv(device="cuda"))["error"]
    with pytest.raises(ValueError, match="backend must be None, 'auto' or one of"):
        report(cpu, "radix")
