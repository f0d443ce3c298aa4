"""torch's fused AdamW under megatron-core's optimizer (training/fused_adam.py), clipping folded into it:
the same update as the foreach implementation megatron builds by itself with its in-place clipping, through the real megatron optimizer wrappers: fp32 on
CPU (megatron's bf16 and distributed optimizers are CUDA-only); on a GPU also bf16 weights with fp32 main
weights, with and without the distributed optimizer."""

import copy

import pytest
import torch

from qwen3_next_mcore.training.fused_adam import torch_adams, use_fused_adam


def _megatron_adam(model, distributed: bool, bf16: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=1.0,
                                                 bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 use_distributed_optimizer=distributed),
                                 # gloo groups exist on CPU only (parallel.initialize), as in the training loop
                                 [ddp], use_gloo_process_groups=not torch.cuda.is_available())
    return ddp, opt


def _steps(rank, distributed: bool, bf16: bool, fused: bool, steps: int = 3):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    from qwen3_next_mcore import parallel

    parallel.initialize(seed=0)

    class Net(MegatronModule):
        def __init__(self):
            super().__init__(TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, bf16=bf16,
                                               params_dtype=dtype))
            g = torch.Generator().manual_seed(0)
            self.a = torch.nn.Parameter(torch.randn(16, 8, generator=g))
            self.b = torch.nn.Parameter(torch.randn(8, generator=g))

        def forward(self, x):
            return ((x @ self.a.T).float() ** 2).mean() + (self.b.float() ** 3).sum()

    device = torch.device("cuda" if bf16 or distributed else "cpu")
    dtype = torch.bfloat16 if bf16 else torch.float32
    ddp, opt = _megatron_adam(Net().to(device, dtype), distributed, bf16)
    from megatron.core.optimizer import optimizer as mopt

    megatron_clip, in_place_clips = mopt.clip_grad_by_total_norm_fp32, []
    mopt.clip_grad_by_total_norm_fp32 = lambda *a, **k: (in_place_clips.append(1), megatron_clip(*a, **k))[1]
    impl = use_fused_adam(opt) if fused else "foreach"
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    norms = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        (ddp(x) * 20).backward()  # gradient norms of 20..60: clip_grad=1 clips every step
        ddp.finish_grad_sync()
        _, grad_norm, _ = opt.step()
        norms.append(float(grad_norm))
    mains = [copy.deepcopy(p.detach()).cpu() for o in torch_adams(opt) for g in o.param_groups for p in g["params"]]
    flags = [g["fused"] for o in torch_adams(opt) for g in o.param_groups]
    kernels = [getattr(o, "_qnm_adamw_kernel", None) for o in torch_adams(opt)]
    # the model's own weights after the steps (megatron's copy of the main weights, or the Triton kernel's)
    models = [p.detach().float().cpu() for p in ddp.module.parameters()]
    parallel.destroy()
    return impl, flags, mains, norms, len(in_place_clips), kernels, models


_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("distributed,bf16", [(False, False), pytest.param(False, True, marks=_gpu),
                                              pytest.param(True, True, marks=_gpu)])
def test_fused_adam_matches_foreach_through_megatron_optimizer(distributed, bf16):
    from qwen3_next_mcore.testing.distributed import run_distributed

    """Also the clipping folded into the fused kernel: the same weights as megatron's in-place clipping, and
    the main gradients left unscaled."""
    (impl, flags, fused, norms, clips, kernels, models), = run_distributed(_steps, 1, args=(distributed, bf16, True))
    (_, base_flags, foreach, base_norms, base_clips, _, base_models), = run_distributed(
        _steps, 1, args=(distributed, bf16, False))
    assert impl == "fused" and flags and all(flags) and not any(base_flags)
    # on a GPU the Triton multi-tensor kernel steps (and writes the bf16 weights), on CPU torch's fused one
    assert set(kernels) == ({"triton"} if torch.cuda.is_available() else {"torch"}), kernels
    assert len(models) == len(base_models) > 0
    for a, b in zip(models, base_models):  # bf16 copies of main weights equal to rounding: at most 1 bf16 unit
        torch.testing.assert_close(a, b, rtol=2**-7 if bf16 else 1e-6, atol=1e-7)
    assert min(norms) > 10 and norms == pytest.approx(base_norms, rel=1e-5)  # every step clips
    assert clips == 0 and base_clips >= 3  # folded: megatron's in-place scaling never ran
    assert len(fused) == len(foreach) > 0
    for a, b in zip(fused, foreach):
        assert a.dtype == torch.float32  # megatron's main weights are what Adam steps
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, torch.zeros_like(a))


def test_switch_to_fused_after_steps_continues_like_foreach():
    """As after loading a checkpoint saved by the foreach implementation: the step counters move to the
    weights' device and the next steps equal foreach's to rounding."""
    def run(switch: bool):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, generator=g))
        inner = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1)

        class Wrapper:
            optimizer = inner

        for i in range(4):
            if i == 2 and switch:
                assert use_fused_adam(Wrapper()) == "fused"
                assert use_fused_adam(Wrapper()) == "fused"  # idempotent
            p.grad = torch.sin(p.detach() * (i + 1))
            inner.step()
        return p.detach(), inner

    fused, opt = run(True)
    foreach, _ = run(False)
    assert opt.param_groups[0]["fused"] and opt.state[opt.param_groups[0]["params"][0]]["step"].item() == 4
    torch.testing.assert_close(fused, foreach, rtol=1e-6, atol=1e-7)
    assert use_fused_adam(object()) == "not torch"


def test_kernel_choice_is_checked():
    """The Triton pass is CUDA-only: asking for it with CPU weights says why; an unknown name is refused."""
    p = torch.nn.Parameter(torch.ones(4))

    class Wrapper:
        optimizer = torch.optim.AdamW([p])

    with pytest.raises(ValueError, match="kernel='triton' is not usable here: (a torch.float32 parameter on cpu|Triton is not installed)"):
        use_fused_adam(Wrapper(), kernel="triton")
    with pytest.raises(ValueError, match="kernel must be"):
        use_fused_adam(Wrapper(), kernel="apex")
    assert use_fused_adam(Wrapper(), kernel="torch") == "fused"
    assert Wrapper.optimizer._qnm_adamw_kernel == "torch"


def test_folded_clipping_mixed_and_unmarked_parameters():
    """One coefficient for all -> grad_scale; different ones (separate norm groups) or none -> scaled in
    place as megatron would; a parameter outside a folding optimizer -> megatron's own clipping."""
    from qwen3_next_mcore.training import fused_adam as fa

    def run(coeffs, fold: bool):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(32, generator=g)) for _ in coeffs]
        # eps=1: Adam's update is otherwise nearly invariant to the gradients' scale
        inner = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, eps=1.0, fused=True)
        if fold:
            fa._fold_clipping(inner)
        for i, p in enumerate(ps):
            p.grad = torch.cos(p.detach() * (i + 2)) * 5
            if coeffs[i] is not None:
                if fold:
                    setattr(p, fa._PENDING, coeffs[i])
                else:
                    p.grad.mul_(coeffs[i])
        inner.step()
        assert getattr(inner, "grad_scale", None) is None and not any(hasattr(p, fa._PENDING) for p in ps)
        return torch.cat([p.detach() for p in ps])

    t1, t2 = torch.tensor([0.25]), torch.tensor([0.5])  # coefficients kept on the device, one per clip call
    for coeffs in ([0.25, 0.25], [0.25, 0.5], [0.25, None], [None, None], [t1, t1], [t1, t2], [t1, None]):
        torch.testing.assert_close(run(coeffs, True), run(coeffs, False), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(run([0.25, 0.25], True), run([None, None], True))  # the coefficient acts

    calls = []
    outside = torch.nn.Parameter(torch.ones(3))
    outside.grad = torch.ones(3)
    fa._deferred_clip(lambda *a: calls.append(a), [outside], 1.0, 10.0)
    assert len(calls) == 1 and not hasattr(outside, fa._PENDING)
