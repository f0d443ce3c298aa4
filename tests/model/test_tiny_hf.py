"""The random HF checkpoint helper never leaves a folder that looks complete after a failure."""

from __future__ import annotations

import pytest

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
