"""training/multi_tensor.py: the _foreach versions of megatron-core's multi-tensor fallbacks give the same
numbers (norm against fp64; scale and copy exactly), and a megatron optimizer step with clipping returns
the same gradient norm and weights with them as with megatron-core's own fallbacks."""

from __future__ import annotations

import torch

from qwen3_next_mcore.testing.distributed import run_distributed
from qwen3_next_mcore.training.multi_tensor import (
    foreach_copy_this_to_that,
    foreach_l2_norm,
    foreach_scale,
    foreach_scale_tensor,
)


def _tensors(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(dtype) * 3 for shape in [(7, 5), (11,), (3, 4, 2), (1,)]]


def test_l2_norm_matches_float64():
    ts = _tensors()
    norm, per = foreach_l2_norm(2048 * 32, None, [ts], False)
    want = torch.cat([t.double().flatten() for t in ts]).norm()
    assert per is None and norm.shape == (1,) and norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), want.reshape(1), rtol=1e-6, atol=0)


def test_scale_and_copy_match_the_loops_they_replace():
    src = _tensors()
    inplace = [t.clone() for t in src]
    foreach_scale(0, None, [inplace, inplace], 0.25)
    assert all(torch.equal(a, s * 0.25) for a, s in zip(inplace, src))
    to_bf16 = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
    foreach_scale(0, None, [src, to_bf16], 0.5)
    assert all(torch.equal(a, (s * 0.5).bfloat16()) for a, s in zip(to_bf16, src))
    copies = [torch.zeros_like(t, dtype=torch.bfloat16) for t in src]
    foreach_copy_this_to_that(src, copies)
    assert all(torch.equal(a, s.bfloat16()) for a, s in zip(copies, src))
    foreach_scale(0, None, [src, copies], 1.0)
    assert all(torch.equal(a, s.bfloat16()) for a, s in zip(copies, src))
    scale = torch.tensor([0.3])
    inplace = [t.clone() for t in src]
    foreach_scale_tensor(0, None, [inplace, inplace], scale)
    assert all(torch.equal(a, s * 0.3) for a, s in zip(inplace, src))
    to_bf16 = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
    foreach_scale_tensor(0, None, [src, to_bf16], scale)
    assert all(torch.equal(a, (s * 0.3).bfloat16()) for a, s in zip(to_bf16, src))


def _clipped_step(rank, ours: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, clip_grads, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.training.multi_tensor import use_foreach_multi_tensor_ops

    parallel.initialize(seed=0)
    replaced = use_foreach_multi_tensor_ops() if ours else []

    class Net(MegatronModule):
        def __init__(self):
            super().__init__(TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1))
            self.ws = torch.nn.ParameterList(torch.nn.Parameter(t) for t in _tensors())

        def forward(self):
            return sum((w ** 3).sum() for w in self.ws)

    model = Net()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0), [ddp],
                                 use_gloo_process_groups=True)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    ddp().backward()
    ddp.finish_grad_sync()
    ok, grad_norm, _ = opt.step()
    impl = clip_grads.l2_norm_impl.__name__
    weights = [p.detach().clone() for p in model.parameters()]
    parallel.destroy()
    return ok, replaced, impl, float(grad_norm), weights


def test_megatron_optimizer_step_is_unchanged():
    ok, replaced, impl, norm, weights = run_distributed(_clipped_step, 1, args=(True,))[0]
    base_ok, _, base_impl, base_norm, base_weights = run_distributed(_clipped_step, 1, args=(False,))[0]
    assert ok and base_ok  # the steps were applied
    assert impl == "foreach_l2_norm" and base_impl == "local_multi_tensor_l2_norm"
    assert "megatron.core.optimizer.clip_grads.l2_norm_impl" in replaced
    assert norm > 1.0  # the gradients were clipped
    assert abs(norm - base_norm) <= 1e-6 * base_norm
    for w, b in zip(weights, base_weights):
        torch.testing.assert_close(w, b, rtol=1e-6, atol=1e-7)
