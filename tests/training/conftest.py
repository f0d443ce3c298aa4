"""Session fixtures of the training tests (see helpers.py)."""

from __future__ import annotations

import pytest

from .helpers import make_model_config, make_pretrain_data, make_tokenizer


@pytest.fixture(scope="session")
def small_assets(shared_data, tmp_path_factory):
    """{'tokenizer', 'model_config', 'data'} paths: a 1,024-id tokenizer, the tiny model at that
    vocabulary, and c4_demo as a pretraining .bin/.idx prefix."""
    root = tmp_path_factory.mktemp("train_assets")
    tok = make_tokenizer(shared_data, root / "tokenizer")
    return {"tokenizer": tok, "model_config": make_model_config(root / "model"),
            "data": make_pretrain_data(shared_data, tok, root / "c4")}
