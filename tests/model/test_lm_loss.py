"""The model's language-model loss (``Qwen3NextModel.compute_language_model_loss``: ops/cross_entropy.py)
against megatron-core's own ``LanguageModule.compute_language_model_loss`` (its unfused vocab-parallel
cross-entropy) on the same logits and labels: loss and logits gradient, one rank and the vocabulary split
over two tensor-parallel ranks; and a training step's LM and MTP losses go through it."""

from __future__ import annotations

import torch

from qwen3_next_mcore.testing.distributed import run_distributed


def _losses(rank, tp):
    from megatron.core.models.common.language_module.language_module import LanguageModule

    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.model import build_model
    from qwen3_next_mcore.model.language_model import Qwen3NextModel

    parallel.initialize(tensor_parallel=tp)
    model = build_model(get_preset("tiny", vocab_size=512))
    assert isinstance(model, Qwen3NextModel) and not model.config.cross_entropy_loss_fusion
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 2, 512, generator=g) * 3
    labels = torch.randint(0, 512, (2, 24), generator=g)
    dloss = torch.rand(2, 24, generator=g)
    part = 512 // tp
    logits = logits[..., rank * part:(rank + 1) * part]
    out = {}
    for name, fn in (("ours", model.compute_language_model_loss),
                     ("megatron", lambda lab, x: LanguageModule.compute_language_model_loss(model, lab, x))):
        x = logits.clone().requires_grad_()
        loss = fn(labels, x)
        (loss * dloss).sum().backward()
        out[name] = (loss.detach(), x.grad)
    parallel.destroy()
    return out


def test_model_loss_equals_megatron_core_cross_entropy():
    for tp in (1, 2):
        for out in run_distributed(_losses, tp, args=(tp,)):
            (loss, grad), (ref, ref_grad) = out["ours"], out["megatron"]
            assert loss.shape == (2, 24) and loss.dtype == torch.float32
            torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)


def _step_calls(rank):
    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.model import build_model
    from qwen3_next_mcore.ops import cross_entropy
    from qwen3_next_mcore.training import forward_backward

    parallel.initialize(seed=3)
    model = build_model(get_preset("tiny", vocab_size=256))  # one MTP layer
    calls = []
    original = cross_entropy._VocabParallelCrossEntropy.apply
    cross_entropy._VocabParallelCrossEntropy.apply = lambda *a: calls.append(a[0].shape) or original(*a)
    try:
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        forward_backward(model, [{"tokens": ids, "labels": torch.roll(ids, -1, 1), "loss_mask": torch.ones(2, 16)}])
    finally:
        cross_entropy._VocabParallelCrossEntropy.apply = original
    parallel.destroy()
    return calls


def test_lm_and_mtp_losses_go_through_it():
    calls = run_distributed(_step_calls, 1)[0]
    assert calls == [torch.Size([16, 2, 256])] * 2, calls  # the MTP depth's loss, then the LM loss
