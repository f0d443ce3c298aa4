"""Activation offload acts on every hybrid layer kind (GDN mixer, gated attention, MoE) and changes no
number: the loss and every gradient equal the run without it, also with two micro-batches in flight;
in the backward only the first layer reached is fetched on demand, every other one is prefetched. On a
GPU (copies on a side stream, overlapping the computation) the gradients equal the plain run's too."""

from __future__ import annotations

import pytest
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
                                               if isinstance(v, torch.Tensor)}, stats.fetches


def test_offload_acts_on_every_layer_kind_and_changes_nothing():
    base_loss, base_grads, _, _, base_keys, _ = run_distributed(_grads, 1, args=(0,))[0]
    loss, grads, names, packed, keys, fetches = run_distributed(_grads, 1, args=(4,))[0]
    assert loss == base_loss
    assert grads.keys() == base_grads.keys() and len(grads) > 20
    for n in grads:
        assert torch.equal(grads[n], base_grads[n]), n
    assert keys == base_keys  # parameter names and checkpoint keys unchanged
    assert len(names) == 8  # 4 decoder layers = 8 hybrid layers
    kinds = {name.split("(")[1].rstrip(")") for name in packed}
    assert kinds == {"Qwen3NextGatedDeltaNet", "Qwen3NextSelfAttention", "Qwen3NextMoELayer"}, packed
    assert all(n > 0 for n in packed.values())
    # the backward reaches the last layer first: fetched on demand, each earlier one prefetched once
    assert fetches == [(names[-1], "demand")] + [(n, "prefetch") for n in reversed(names[:-1])], fetches


def test_only_the_first_layers_are_offloaded():
    _, _, names, packed, _, _ = run_distributed(_grads, 1, args=(1,))[0]
    assert names == ["decoder.layers.0(Qwen3NextGatedDeltaNet)", "decoder.layers.1(Qwen3NextMoELayer)"]
    assert set(packed) == set(names)


def _two_in_flight(rank, device: str):
    """Two micro-batches' forwards, then their backwards in the same order (as a pipeline schedule runs
    them), first plainly and then with every layer offloaded, in one process and on one model: the same
    kernels both times (a second process could autotune fla's kernels differently, and in fp32 they
    multiply in TF32). Returns the summed losses and gradients of both runs and the offload's fetches."""
    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.layers.activation_offload import OffloadStats, enable_activation_offload
    from qwen3_next_mcore.model import build_model

    parallel.initialize(seed=7)
    model = build_model(get_preset("tiny", vocab_size=256, mtp_num_layers=0)).to(device)

    def run():
        g = torch.Generator().manual_seed(1)
        model.zero_grad(set_to_none=True)
        losses = []
        for _ in range(2):
            ids = torch.randint(0, 256, (2, 40), generator=g).to(device)
            pos = torch.arange(40, device=device).expand(2, 40)
            losses.append(model(ids, pos, None, labels=torch.roll(ids, -1, 1)).float().mean())
        for loss in losses:
            loss.backward()
        grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
        return [float(x) for x in losses], grads

    plain = run()
    stats = OffloadStats()
    enable_activation_offload(model, 4, min_bytes=0, stats=stats)
    offloaded = run()
    parallel.destroy()
    return plain, offloaded, stats.fetches


def _check_two_in_flight(device: str, exact: bool):
    (base_losses, base), (losses, grads), fetches = run_distributed(_two_in_flight, 1, args=(device,))[0]
    assert losses == base_losses if exact else losses == pytest.approx(base_losses, rel=1e-6)
    assert grads.keys() == base.keys() and len(grads) > 20
    for n in grads:
        if exact:
            assert torch.equal(grads[n], base[n]), n
        else:  # GPU kernels with atomics (the GDN and grouped-GEMM backwards) are not bitwise reproducible
            torch.testing.assert_close(grads[n], base[n], rtol=1e-5, atol=1e-6, msg=n)
    # each micro-batch's backward fetched its own layers: one demand and seven prefetches each
    assert [why for _, why in fetches] == (["demand"] + ["prefetch"] * 7) * 2, fetches


def test_offload_with_two_micro_batches_in_flight():
    _check_two_in_flight("cpu", exact=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_on_cuda_side_stream_gives_the_plain_gradients():
    _check_two_in_flight("cuda", exact=False)
