"""Every memory mode gives the gradients of the plain run: full recompute (uniform, every layer),
selective recompute (megatron-core's core-attention recompute) and activation offload, on a model with
GDN, attention, MoE and MTP layers."""

from __future__ import annotations

import pytest
import torch

from qwen3_next_mcore.testing.distributed import run_distributed

MODES = {
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "selective": {"recompute_granularity": "selective"},
}


def _grads(rank, mode):
    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.layers.activation_offload import enable_activation_offload
    from qwen3_next_mcore.model import build_model
    from qwen3_next_mcore.training import forward_backward

    parallel.initialize(seed=11)
    cfg = get_preset("tiny", vocab_size=256)
    model = build_model(cfg, **MODES.get(mode, {}))
    if mode == "offload":
        enable_activation_offload(model, 4, min_bytes=0)
    calls = {"gdn": 0, "core_attention": 0, "moe": 0}  # forward runs: recompute repeats them in backward

    def counter(key):
        def hook(*_):
            calls[key] += 1
        return hook

    for layer in model.decoder.layers:
        sa = layer.self_attention
        if type(sa).__name__ == "Qwen3NextGatedDeltaNet":
            sa.register_forward_hook(counter("gdn"))
        elif hasattr(sa, "core_attention"):
            sa.core_attention.register_forward_hook(counter("core_attention"))
        if type(layer.mlp).__name__ == "Qwen3NextMoELayer":
            layer.mlp.register_forward_hook(counter("moe"))
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    batch = {"tokens": ids, "labels": torch.roll(ids, -1, 1), "loss_mask": torch.ones(2, 48)}
    loss = forward_backward(model, [batch])["lm loss"]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    parallel.destroy()
    return loss, grads, calls


@pytest.fixture(scope="module")
def plain():
    return run_distributed(_grads, 1, args=("none",))[0]


@pytest.mark.parametrize("mode", ["full", "selective", "offload"])
def test_memory_mode_gives_the_plain_gradients(plain, mode):
    base_loss, base, base_calls = plain
    loss, grads, calls = run_distributed(_grads, 1, args=(mode,))[0]
    assert base_calls == {"gdn": 3, "core_attention": 1, "moe": 4}  # the decoder's (MTP not hooked)
    # the mode really acts: full recomputes every hybrid layer (GDN, attention, MoE) in the backward,
    # selective recomputes the core attention, offload recomputes nothing
    expected = {"full": {"gdn": 6, "core_attention": 2, "moe": 8}, "selective": {**base_calls, "core_attention": 2},
                "offload": base_calls}[mode]
    assert calls == expected, calls
    assert loss == pytest.approx(base_loss, rel=1e-6)
    assert grads.keys() == base.keys() and any("self_attention.in_proj_qkvz" in n for n in grads)
    for n, g in grads.items():
        err = ((g - base[n]).norm() / base[n].norm().clamp_min(1e-30)).item()
        assert err <= 1e-6, (mode, n, err)
