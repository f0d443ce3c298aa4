"""The random HF checkpoint helper never leaves a folder that looks complete after a failure."""

from __future__ import annotations

import pytest
import torch

from qwen3_next_mcore.config import get_preset
from qwen3_next_mcore.testing import tiny_hf


def test_failure_midway_leaves_no_config_json(tmp_path, monkeypatch):
    cfg = get_preset("tiny", vocab_size=64)
    target = tmp_path / "hf"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_hf, "mtp_tensors", boom)  # fails after save_pretrained wrote its files
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_hf.make_hf_checkpoint(cfg, target)
    assert not (target / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] in ([], ["hf"])  # no temporary folder left either
    monkeypatch.undo()
    tiny_hf.make_hf_checkpoint(cfg, target)
    names = {p.name for p in target.iterdir()}
    assert "config.json" in names and "model.safetensors" in names
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_cpu_reference_runs_transformers_torch_functions(monkeypatch):
    """Where fla is installed, transformers binds its GDN functions to fla's Triton kernels at import; a CPU
    reference must still run transformers' torch functions (stand-in: a wrapper that refuses CPU tensors)."""
    import functools

    from transformers.models.qwen3_next import modeling_qwen3_next as m

    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.testing.tiny_hf import HFMTPReference, hf_model, transformers_torch_kernels

    real = m.torch_chunk_gated_delta_rule

    @functools.wraps(real)
    def gpu_only(*args, **kwargs):
        raise ValueError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)")

    monkeypatch.setattr(m, "torch_chunk_gated_delta_rule", gpu_only)
    ref = HFMTPReference(hf_model(get_preset("tiny"), seed=3), {})
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="Triton"):
        ref.hf(input_ids=ids)
    logits, _ = ref(ids)
    assert logits.shape[:2] == (1, 12) and torch.isfinite(logits).all()
    assert m.torch_chunk_gated_delta_rule is gpu_only  # restored
    with transformers_torch_kernels(torch.device("meta")):
        assert m.torch_chunk_gated_delta_rule is gpu_only  # only CPU tensors are rerouted
