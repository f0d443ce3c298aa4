"""GPU backends against the fp64 references: outputs, final states and every gradient (skipped without CUDA).

Tolerances (relative, ||a - b|| / ||b||):
* bf16 inputs through fla: 1e-2. The reference runs in fp64 on the very same (bf16-rounded) inputs, so
  the error is the kernel's own: bf16 storage of its intermediates (rounding unit 2^-8 = 3.9e-3) inside
  an fp32-accumulating chunked algorithm. Measured 1.6e-3 to 5.4e-3 on an H100 (docs/kernels.md).
* fp32 inputs: torch path 1e-5; fla/Triton path 5e-3 (Triton's fp32 dots use TF32, 10-bit mantissa).
* conv and norm kernels accumulate in fp32 like the torch path: 1e-5 in fp32, one bf16 rounding in bf16.
"""

from __future__ import annotations

import pytest
import torch

from qwen3_next_mcore.ops import (
    causal_conv1d,
    chunk_gated_delta_rule,
    gated_delta_rule,
    gated_rms_norm,
    gdn_backend_report,
    naive_recurrent_gated_delta_rule,
)
from qwen3_next_mcore.ops.backends import detect_kernel_env

pytestmark = pytest.mark.gpu
NAMES = ("q", "k", "v", "g", "beta", "h0")
BF16_TOL, FP32_TORCH_TOL, FP32_FLA_TOL = 1e-2, 1e-5, 5e-3


def fla_ready() -> bool:
    return torch.cuda.is_available() and gdn_backend_report(detect_kernel_env("cuda"))["backend"] == "fla"


def run_with_grads(fn, inputs, cu_seqlens=None, **kwargs):
    o, s = fn(
        *inputs[:3],
        g=inputs[3],
        beta=inputs[4],
        initial_state=inputs[5],
        output_final_state=True,
        use_qk_l2norm=True,
        cu_seqlens=cu_seqlens,
        **kwargs,
    )
    gen = torch.Generator(device="cuda").manual_seed(5)
    do = torch.randn(o.shape, generator=gen, device="cuda", dtype=torch.float32)
    ds = torch.randn(s.shape, generator=gen, device="cuda", dtype=torch.float32)
    loss = (o.float() * do).sum() + (s.float() * ds).sum()
    return o, s, dict(zip(NAMES, torch.autograd.grad(loss, inputs)))


def errors(rel, out, ref):
    return {
        "o": rel(out[0], ref[0]),
        "state": rel(out[1], ref[1]),
        **{f"d{n}": rel(out[2][n], ref[2][n]) for n in NAMES},
    }


def fp64_twins(inputs):
    return [x.detach().double().requires_grad_() for x in inputs]


def check(rel, fn, inputs, tol, cu_seqlens=None, **kwargs):
    out = run_with_grads(fn, inputs, cu_seqlens, **kwargs)
    ref = run_with_grads(naive_recurrent_gated_delta_rule, fp64_twins(inputs), cu_seqlens)
    errs = errors(rel, out, ref)
    print(
        f"{getattr(fn, '__name__', fn)} {inputs[0].dtype} cu_seqlens={cu_seqlens is not None}: "
        + " ".join(f"{k}={v:.2e}" for k, v in errs.items())
    )
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad}"


def bf16_inputs(make_gdn_inputs, B, T, n_states=None, HV=4):
    # like the model: q, k, v, beta in bf16; g (from fp32 A_log, dt_bias) and the state in fp32
    return make_gdn_inputs(
        B,
        T,
        2,
        HV,
        128,
        128,
        dtype=torch.bfloat16,
        device="cuda",
        g_dtype=torch.float32,
        state_dtype=torch.float32,
        n_states=n_states,
        seed=T,
    )


@pytest.mark.skipif(not fla_ready(), reason="fla backend not usable here")
@pytest.mark.parametrize("HV", [2, 4])
def test_fla_bf16_matches_fp64_reference(make_gdn_inputs, rel, HV):
    check(rel, gated_delta_rule, bf16_inputs(make_gdn_inputs, 2, 300, HV=HV), BF16_TOL, backend="fla")


@pytest.mark.skipif(not fla_ready(), reason="fla backend not usable here")
def test_fla_bf16_packed_sequences(make_gdn_inputs, rel):
    cu = torch.tensor([0, 1, 100, 164, 300], device="cuda", dtype=torch.int32)
    check(
        rel, gated_delta_rule, bf16_inputs(make_gdn_inputs, 1, 300, n_states=4), BF16_TOL, cu, backend="fla"
    )


@pytest.mark.skipif(not fla_ready(), reason="fla backend not usable here")
def test_fla_fp32(make_gdn_inputs, rel):
    inputs = make_gdn_inputs(2, 200, 2, 4, 64, 64, dtype=torch.float32, device="cuda")
    check(rel, gated_delta_rule, inputs, FP32_FLA_TOL, backend="fla")


@pytest.mark.skipif(not fla_ready(), reason="fla backend not usable here")
def test_auto_picks_fla_on_cuda(make_gdn_inputs):
    report = gdn_backend_report(detect_kernel_env("cuda"))
    print("report:", report)
    q, k, v, g, beta, h0 = bf16_inputs(make_gdn_inputs, 1, 64)
    auto = gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=h0, use_qk_l2norm=True)[0]
    fla = gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=h0, use_qk_l2norm=True, backend="fla")[0]
    torch.testing.assert_close(auto, fla, rtol=0, atol=0)


@pytest.mark.skipif(not fla_ready(), reason="fla backend not usable here")
def test_fla_gating_in_kernel_matches_fp64(rel):
    """The decay and beta computed inside fla's kernel from the raw projections (use_gate_in_kernel,
    use_beta_sigmoid_in_kernel) against the fp64 torch path on the same bf16 inputs: output and the
    gradients of a, b, A_log and dt_bias (same tolerance as the other bf16 fla checks)."""
    from qwen3_next_mcore.ops.gated_delta_rule import gdn_gate

    gen = torch.Generator().manual_seed(3)
    B, T, H, HV, K, V = 2, 300, 2, 4, 64, 64
    base = [torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen),
            torch.randn(B, T, HV, V, generator=gen), torch.randn(B, T, HV, generator=gen),
            torch.randn(B, T, HV, generator=gen)]
    base = [t.cuda().bfloat16() for t in base]
    A_log0 = torch.empty(HV).uniform_(0.01, 16, generator=gen).log().cuda()
    results = []
    for dtype, fused in ((torch.float64, False), (torch.bfloat16, True)):
        q, k, v, a, b = (t.to(dtype).clone().requires_grad_(True) for t in base)
        A_log = A_log0.double().clone().requires_grad_(True) if not fused else A_log0.clone().requires_grad_(True)
        dt_bias = torch.ones(HV, device="cuda", dtype=A_log.dtype, requires_grad=True)
        if fused:
            o, _ = gated_delta_rule(q, k, v, g=a, beta=b, A_log=A_log, dt_bias=dt_bias, beta_is_logit=True,
                                    use_qk_l2norm=True, backend="fla")
        else:
            o, _ = gated_delta_rule(q, k, v, g=gdn_gate(a, A_log, dt_bias).double(), beta=b.sigmoid(),
                                    use_qk_l2norm=True, backend="torch")
        o.float().square().sum().backward()
        results.append({"o": o, "da": a.grad, "db": b.grad, "dA_log": A_log.grad, "ddt_bias": dt_bias.grad,
                        "dq": q.grad, "dv": v.grad})
    ref, got = results
    errs = {k: rel(got[k], ref[k]) for k in ref}
    print("fused gating:", {k: f"{e:.2e}" for k, e in errs.items()})
    # dA_log/ddt_bias are sums over every token of cancelling terms (docs/numerics.md): 5e-2 for them
    assert all(e < (5e-2 if k in ("dA_log", "ddt_bias") else BF16_TOL) for k, e in errs.items()), errs


def test_torch_chunk_on_cuda_fp32(make_gdn_inputs, rel):
    inputs = make_gdn_inputs(1, 130, 2, 4, 32, 16, dtype=torch.float32, device="cuda")
    check(rel, chunk_gated_delta_rule, inputs, FP32_TORCH_TOL)


def conv_inputs(dtype, T=200, D=256, W=4):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, T, D, generator=gen, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(D, W, generator=gen, device="cuda") * 0.5).to(dtype).requires_grad_()
    b = torch.randn(D, generator=gen, device="cuda").to(dtype).requires_grad_()
    return x, w, b


def conv_backends():
    env = detect_kernel_env("cuda") if torch.cuda.is_available() else None
    return [
        n
        for n, version in (
            ("fla", getattr(env, "fla", None)),
            ("causal_conv1d", getattr(env, "causal_conv1d", None)),
        )
        if version is not None
    ] or ["none-installed"]


@pytest.mark.parametrize("backend", conv_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_conv_backends_match_torch(rel, backend, dtype, packed):
    if backend == "none-installed":
        pytest.skip("no CUDA conv kernel installed")
    x, w, b = conv_inputs(dtype)
    cu = torch.tensor([0, 2, 70, 200], device="cuda", dtype=torch.int32) if packed else None
    dy = torch.randn(x.shape, device="cuda", dtype=torch.float32)
    outs = {}
    for name in (backend, "torch"):
        y = causal_conv1d(x, w, bias=b, cu_seqlens=cu, backend=name)
        outs[name] = (y, *torch.autograd.grad((y.float() * dy).sum(), (x, w, b)))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    errs = [rel(a, r) for a, r in zip(outs[backend], outs["torch"])]
    print(f"conv {backend} {dtype} packed={packed}: y, dx, dw, db = " + ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) < tol, errs


@pytest.mark.skipif(not fla_ready(), reason="fla not usable here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_norm_fla_matches_torch(rel, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, gate = (
        torch.randn(2, 100, 4, 128, generator=gen, device="cuda").to(dtype).requires_grad_() for _ in "xg"
    )
    w = (1 + 0.1 * torch.randn(128, generator=gen, device="cuda")).requires_grad_()
    dy = torch.randn(x.shape, device="cuda")
    outs = {}
    for name in ("fla", "torch"):
        y = gated_rms_norm(x, gate, w, 1e-6, backend=name)
        assert y.dtype == dtype
        outs[name] = (y, *torch.autograd.grad((y.float() * dy).sum(), (x, gate, w)))
    errs = [rel(a, r) for a, r in zip(outs["fla"], outs["torch"])]
    print(f"gated norm fla {dtype}: y, dx, dgate, dw = " + ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) < (1e-5 if dtype == torch.float32 else 1e-2), errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_centered_norm_compiled_on_cuda(rel, dtype):
    """CUDA's default zero-centred norm (torch.compile, Triton) against the eager one at layer widths."""
    from qwen3_next_mcore.ops import zero_centered_rms_norm

    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((512, 2, 2048), (512, 2, 16, 256)):
        x = (3 * torch.randn(*shape, generator=gen, device="cuda")).to(dtype).requires_grad_()
        w = (0.2 * torch.randn(shape[-1], generator=gen, device="cuda")).to(dtype).requires_grad_()
        dy = torch.randn(shape, generator=gen, device="cuda")
        outs = {}
        for name in (None, "torch"):
            y = zero_centered_rms_norm(x, w, 1e-6, backend=name)
            assert y.dtype == dtype
            outs[name] = (y, *torch.autograd.grad((y.float() * dy).sum(), (x, w)))
        errs = [rel(a, r) for a, r in zip(outs[None], outs["torch"])]
        print(f"zero-centred norm compile {dtype} {shape}: y, dx, dw = " + ", ".join(f"{e:.1e}" for e in errs))
        assert max(errs) < (1e-5 if dtype == torch.float32 else 1e-2), errs



def test_moe_sum_copies_on_cuda(rel):
    """The MoE combine (one embedding_bag) against the gather-then-sum reference on CUDA, bf16."""
    from qwen3_next_mcore.ops.token_permutation import sort_by_expert, sum_copies, sum_copies_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    T, E, k = 4096, 512, 10
    idx = torch.rand(T, E, generator=gen, device="cuda").topk(k).indices
    perm, _ = sort_by_expert(torch.zeros(T, E, dtype=torch.bool, device="cuda").scatter_(1, idx, True), k)
    rows = torch.randn(T * k, 2048, generator=gen, device="cuda").to(torch.bfloat16)
    got, want = sum_copies(rows, perm.slot_rows), sum_copies_reference(rows, perm.slot_rows)
    exact = sum_copies_reference(rows.double(), perm.slot_rows)
    print(f"moe sum_copies bf16: vs reference {rel(got, want):.1e}, vs fp64 {rel(got, exact):.1e} "
          f"(reference vs fp64 {rel(want, exact):.1e})")
    assert got.dtype == torch.bfloat16 and rel(got, exact) <= 1.01 * rel(want, exact) + 1e-6
