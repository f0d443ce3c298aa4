"""Fixtures of the conversion tests: one tiny random HF checkpoint (with MTP) and its conversion."""

from __future__ import annotations

import pytest
from convert_helpers import tiny_config

from qwen3_next_mcore.testing.tiny_hf import make_hf_checkpoint


@pytest.fixture(scope="session")
def tiny():
    """(config, HF folder (sharded, with an index), the transformers model, its mcore conversion)."""
    import tempfile
    from pathlib import Path

    from qwen3_next_mcore.convert import convert_hf_to_mcore

    cfg = tiny_config()
    root = Path(tempfile.mkdtemp(prefix="convert-tests-"))
    hf = make_hf_checkpoint(cfg, root / "hf", seed=3, max_shard_size="300KB")
    # small buckets: many data files, and chunks of one tensor kind spread over several of them
    convert_hf_to_mcore(root / "hf", root / "mcore", bucket_size="64KB", progress=False)
    yield cfg, root / "hf", hf, root / "mcore"
    import shutil

    shutil.rmtree(root, ignore_errors=True)
