"""The fused GDN conv + q/k/v/z split (ops/gdn_conv_split.py) against the unfused reference.

The Triton kernels run on CPU under Triton's interpreter (a fresh process: the mode is fixed when Triton
first builds a kernel) and on CUDA (gpu-marked). They compute in fp32: against the reference in fp64 on
the same inputs, fp32 rounding (about 1e-7 relative) is the only difference.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from qwen3_next_mcore.ops.backends import KernelEnv, conv_split_backend_report
from qwen3_next_mcore.ops.gdn_conv_split import conv_split_qkvz, conv_split_qkvz_reference, token_positions

# (B, T, G, dk, dv, r, W, cu_seqlens, layout): plain, packed sequences (lengths 5, 1, 17, 2, 15: taps
# crossing a boundary must be dropped, one sequence shorter than the kernel), a transposed
# sequence-first view (sequence parallelism), dk != dv, r = 1, W = 3, a length not a multiple of the block
CASES = {
    "plain": (2, 70, 2, 16, 16, 2, 4, None, "bt"),
    "packed": (1, 40, 2, 16, 32, 2, 4, [0, 5, 6, 23, 25, 40], "bt"),
    "sequence_first_view": (2, 37, 3, 16, 16, 2, 4, None, "sb"),
    "r1_w3": (1, 33, 2, 32, 16, 1, 3, None, "bt"),
}


def _inputs(B, T, G, dk, dv, r, W, cu, layout, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    C = 2 * dk + 2 * r * dv
    if layout == "sb":  # [S, B, G*C] projection output seen batch-first: strided in B and T
        x = torch.randn(T, B, G * C, generator=gen).to(device, dtype).transpose(0, 1).view(B, T, G, C)
    else:
        x = torch.randn(B, T, G, C, generator=gen).to(device, dtype)
    w = (0.5 * torch.randn(G * (2 * dk + r * dv), W, generator=gen)).to(device, dtype)
    dys = [torch.randn(s, generator=gen).to(device, dtype) for s in
           ((B, T, G, dk), (B, T, G, dk), (B, T, G * r, dv), (B, T, G * r, dv))]
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    return x, w, dys, cu


def _run(fn, x, w, dys, **kw):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    outs = fn(x, w, **kw)
    loss = sum((o.double() * d.double()).sum() for o, d in zip(outs, dys))
    loss.backward()
    return [o.detach() for o in outs], x.grad, w.grad


def check_kernel_against_reference(device: str, case: str, dtype: torch.dtype) -> dict:
    """Run the fused kernels and the reference (fp64, on the same rounded inputs); return the errors."""
    B, T, G, dk, dv, r, W, cu, layout = CASES[case]
    x, w, dys, cu_t = _inputs(B, T, G, dk, dv, r, W, cu, layout, dtype, device)
    kw = {"dk": dk, "dv": dv, "r": r, "cu_seqlens": cu_t}
    x_leaf = x.detach().requires_grad_()
    w_leaf = w.detach().clone().requires_grad_()
    outs = conv_split_qkvz(x_leaf, w_leaf, backend="triton", **kw)
    assert all(o.is_contiguous() and o.dtype == dtype for o in outs)
    sum((o.double() * d.double()).sum() for o, d in zip(outs, dys)).backward()
    # the gradient keeps the input's layout (a transposed view's gradient is one too: no copy downstream)
    assert x_leaf.grad.stride() == x.stride(), (x_leaf.grad.stride(), x.stride())
    ref_outs, ref_dx, ref_dw = _run(lambda a, b, **k: conv_split_qkvz_reference(a, b, **k),
                                    x.double().cpu(), w.double().cpu(), [d.double().cpu() for d in dys],
                                    **{**kw, "cu_seqlens": None if cu_t is None else cu_t.cpu()})
    errs = {}
    for name, a, b in zip(("q", "k", "v", "z"), outs, ref_outs):
        errs[name] = ((a.double().cpu() - b).abs().max() / b.abs().max()).item()
    errs["dx"] = ((x_leaf.grad.double().cpu() - ref_dx).abs().max() / ref_dx.abs().max()).item()
    errs["dw"] = ((w_leaf.grad.double().cpu() - ref_dw).abs().max() / ref_dw.abs().max()).item()
    return errs


_INTERPRETED = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from test_gdn_conv_split import CASES, check_kernel_against_reference
print(json.dumps({{case: check_kernel_against_reference("cpu", case, torch.float32) for case in CASES}}))
"""


@pytest.fixture(scope="module")
def interpreted_errors(run_interpreted):
    """Every case run once under Triton's interpreter."""
    return run_interpreted(_INTERPRETED.format(tests=str(Path(__file__).parent)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_kernels_under_the_interpreter_match_the_reference(case, interpreted_errors):
    errs = interpreted_errors[case]
    print(case, errs)
    # fp32 arithmetic against fp64: a few units of 2^-24 of the largest value (z is a copy: exact)
    assert errs["z"] == 0, errs
    assert max(errs.values()) < 2e-6, errs


_INTERPRETED_MODEL = """
import json
import torch
from qwen3_next_mcore import parallel
from qwen3_next_mcore.config import get_preset
from qwen3_next_mcore.model import build_model
from qwen3_next_mcore.training import forward_backward

parallel.initialize(seed=3)
cfg = get_preset("tiny", vocab_size=256)
ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
batch = {{"tokens": ids, "labels": torch.roll(ids, -1, 1), "loss_mask": torch.ones(2, 40)}}
runs = {{}}
for conv in ("triton", "torch"):
    torch.manual_seed(0)
    model = build_model(cfg, op_backends={{"conv": conv}})
    loss = forward_backward(model, [batch])["lm loss"]
    runs[conv] = (float(loss), {{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}})
(loss_t, g_t), (loss_r, g_r) = runs["triton"], runs["torch"]
assert g_t.keys() == g_r.keys()
errs = {{n: ((g_t[n] - g_r[n]).norm() / g_r[n].norm().clamp_min(1e-30)).item() for n in g_r}}
print(json.dumps({{"loss": abs(loss_t - loss_r) / abs(loss_r), "conv_grads": sum("conv1d" in n for n in g_r),
                  "worst": max(errs.values()), "worst_name": max(errs, key=errs.get)}}))
"""


def test_model_with_the_fused_conv_under_the_interpreter_matches_the_unfused_ops(run_interpreted):
    """The tiny model (GDN, attention, MoE, MTP) with the mixer's conv backend "triton" (the fused kernels,
    Triton's interpreter) against "torch" (the unfused ops), same weights: the loss and every gradient."""
    result = run_interpreted(_INTERPRETED_MODEL.format())
    print(result)
    assert result["conv_grads"] >= 1  # the GDN layers' conv weights got gradients
    assert result["loss"] < 1e-6 and result["worst"] < 1e-4, result


def test_reference_drops_taps_across_packed_sequences():
    """The reference on packed sequences equals each sequence run on its own (what the kernel is held to)."""
    B, T, G, dk, dv, r, W, cu, layout = CASES["packed"]
    x, w, _, cu_t = _inputs(B, T, G, dk, dv, r, W, cu, layout, torch.float64)
    packed = conv_split_qkvz_reference(x, w, dk=dk, dv=dv, r=r, cu_seqlens=cu_t)
    for bos, eos in itertools.pairwise(cu):
        alone = conv_split_qkvz_reference(x[:, bos:eos], w, dk=dk, dv=dv, r=r)
        for a, b in zip(packed, alone):
            torch.testing.assert_close(a[:, bos:eos], b, rtol=0, atol=0)


def test_token_positions():
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert token_positions(cu, 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def test_backend_choice_and_errors():
    cuda = KernelEnv(device="cuda", capability=(9, 0), triton="3.6.0", fla="0.6.0")
    # (the rule shared with the other Triton ops: tests/ops/test_gdn_backends.py)
    assert conv_split_backend_report(cuda, "fla")["backend"] == "fla"
    err = conv_split_backend_report(KernelEnv(device="cuda", capability=(9, 0), triton="3.6.0"), "fla")["error"]
    assert "not installed" in err
    with pytest.raises(ValueError, match="gdn_conv_split: backend must be"):
        conv_split_backend_report(cuda, "cuda")


def test_shape_errors_name_the_expected_layout():
    x = torch.randn(1, 8, 2, 64)
    with pytest.raises(ValueError, match=r"qkvz must be \[B, T, G, 2\*dk \+ 2\*r\*dv = 96\]"):
        conv_split_qkvz(x, torch.randn(128, 4), dk=16, dv=16, r=2)
    with pytest.raises(ValueError, match=r"weight must be \[G\*\(2\*dk \+ r\*dv\) = 96, W\]"):
        conv_split_qkvz(torch.randn(1, 8, 2, 64), torch.randn(64, 4), dk=16, dv=16, r=1)
    with pytest.raises(ValueError, match="cu_seqlens needs the packed sequences flattened into batch size 1"):
        conv_split_qkvz(torch.randn(2, 8, 2, 64), torch.randn(96, 4), dk=16, dv=16, r=1,
                        cu_seqlens=torch.tensor([0, 8]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_on_cuda_match_the_reference(case, dtype):
    errs = check_kernel_against_reference("cuda", case, dtype)
    print(case, dtype, {k: f"{v:.1e}" for k, v in errs.items()})
    assert errs["z"] == 0, errs
    # bf16: each output rounded once to bf16 (2^-9 relative); fp32: fp32 rounding
    assert max(errs.values()) < (2e-6 if dtype == torch.float32 else 8e-3), errs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_kernels_match_fla_conv_at_layer_width():
    """At the 80B layer's widths (16 groups of 128 + 128 + 2 x 128 + 2 x 128 channels), bf16: the fused
    kernels against the unfused ops with fla's conv, outputs and gradients."""
    pytest.importorskip("fla")
    B, T, G, dk, dv, r = 2, 1024, 16, 128, 128, 2
    x, w, dys, _ = _inputs(B, T, G, dk, dv, r, 4, None, "bt", torch.bfloat16, "cuda")
    fused = _run(lambda a, b: conv_split_qkvz(a, b, dk=dk, dv=dv, r=r, backend="triton"), x, w, dys)
    fla = _run(lambda a, b: conv_split_qkvz(a, b, dk=dk, dv=dv, r=r, backend="fla"), x, w, dys)
    for name, a, b in zip(("q", "k", "v", "z", "dx", "dw"), (*fused[0], *fused[1:]), (*fla[0], *fla[1:])):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        print(name, f"{err:.1e}")
        assert err < 1e-2, (name, err)


def test_kernels_compile_for_hopper_without_spills_and_with_16_byte_accesses():
    """The three kernels built for sm_90 at the 80B widths (no GPU needed: Triton's own ptxas): no register
    spills, and the tiles move in 16-byte vectors (the few 2-byte loads are the conv weights' columns)."""
    pytest.importorskip("triton")
    from benchmarks.kernel_resources import report

    rows = report()
    assert len(rows) == 3
    for name, blocks, _, r in rows:
        assert r["local_bytes"] == 0, (name, r)
        vector_loads, scalar_loads = r["loads"].get(".v4.b32", 0), r["loads"].get(".b16", 0)
        tile_vectors = blocks["BT"] * blocks["BD"] * 2 // 16 // (32 * 4)  # 16-byte vectors per thread per tile
        assert vector_loads >= 2 * tile_vectors and r["stores"].get(".v4.b32", 0) >= tile_vectors, (name, r)
        assert scalar_loads <= 8 * 4, (name, r)  # W weight columns of at most 8 channels per thread
