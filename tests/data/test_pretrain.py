import json
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from qwen3_next_mcore.data import pretrain
from qwen3_next_mcore.data.pretrain import preprocess_pretrain, token_dtype


def _read(prefix):
    ds = IndexedDataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]


def test_ids_equal_the_tokenizer_ids_plus_eod(tmp_path, tok, tokenizer_dir, c4_subset, c4_texts):
    report = preprocess_pretrain(
        c4_subset, tmp_path / "c4", tokenizer=tokenizer_dir, append_eod=True, workers=2, progress=False
    )
    expected = [tok(t)["input_ids"] + [151645] for t in c4_texts[:60]]
    ds, docs = _read(report.prefix)
    assert report.prefix == str(tmp_path / "c4_text_document")
    assert docs == expected
    assert ds.index.dtype == np.int32 and report.dtype == "int32"
    assert ds.document_indices.tolist() == list(range(61))  # one sequence per document
    assert (report.documents, report.tokens, report.empty_skipped) == (60, sum(map(len, expected)), 0)


def test_without_eod_workers_and_chunks_agree(tmp_path, tok, c4_subset, c4_texts, monkeypatch):
    monkeypatch.setattr(pretrain, "CHUNK_LINES", 7)  # many chunks, results must come back in order
    one = preprocess_pretrain(c4_subset, tmp_path / "one", tokenizer=tok, workers=1, progress=False)
    two = preprocess_pretrain(c4_subset, tmp_path / "two", tokenizer=tok, workers=2, progress=False)
    _, docs = _read(one.prefix)
    assert docs == [tok(t)["input_ids"] for t in c4_texts[:60]]
    for ext in (".bin", ".idx"):
        assert Path(one.prefix + ext).read_bytes() == Path(two.prefix + ext).read_bytes()


def test_several_inputs_in_order_and_empty_documents(tmp_path, tok, c4_texts):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"body": c4_texts[0]}) + "\n\n" + json.dumps({"body": ""}) + "\n")
    b.write_text(json.dumps({"body": c4_texts[1], "other": 1}) + "\n")
    report = preprocess_pretrain(
        [a, b], tmp_path / "out", tokenizer=tok, json_key="body", workers=2, progress=False
    )
    _, docs = _read(report.prefix)
    assert report.prefix.endswith("out_body_document")
    assert docs == [tok(c4_texts[0])["input_ids"], tok(c4_texts[1])["input_ids"]]
    assert (report.documents, report.empty_skipped) == (2, 1)


def test_dtype_rule_matches_megatron_lm():
    assert token_dtype(151669) == np.int32
    assert token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32


def test_eod_token_option(tmp_path, tok, c4_subset, c4_texts):
    report = preprocess_pretrain(
        c4_subset,
        tmp_path / "e",
        tokenizer=tok,
        append_eod=True,
        eod_token="<|endoftext|>",
        workers=1,
        progress=False,
    )
    _, docs = _read(report.prefix)
    assert docs[3] == tok(c4_texts[3])["input_ids"] + [151643]
    with pytest.raises(ValueError, match="not a single token"):
        preprocess_pretrain(c4_subset, tmp_path / "f", tokenizer=tok, append_eod=True, eod_token="two words")
