"""Qwen3NextMoELayer (our router GEMM and token permutation) against megatron-core's own MoELayer with the
same weights: same outputs, aux loss and gradients (fp32, CPU; the bf16 router GEMM on a GPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qwen3_next_mcore.testing.distributed import run_distributed


def _compare(rank):
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.layers.moe import ExpertSortedAlltoAllDispatcher, Qwen3NextMoELayer
    from qwen3_next_mcore.model import build_model

    parallel.initialize(seed=5)
    cfg = get_preset("tiny", vocab_size=128, router_aux_loss_coef=0.01)
    model = build_model(cfg)
    ours = model.decoder.layers[1].mlp
    assert type(ours) is Qwen3NextMoELayer and type(ours.token_dispatcher) is ExpertSortedAlltoAllDispatcher
    ref = MoELayer(ours.config, dataclasses.replace(ours.submodules, router=TopKRouter),
                   layer_number=ours.layer_number)
    assert type(ref.token_dispatcher) is MoEAlltoAllTokenDispatcher
    ref.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 3, cfg.hidden_size, generator=g)
    dy = torch.randn(11, 3, cfg.hidden_size, generator=g)
    results = []
    for layer in (ours, ref):
        xi = x.clone().requires_grad_()
        y = layer(xi)[0]
        (y * dy).sum().backward()  # includes the aux loss, attached to the graph by the router
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        results.append((y.detach(), xi.grad, grads))
    parallel.destroy()
    return results


def test_same_outputs_and_gradients_as_megatron_moe_layer():
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = run_distributed(_compare, 1)[0]
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and any("router" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-6, atol=1e-6, msg=n)


def _layouts(rank):
    """The tiny model's MoE layer in the grouped and the padded experts layout, same input: outputs, input
    gradients and parameter gradients (fp32, CPU), the capacity it used and the errors it raises."""
    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.layers.moe import set_experts_layout
    from qwen3_next_mcore.model import build_model

    parallel.initialize(seed=5)
    cfg = get_preset("tiny", vocab_size=128, router_aux_loss_coef=0.01)
    model = build_model(cfg)
    layer = model.decoder.layers[1].mlp
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 3, cfg.hidden_size, generator=g)
    dy = torch.randn(13, 3, cfg.hidden_size, generator=g)
    results, capacities = [], []
    seen = layer.experts.forward

    def spy(x, *args, **kwargs):  # the capacity the experts see during this forward
        capacities.append(layer.experts.padded_capacity)
        return seen(x, *args, **kwargs)

    layer.experts.forward = spy
    for layout in ("grouped", "padded"):
        set_experts_layout(model, layout)
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y = layer(xi)[0]
        (y * dy).sum().backward()
        results.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    counts = layer.router(x.view(-1, cfg.hidden_size))[1].sum(0)
    errors = []
    for bad in (lambda: set_experts_layout(model, "ragged"),):
        try:
            bad()
        except ValueError as e:
            errors.append(str(e))
    parallel.destroy()
    return results, capacities, int(counts.max()), layer.experts.padded_capacity, errors


def test_padded_experts_layout_gives_the_grouped_layout_numbers():
    (grouped, padded), capacities, largest, after, errors = run_distributed(_layouts, 1)[0]
    assert capacities == [None, -(-largest // 16) * 16] and after is None  # set for the forward only
    torch.testing.assert_close(padded[0], grouped[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(padded[1], grouped[1], rtol=1e-6, atol=1e-6)
    assert padded[2].keys() == grouped[2].keys()
    for n in grouped[2]:
        torch.testing.assert_close(padded[2][n], grouped[2][n], rtol=1e-6, atol=1e-6, msg=n)
    assert "expected one of ('grouped', 'padded')" in errors[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_router_gemm_matches_the_fp32_gemm():
    """fp32 logits from one bf16 GEMM (fp32 accumulation) equal megatron-core's fp32 GEMM of the same
    bf16 values up to fp32 summation order (2.1e-6 on an H100 for 2048-term sums); the gradients are
    within bf16 rounding (2.6e-3 there)."""
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    from qwen3_next_mcore.layers.moe import _Bf16GemmFp32Logits

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 2048, generator=g, device="cuda").to(torch.bfloat16)
    w = (0.02 * torch.randn(512, 2048, generator=g, device="cuda")).to(torch.bfloat16)
    dl = torch.randn(4096, 512, generator=g, device="cuda")
    out = {}
    for name, fn in (("ours", lambda a, b: _Bf16GemmFp32Logits.apply(a, b)),
                     ("fp32", lambda a, b: router_gating_linear(a, b, None, torch.float32))):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        logits = fn(a, b)
        assert logits.dtype == torch.float32
        (logits * dl).sum().backward()
        out[name] = (logits.detach(), a.grad, b.grad)
    rel = lambda p, q: float((p.double() - q.double()).norm() / q.double().norm())
    errs = [rel(p, q) for p, q in zip(out["ours"], out["fp32"])]
    print("router GEMM logits, dx, dw rel errors:", ", ".join(f"{e:.1e}" for e in errs))
    assert errs[0] < 1e-5 and max(errs[1:]) < 1e-2, errs


def _experts_fused_vs_plain(rank):
    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.model import build_model

    parallel.initialize(seed=5)
    cfg = get_preset("proxy", num_hidden_layers=1, layer_types=("full_attention",), mtp_num_layers=0)
    model = build_model(cfg, dtype=torch.bfloat16)
    experts = model.decoder.layers[1].mlp.experts
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.full((experts.num_local_experts,), 64, dtype=torch.int64)
    x = torch.randn(int(counts.sum()), cfg.hidden_size, generator=g, device="cuda").to(torch.bfloat16)
    probs = torch.rand(x.shape[0], generator=g, device="cuda")
    dy = torch.randn(x.shape, generator=g, device="cuda").to(torch.bfloat16)
    out = {}
    for backend in ("triton", "compile", "torch"):
        experts.activation_backend = backend
        xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
        experts.zero_grad(set_to_none=True)
        y = experts(xi, counts, pi)[0]
        (y * dy).sum().backward()
        out[backend] = [t.detach().float().cpu() for t in (y, xi.grad, pi.grad, experts.weight1.grad, experts.weight2.grad)]
    parallel.destroy()
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_expert_activation_matches_plain_torch():
    out = run_distributed(_experts_fused_vs_plain, 1)[0]
    rel = lambda p, q: float((p.double() - q.double()).norm() / q.double().norm())
    for fused in ("triton", "compile"):  # our kernels (the CUDA default) and megatron-core's compiled fusion
        errs = [rel(a, b) for a, b in zip(out[fused], out["torch"])]
        print(f"grouped experts {fused} vs plain (y, dx, dprobs, dw1, dw2):", ", ".join(f"{e:.1e}" for e in errs))
        assert max(errs) < 1e-2, (fused, errs)  # the fused kernels round once where the plain ops round per op


def _routing(rank):
    from megatron.core.transformer.moe.router import TopKRouter

    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.layers.moe import Qwen3NextRouter
    from qwen3_next_mcore.model import build_model

    parallel.initialize(seed=5)
    model = build_model(get_preset("tiny", vocab_size=128, router_aux_loss_coef=0.01))
    router = model.decoder.layers[1].mlp.router
    assert type(router) is Qwen3NextRouter
    router.routing_type = ["aux_loss", "seq_aux_loss"]  # both per-batch losses at once (the global one
    router.config.moe_aux_loss_coeff = [0.01, 0.02]     # needs buffers made at construction)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(11, 3, router.config.num_moe_experts, generator=g)
    weight = torch.randn(33, router.config.num_moe_experts, generator=g)
    real_topk, out = torch.topk, {}
    for cls in (Qwen3NextRouter, TopKRouter):
        router.__class__ = cls  # the same module run by megatron-core's own routing
        router.reset_global_aux_loss_tracker()
        calls = []
        torch.topk = lambda *a, calls=calls, **k: calls.append(1) or real_topk(*a, **k)
        try:
            x = logits.clone().requires_grad_()
            probs, routing_map = router.routing(x)
        finally:
            torch.topk = real_topk
        (probs * weight).sum().backward()  # the aux losses reach the logits through probs
        out[cls.__name__] = (probs.detach(), routing_map, x.grad, len(calls))
    parallel.destroy()
    return out


def test_routing_takes_one_top_k_and_gives_megatron_core_numbers():
    out = run_distributed(_routing, 1)[0]
    (probs, rmap, dlogits, ours_topk), (ref_probs, ref_map, ref_dlogits, ref_topk) = out["Qwen3NextRouter"], \
        out["TopKRouter"]
    assert torch.equal(rmap, ref_map)
    assert torch.equal(probs, ref_probs)
    torch.testing.assert_close(dlogits, ref_dlogits, rtol=1e-6, atol=1e-9)
    assert ours_topk == 1 and ref_topk == 2
