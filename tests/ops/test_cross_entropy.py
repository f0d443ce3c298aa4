"""ops/cross_entropy.py against megatron-core's unfused vocab-parallel cross-entropy (the reference the
model used before): fp32 and bf16 logits, targets outside the vocabulary (-100), and the vocabulary split
over two tensor-parallel ranks (gloo) equal to one rank. On a GPU, the compiled passes equal the eager ones."""

from __future__ import annotations

import pytest
import torch

from qwen3_next_mcore.ops.cross_entropy import vocab_parallel_cross_entropy
from qwen3_next_mcore.testing.distributed import run_distributed


def _inputs(dtype, vocab=1000, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(48, 2, vocab, generator=g, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, vocab, (48, 2), generator=g)
    target[3, 1] = target[40, 0] = -100  # ignored positions (the loss mask drops them)
    dloss = torch.rand(48, 2, generator=g, dtype=torch.float64)
    return logits.to(device), target.to(device), dloss.to(device)


def _ours_and_megatron(rank, dtype):
    from megatron.core import tensor_parallel

    from qwen3_next_mcore import parallel

    parallel.initialize()
    logits, target, dloss = _inputs(dtype)
    out = {}
    for name, fn in (("ours", lambda x: vocab_parallel_cross_entropy(x, target, backend="torch")),
                     ("megatron", lambda x: tensor_parallel.vocab_parallel_cross_entropy(x, target))):
        x = logits.clone().requires_grad_()
        loss = fn(x)
        (loss * dloss.to(loss.dtype)).sum().backward()
        out[name] = (loss.detach(), x.grad)
    parallel.destroy()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_megatron_core_unfused_cross_entropy(dtype):
    out = run_distributed(_ours_and_megatron, 1, args=(dtype,))[0]
    (loss, grad), (ref_loss, ref_grad) = out["ours"], out["megatron"]
    assert loss.dtype == torch.float32 and grad.dtype == dtype  # megatron's bf16 path: bf16 grads too
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16: both round the same fp32 gradient once
    assert float((grad.float() - ref_grad.float()).norm() / ref_grad.float().norm()) < tol


def test_matches_float64_cross_entropy_and_ignores_out_of_range_targets():
    logits, target, dloss = _inputs(torch.float64)
    x = logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, target, backend="torch")
    (loss * dloss).sum().backward()
    lse = torch.logsumexp(logits, -1)
    picked = logits.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    want = torch.where(target >= 0, lse - picked, lse - logits.amax(-1))  # megatron-core's value for -100
    torch.testing.assert_close(loss, want.float(), rtol=1e-6, atol=1e-6)
    onehot = torch.nn.functional.one_hot(target.clamp_min(0), logits.shape[-1]) * (target >= 0).unsqueeze(-1)
    want_grad = (torch.softmax(logits, -1) - onehot) * dloss.unsqueeze(-1)
    torch.testing.assert_close(x.grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("logits_shape,target_shape,target_dtype", [
    ((48, 2, 10), (2, 48), torch.int64),  # [b, s] target for [s, b, V] logits
    ((48, 2, 10), (48, 2), torch.float32),
])
def test_bad_shapes_and_dtypes_are_refused_by_name(logits_shape, target_shape, target_dtype):
    with pytest.raises(ValueError, match=r"expected float logits \[\.\.\., V\] and integer target .*got logits "
                       r"torch.float32 \[48, 2, 10\] and target"):
        vocab_parallel_cross_entropy(torch.zeros(logits_shape), torch.zeros(target_shape, dtype=target_dtype))


def _split_vocab(rank, world):
    from megatron.core import parallel_state

    from qwen3_next_mcore import parallel

    parallel.initialize(tensor_parallel=world)
    logits, target, dloss = _inputs(torch.float32)
    part = logits.shape[-1] // world
    x = logits[..., rank * part:(rank + 1) * part].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, target, parallel_state.get_tensor_model_parallel_group(),
                                        backend="torch")
    (loss * dloss.float()).sum().backward()
    parallel.destroy()
    return loss.detach(), x.grad


def test_vocabulary_split_over_two_ranks_equals_one():
    (whole, whole_grad), = run_distributed(_split_vocab, 1, args=(1,))
    halves = run_distributed(_split_vocab, 2, args=(2,))
    for loss, _ in halves:
        torch.testing.assert_close(loss, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([g for _, g in halves], -1), whole_grad, rtol=1e-6, atol=1e-8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_passes_equal_eager_on_cuda():
    logits, target, dloss = _inputs(torch.bfloat16, vocab=151936, device="cuda")
    out = {}
    for backend in ("torch", "compile"):
        x = logits.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, target, backend=backend)
        (loss * dloss.float()).sum().backward()
        out[backend] = (loss, x.grad)
    torch.testing.assert_close(out["compile"][0], out["torch"][0], rtol=1e-5, atol=1e-5)
    assert out["compile"][1].dtype == torch.bfloat16
    torch.testing.assert_close(out["compile"][1].float(), out["torch"][1].float(), rtol=2e-2, atol=1e-6)
