"""training/wgrad_fusion.py: the dense linears' weight gradients added into the fp32 main grads by the
GEMM (megatron-core's gradient-accumulation fusion, its apex GEMM supplied by torch.addmm(out_dtype)).

On CPU it stays off (the fused GEMM is CUDA-only) and nothing is changed. On a GPU: the fused GEMM
against float64, and a bf16 model under megatron-core's DDP over two micro-batches, run as built and
again with the fusion forced off (one process): every main grad with the fusion equals the plain path's
(bf16 wgrad then added) to within the bf16 rounding the plain path makes, the other parameters' to
1e-4, and the fused linears leave no gradient in ``param.grad``."""

from __future__ import annotations

import pytest
import torch

from qwen3_next_mcore.testing.distributed import run_distributed
from qwen3_next_mcore.training.wgrad_fusion import fused_wgrad_unavailable, wgrad_gemm_accum_fp32

_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model_and_grads(rank):
    """Build the tiny model under DDP (CPU or CUDA as available) and run forward/backward over two
    micro-batches twice: as built, then with the fusion forced off on every linear. Returns (the linears
    fused as built, {name: main_grad} as built, the same forced off, {name: grad left} as built)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.bench.train_step import _batch, _initial_hf_state
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.training.arguments import make_config
    from qwen3_next_mcore.training.loop import _build
    from qwen3_next_mcore.training.step import forward_backward

    parallel.initialize(seed=0)
    config = get_preset("tiny").model_copy(update={"mtp_num_layers": 0})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = make_config(preset="tiny", data_path=("unused",), micro_batch_size=2, seq_length=32, lr=1e-3,
                      bf16=device.type == "cuda")
    _, ddp, _, _ = _build(cfg, hf_weights=_initial_hf_state(config, torch.device("cpu")), model_config=config)
    linears = {n: m for n, m in ddp.module.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
    on = sorted(n for n, m in linears.items() if m.gradient_accumulation_fusion)
    batches = []
    for seed in (1, 2):
        ids = _batch(config.vocab_size, 2, 32, torch.device("cpu")).roll(seed, dims=1)
        batches.append({"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(2, 32)})

    def grads():
        ddp.zero_grad_buffer()
        forward_backward([ddp], batches)
        return {n: p.main_grad.detach().double().cpu() for n, p in ddp.module.named_parameters()}

    as_built = grads()
    left = {n: p.grad is not None for n, p in ddp.module.named_parameters()}
    for m in linears.values():
        m.gradient_accumulation_fusion = False
    plain = grads()
    parallel.destroy()
    return on, as_built, plain, left


def test_off_on_cpu_and_nothing_changed():
    assert "needs CUDA" in fused_wgrad_unavailable(torch.device("cpu"))
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fusion is on (see the GPU test)")
    on, as_built, plain, _ = run_distributed(_model_and_grads, 1)[0]
    assert on == []
    for name, g in plain.items():  # nothing fused: both runs are the plain path, bit for bit
        assert torch.equal(as_built[name], g) and torch.isfinite(g).all(), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_gemm_accumulates_in_fp32():
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(384, 256, generator=g, dtype=torch.float64)
    x, dy = (torch.randn(4096, n, generator=g, dtype=torch.float64).to(torch.bfloat16) for n in (256, 384))
    want = acc + dy.double().t() @ x.double()
    got = acc.float().cuda()
    wgrad_gemm_accum_fp32(x.cuda(), dy.cuda(), got)
    plain = acc.float().cuda() + (dy.cuda().t() @ x.cuda()).float()  # the unfused path: bf16 wgrad, then add
    err = float((got.double().cpu() - want).abs().max() / want.abs().max())
    err_plain = float((plain.double().cpu() - want).abs().max() / want.abs().max())
    assert err < 1e-5 and err < err_plain / 10, (err, err_plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_main_grads_match_the_plain_path_under_ddp():
    on, fused, plain, left = run_distributed(_model_and_grads, 1)[0]
    assert len(on) >= 4 and "output_layer" in on  # the GDN and attention projections, the output layer
    for name, g in plain.items():
        if name.rsplit(".", 1)[0] in on:  # the plain path rounds the wgrad to bf16, the fused one does not
            rel = float((fused[name] - g).norm() / g.norm().clamp_min(1e-30))
            assert rel < 2e-2, (name, rel)
        else:  # norms, experts, router, embedding: their gradients do not go through the fused GEMM (equal
            # but for the order of sums in GPU kernels that may use atomics)
            rel = float((fused[name] - g).norm() / g.norm().clamp_min(1e-30))
            assert rel < 1e-4, (name, rel)
    assert not any(left.values())  # DDP cleared every param.grad (the fused linears' dummies included)
