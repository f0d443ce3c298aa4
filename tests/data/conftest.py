"""Fixtures for the data tests: tokenizers and small real inputs from the shared data folder."""

from __future__ import annotations

import json

import pytest

from qwen3_next_mcore.data import load_tokenizer


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    """The shared Qwen3 tokenizer with its own (Qwen3 hybrid-thinking) chat template."""
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tok_instruct(tokenizer_dir):
    """The shared Qwen3 tokenizer with the shipped Qwen3-Next instruct template."""
    return load_tokenizer(tokenizer_dir, chat_template="qwen3_next_instruct")


@pytest.fixture(scope="session")
def c4_path(shared_data):
    return shared_data / "text" / "c4_demo.jsonl"


@pytest.fixture(scope="session")
def c4_texts(c4_path):
    return [json.loads(line)["text"] for line in c4_path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def c4_subset(tmp_path_factory, c4_path):
    """The first 60 documents of c4_demo.jsonl."""
    path = tmp_path_factory.mktemp("c4") / "c4_60.jsonl"
    path.write_text(
        "".join(c4_path.read_text(encoding="utf-8").splitlines(keepends=True)[:60]), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="session")
def alpaca_path(shared_data):
    return shared_data / "text" / "alpaca_zh_demo.json"


@pytest.fixture(scope="session")
def alpaca_rows(alpaca_path):
    return json.loads(alpaca_path.read_text(encoding="utf-8"))
