"""megatron-core's native fused cross-entropy (our GPU bf16 default) against its unfused one."""

from __future__ import annotations

import torch

from qwen3_next_mcore.testing.distributed import run_distributed


def _losses(rank):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    from qwen3_next_mcore import parallel

    parallel.initialize()
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 2, 1000, generator=g) * 3).to(torch.bfloat16)
    target = torch.randint(0, 1000, (64, 2), generator=g)
    dloss = torch.rand(64, 2, generator=g)
    out = {}
    for name, fn in (("unfused", lambda x: tensor_parallel.vocab_parallel_cross_entropy(x, target)),
                     ("fused", lambda x: fused_vocab_parallel_cross_entropy(
                         x, target, parallel_state.get_tensor_model_parallel_group()))):
        x = logits.clone().requires_grad_()
        loss = fn(x)
        (loss * dloss).sum().backward()
        out[name] = (loss.detach(), x.grad)
    parallel.destroy()
    return out


def test_fused_cross_entropy_matches_unfused_bf16():
    out = run_distributed(_losses, 1)[0]
    (loss, grad), (loss_f, grad_f) = out["unfused"], out["fused"]
    assert loss.dtype == loss_f.dtype == torch.float32 and grad_f.dtype == torch.bfloat16
    torch.testing.assert_close(loss_f, loss, rtol=1e-6, atol=1e-5)
    assert float((grad_f.float() - grad.float()).norm() / grad.float().norm()) < 1e-3


def test_gpu_bf16_config_asks_for_it():
    from qwen3_next_mcore.config import get_preset, to_transformer_config

    cfg = to_transformer_config(get_preset("tiny"), params_dtype=torch.bfloat16)
    assert cfg.cross_entropy_loss_fusion == torch.cuda.is_available()  # on CPU: unfused (compiles are slow)
    assert not to_transformer_config(get_preset("tiny")).cross_entropy_loss_fusion  # fp32: unfused
