"""The training step issues forward, backward, gradient norm, clipping and Adam without reading a device
value on the host (each read waits for the GPU to drain, which then idles while the host issues the
next kernels): checked on CPU by making every tensor-to-host read raise during a second
``optimizer_step`` (megatron-core reads a few one-off facts in the first and caches them); the
loss and the grad norm it returns as tensors equal megatron-core's own floats (its host arithmetic, the
reads allowed), and the weights after the step are the same."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from qwen3_next_mcore.testing.distributed import run_distributed

_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def no_host_reads():
    """Any tensor value read on the host (``.item()``, ``float(t)``, ``bool(t)``, ...) raises inside."""
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read of a tensor value: Tensor.{name} {tuple(self.shape)}")
        return read

    try:
        for name in _READS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_guard_catches_reads():
    t = torch.ones(1)
    with no_host_reads(), pytest.raises(AssertionError, match="host read"):
        float(t)
    assert float(t) == 1.0


def _step(rank, on_device: bool):
    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.bench.train_step import _batch, _initial_hf_state
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.training.arguments import make_config
    from qwen3_next_mcore.training.loop import _build, optimizer_step

    parallel.initialize(seed=0)
    config = get_preset("tiny").model_copy(update={"mtp_num_layers": 0})
    ids = _batch(config.vocab_size, 2, 32, torch.device("cpu"))
    cfg = make_config(preset="tiny", data_path=("unused",), micro_batch_size=2, seq_length=32, lr=1e-3,
                      clip_grad=0.05, mtp_loss_scaling_factor=0.0)
    _, ddp, optimizer, _ = _build(cfg, hf_weights=_initial_hf_state(config, torch.device("cpu")), model_config=config)
    if not on_device:  # megatron-core's own host arithmetic: the fallbacks that read the norm, the plain chain
        from megatron.core.optimizer import clip_grads
        from megatron.core.optimizer.optimizer import ChainedOptimizer

        clip_grads.multi_tensor_scale_tensor_impl = None
        optimizer.get_grad_norm = ChainedOptimizer.get_grad_norm.__get__(optimizer)
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(2, 32)}
    chained = len(getattr(optimizer, "chained_optimizers", [])) > 1
    optimizer_step([ddp], optimizer, [batch])  # the first step caches a few one-off facts (read once)
    with no_host_reads() if on_device else contextlib.nullcontext():
        local, ok, grad_norm = optimizer_step([ddp], optimizer, [batch])
    grads = torch.cat([p.main_grad.double().flatten() for p in ddp.module.parameters()])
    weights = torch.cat([p.detach().flatten() for p in ddp.module.parameters()])
    out = (type(local["lm loss"]).__name__, type(grad_norm).__name__, float(local["lm loss"]), float(grad_norm),
           float(grads.norm()), weights, chained, ok)
    parallel.destroy()
    return out


def test_optimizer_step_reads_nothing_on_the_host():
    loss_t, norm_t, loss, norm, norm64, weights, chained, ok = run_distributed(_step, 1, args=(True,))[0]
    _, base_norm_t, base_loss, base_norm, base_norm64, base_weights, _, base_ok = run_distributed(_step, 1,
                                                                                                  args=(False,))[0]
    assert chained  # the dense and expert optimizers: their norms are combined on the device
    assert ok and base_ok and loss_t == norm_t == "Tensor" and base_norm_t == "float"
    assert loss == base_loss and math.isfinite(loss)
    assert norm > 0.05  # clip_grad 0.05: this step clips
    assert abs(norm - base_norm) <= 1e-6 * base_norm
    # the gradients left clipped to the norm 0.05 in both (megatron scales in place; the fused kernel
    # writes back the gradients it unscaled by grad_scale)
    assert norm64 == pytest.approx(0.05, rel=1e-5) and base_norm64 == pytest.approx(0.05, rel=1e-5)
    torch.testing.assert_close(weights, base_weights, rtol=1e-6, atol=1e-7)


def _cuda_step(rank):
    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.bench.train_step import _batch, _initial_hf_state
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.training.arguments import make_config
    from qwen3_next_mcore.training.loop import _build, optimizer_step

    parallel.initialize(seed=0)
    device = torch.device("cuda", torch.cuda.current_device())
    config = get_preset("tiny").model_copy(update={"mtp_num_layers": 0})
    ids = _batch(config.vocab_size, 2, 64, device)
    cfg = make_config(preset="tiny", data_path=("unused",), micro_batch_size=2, seq_length=64, lr=1e-3, bf16=True,
                      clip_grad=0.05, mtp_loss_scaling_factor=0.0)
    _, ddp, optimizer, _ = _build(cfg, hf_weights=_initial_hf_state(config, device), model_config=config)
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(2, 64, device=device)}
    optimizer_step([ddp], optimizer, [batch])  # one-off facts, kernel tuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        local, ok, grad_norm = optimizer_step([ddp], optimizer, [batch])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    out = float(local["lm loss"]), float(grad_norm), ok
    parallel.destroy()
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_optimizer_step_on_cuda_never_synchronises():
    """The real GPU path (fla kernels, our AdamW pass, the MoE dispatcher at one rank): no synchronising call
    during a bf16 step, by CUDA's own sync debug mode."""
    loss, norm, ok = run_distributed(_cuda_step, 1)[0]
    assert ok and math.isfinite(loss) and norm > 0.05
