"""ops/adamw.py: the float64 reference equals torch's AdamW (CPU); the Triton multi-tensor kernel equals the
reference, writes the low-precision weights as the rounded fp32 ones and leaves the gradients alone (GPU)."""

from __future__ import annotations

import pytest
import torch

from qwen3_next_mcore.ops.adamw import BLOCK, adamw_multi_tensor, adamw_reference

# beta2 = 0.999 (megatron-core's default): 1 - 0.999 ** step cancels four digits, so a kernel computing the
# bias correction in fp32 is caught (it was, by the GPU test through megatron's optimizer)
HYPER = {"lr": 3e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
SHAPES = [(7, 5), (BLOCK + 3,), (2, BLOCK), (1,), (333, 17)]  # partial, exact and several blocks


def _state(device, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device) for s in shapes]
    grads = [torch.randn(s, generator=g).to(device) * 4 for s in shapes]
    return params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], \
        [torch.zeros((), device=device) for _ in params]


def test_reference_equals_torch_adamw():
    params, grads, m, v, steps = _state("cpu")
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(torch_params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"], foreach=False)
    scale = torch.tensor([2.5])
    for i in range(3):
        step_grads = [g * (i + 1) for g in grads]
        adamw_reference(params, step_grads, m, v, steps, grad_scale=scale, **HYPER)
        for p, g in zip(torch_params, step_grads):
            p.grad = g / 2.5
        opt.step()
    assert all(float(s) == 3 for s in steps)
    for ours, theirs in zip(params, torch_params):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-7)
    for p, m_i, v_i in zip(torch_params, m, v):
        torch.testing.assert_close(m_i, opt.state[p]["exp_avg"], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(v_i, opt.state[p]["exp_avg_sq"], rtol=1e-6, atol=1e-8)


def test_kernel_refuses_cpu_and_mismatched_tensors(monkeypatch):
    params, grads, m, v, steps = _state("cpu")
    with pytest.raises(ValueError, match="tensor 0: fp32 CUDA weights, gradients, moments and step counters"):
        adamw_multi_tensor(params, grads, m, v, steps, **HYPER)
    # the checks after the device's (CPU tensors pass it under Triton's interpreter; they raise before any launch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"tensor 0: sizes differ \(35, 4099, 35, 35; step 1\)"):
        adamw_multi_tensor(params, [grads[1], grads[0], *grads[2:]], m, v, steps, **HYPER)
    with pytest.raises(ValueError, match="tensor 0 is not contiguous"):
        adamw_multi_tensor([params[0].t()] + params[1:], grads, m, v, steps, **HYPER)
    with pytest.raises(ValueError, match="tensor 0: the low-precision copy must be bf16/fp16 of 35 elements, got "
                                         "torch.float32 of 35"):
        adamw_multi_tensor(params, grads, m, v, steps, **HYPER,
                           model_params=[torch.empty(7, 5)] + [None] * (len(params) - 1))
    with pytest.raises(ValueError, match="low-precision copies of more than one dtype"):
        adamw_multi_tensor(params[:2], grads[:2], m[:2], v[:2], steps[:2], **HYPER,
                           model_params=[torch.empty(7, 5, dtype=torch.bfloat16),
                                         torch.empty(BLOCK + 3, dtype=torch.float16)])


_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _interpreted(rank, aligned: bool):
    import os

    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel is first built in this process
    check_kernel_against_reference("cpu", aligned)


@pytest.mark.parametrize("aligned", [True, False])
def test_triton_kernel_under_the_interpreter_equals_reference(aligned):
    """The same kernel run by Triton's CPU interpreter (a fresh process: the mode is fixed at build)."""
    pytest.importorskip("triton")
    from qwen3_next_mcore.testing.distributed import run_distributed

    run_distributed(_interpreted, 1, args=(aligned,))


@pytest.mark.gpu
@_gpu
@pytest.mark.parametrize("aligned", [True, False])
def test_triton_kernel_equals_reference(aligned):
    check_kernel_against_reference("cuda", aligned)


def check_kernel_against_reference(device: str, aligned: bool) -> None:
    params, grads, m, v, steps = _state(device)
    if not aligned:  # views one element into a buffer: no 16-byte alignment, the kernel's scalar path
        def shift(ts):
            out = []
            for t in ts:
                buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
                view = buf[1:].view(t.shape)
                view.copy_(t)
                out.append(view)
            return out
        params, grads, m, v = shift(params), shift(grads), shift(m), shift(v)
    ref = [[t.clone() for t in ts] for ts in (params, grads, m, v, steps)]
    start = [p.clone() for p in params]
    models = [torch.empty_like(p, dtype=torch.bfloat16) if i != 1 else None for i, p in enumerate(params)]
    ref_models = [None if w is None else w.clone() for w in models]
    grads_before = [g.clone() for g in grads]
    cache: dict = {}
    for i in range(3):
        scale = torch.tensor([0.5 * (i + 1)], device=device)
        adamw_multi_tensor(params, grads, m, v, steps, grad_scale=scale, model_params=models, plan_cache=cache,
                           **HYPER)
        adamw_reference(*ref, grad_scale=scale, model_params=ref_models, **HYPER)
    assert len(cache) == 1  # the tables were built once and reused
    # fp32 arithmetic against float64 rounded once: a few units in the last place of each moment, and of
    # the weights' total change (the weights themselves would hide an error in the update below their ulp)
    for name, ours, want in zip(("exp_avg", "exp_avg_sq", "step"), (m, v, steps), ref[2:]):
        for a, b in zip(ours, want):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=0, msg=name)
    for a, b, a0 in zip(params, ref[0], start):
        torch.testing.assert_close(a - a0, b - a0, rtol=1e-5, atol=1e-9, msg="weight change")
    assert all(torch.equal(a, b) for a, b in zip(grads, ref[1]))
    assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads_before))  # gradients untouched
    for w, p in zip(models, params):
        if w is not None:
            if device == "cuda":
                assert torch.equal(w, p.to(torch.bfloat16))  # rounded to nearest even
            else:  # the interpreter rounds toward zero: within one bf16 unit
                torch.testing.assert_close(w.float(), p, rtol=2**-7, atol=0)
    assert all(float(s) == 3 for s in steps)
