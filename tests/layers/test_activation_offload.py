"""Activation offload acts on every hybrid layer kind (GDN mixer, gated attention, MoE) and changes no
number: the loss and every gradient equal the run without it."""

from __future__ import annotations

import torch

from qwen3_next_mcore.testing.distributed import run_distributed


def _grads(rank, offload_layers):
    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.layers.activation_offload import OffloadStats, enable_activation_offload
    from qwen3_next_mcore.model import build_model
    from qwen3_next_mcore.training import forward_backward

    parallel.initialize(seed=7)
    cfg = get_preset("tiny", vocab_size=256, mtp_num_layers=0)
    model = build_model(cfg)
    stats, names = OffloadStats(), []
    if offload_layers:
        names = enable_activation_offload(model, offload_layers, min_bytes=0, stats=stats)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": ids, "labels": torch.roll(ids, -1, 1), "loss_mask": torch.ones(2, 40)}
    loss = forward_backward(model, [batch])["lm loss"]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    parallel.destroy()
    return loss, grads, names, stats.tensors, {k: list(v.shape) for k, v in model.state_dict().items()
                                               if isinstance(v, torch.Tensor)}


def test_offload_acts_on_every_layer_kind_and_changes_nothing():
    base_loss, base_grads, _, _, base_keys = run_distributed(_grads, 1, args=(0,))[0]
    loss, grads, names, packed, keys = run_distributed(_grads, 1, args=(4,))[0]
    assert loss == base_loss
    assert grads.keys() == base_grads.keys() and len(grads) > 20
    for n in grads:
        assert torch.equal(grads[n], base_grads[n]), n
    assert keys == base_keys  # parameter names and checkpoint keys unchanged
    assert len(names) == 8  # 4 decoder layers = 8 hybrid layers
    kinds = {name.split("(")[1].rstrip(")") for name in packed}
    assert kinds == {"Qwen3NextGatedDeltaNet", "SelfAttention", "Qwen3NextMoELayer"}, packed
    assert all(n > 0 for n in packed.values())


def test_only_the_first_layers_are_offloaded():
    _, _, names, packed, _ = run_distributed(_grads, 1, args=(1,))[0]
    assert names == ["decoder.layers.0(Qwen3NextGatedDeltaNet)", "decoder.layers.1(Qwen3NextMoELayer)"]
    assert set(packed) == set(names)
