"""Bad input: every case raises a ValueError that names the problem and leaves no output file behind."""

import json

import pytest

from qwen3_next_mcore.data import build_sft_dataset, preprocess_pretrain, preprocess_sft, pretrain

from .helpers import files_in


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def _lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pre(inp, out, tok, **kw):
    return preprocess_pretrain(inp, out / "p", tokenizer=tok, progress=False, **kw)


def _sft(inp, out, tok, **kw):
    kw.setdefault("seq_length", 128)
    return preprocess_sft(inp, out / "s", tokenizer=tok, **kw)


def test_pretrain_malformed_json_names_file_and_line(tmp_path, out, tok):
    inp = _lines(tmp_path / "in.jsonl", ['{"text": "a"}', '{"text": "b"}', '{"text": "c"', '{"text": "d"}'])
    with pytest.raises(ValueError, match=r"in\.jsonl:3: malformed JSON"):
        _pre(inp, out, tok, workers=2)
    assert files_in(out) == []


def test_pretrain_missing_key_and_wrong_type(tmp_path, out, tok):
    inp = _lines(tmp_path / "in.jsonl", ['{"text": "a"}', '{"content": "b"}'])
    with pytest.raises(
        ValueError, match=r"in\.jsonl:2: missing key 'text' \(the row has keys \['content'\]\)"
    ):
        _pre(inp, out, tok, workers=1)
    inp = _lines(tmp_path / "in2.jsonl", ['{"text": ["a"]}'])
    with pytest.raises(ValueError, match=r"in2\.jsonl:1: key 'text' must hold a string, got list"):
        _pre(inp, out, tok, workers=1)
    assert files_in(out) == []


def test_pretrain_empty_input_and_missing_file(tmp_path, out, tok):
    inp = _lines(tmp_path / "empty.jsonl", ["", '{"text": ""}'])
    with pytest.raises(ValueError, match="no non-empty 'text' documents in .*empty.jsonl"):
        _pre(inp, out, tok, workers=1)
    with pytest.raises(ValueError, match="input file .*missing.jsonl does not exist"):
        _pre(tmp_path / "missing.jsonl", out, tok)
    assert files_in(out) == []


def test_pretrain_error_in_a_late_chunk_leaves_old_outputs_untouched(
    tmp_path, out, tok, c4_subset, monkeypatch
):
    good = _pre(c4_subset, out, tok, workers=2)
    before = {n: (out / n).read_bytes() for n in files_in(out)}
    assert sorted(before) == ["p_text_document.bin", "p_text_document.idx"]
    monkeypatch.setattr(pretrain, "CHUNK_LINES", 8)
    lines = c4_subset.read_text().splitlines()
    bad = _lines(tmp_path / "bad.jsonl", lines + ["not json"])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:{len(lines) + 1}: malformed JSON"):
        _pre(bad, out, tok, workers=2)
    # no temporary file left, and the earlier complete pair is unchanged
    assert {n: (out / n).read_bytes() for n in files_in(out)} == before
    assert good.documents == 60


def test_wrong_tokenizer_path_and_vocab_mismatch(tmp_path, out, tok, c4_subset, alpaca_path):
    with pytest.raises(ValueError, match=f"tokenizer folder {tmp_path / 'nope'} does not exist"):
        _pre(c4_subset, out, tmp_path / "nope")
    with pytest.raises(ValueError, match=f"tokenizer folder {tmp_path / 'nope'} does not exist"):
        _sft(alpaca_path, out, tmp_path / "nope")
    with pytest.raises(ValueError, match="151669 token ids .* vocab_size is 32000"):
        _pre(c4_subset, out, tok, vocab_size=32000)
    with pytest.raises(ValueError, match="151669 token ids .* vocab_size is 151000"):
        _sft(alpaca_path, out, tok, vocab_size=151000)
    assert files_in(out) == []


def test_sft_malformed_json_array_names_line(tmp_path, out, tok_instruct):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(ValueError, match=r"bad\.json:3: malformed JSON \(column 23\): Expecting ','"):
        _sft(path, out, tok_instruct)
    path.write_text('[{"instruction": "a", "output": "b"}] extra')
    with pytest.raises(ValueError, match=r"bad\.json:1: malformed JSON: extra data"):
        _sft(path, out, tok_instruct)
    jsonl = _lines(tmp_path / "bad.jsonl", ['{"instruction": "a", "output": "b"}', "{oops}"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        _sft(jsonl, out, tok_instruct)
    assert files_in(out) == []


def test_sft_missing_keys_name_row_and_line(tmp_path, out, tok_instruct):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "answer": "e"}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=1))
    with pytest.raises(
        ValueError,
        match=r"rows\.json:6 \(row 2\): missing key 'output' or 'content' or "
        r"'response' \(or a 'messages' list\); the row has keys "
        r"\['answer', 'input', 'instruction'\]",
    ):
        _sft(path, out, tok_instruct)
    path = _lines(tmp_path / "rows.jsonl", ['{"output": "x"}'])
    with pytest.raises(ValueError, match=r"rows\.jsonl:1 \(row 1\): missing key 'instruction' or 'query'"):
        build_sft_dataset(path, tok_instruct, 64)
    assert files_in(out) == []


@pytest.mark.parametrize(
    "messages,match",
    [
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        ([{"role": "bot", "content": "hi"}], "message 1 has role 'bot'"),
        ([{"role": "user"}], "message 1 must be an object with keys 'role' and 'content'"),
        ([{"role": "assistant", "content": "x"}], "the conversation starts with an assistant message"),
        ([], "'messages' must be a non-empty list"),
    ],
)
def test_sft_bad_chat_rows(tmp_path, tok_instruct, messages, match):
    path = _lines(
        tmp_path / "chat.jsonl", ['{"instruction": "a", "output": "b"}', json.dumps({"messages": messages})]
    )
    with pytest.raises(ValueError, match=rf"chat\.jsonl:2 \(row 2\): {match}"):
        build_sft_dataset(path, tok_instruct, 64)


def test_sft_empty_input_and_bad_paths(tmp_path, out, tok_instruct):
    for name, text in (("empty.json", "[]"), ("empty.jsonl", "\n\n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"{name}: no rows \(empty input\)"):
            _sft(path, out, tok_instruct)
    with pytest.raises(ValueError, match="neither a JSON/JSONL file nor an idxmap prefix"):
        build_sft_dataset(tmp_path / "nothing", tok_instruct, 64)
    assert files_in(out) == []


def test_sft_everything_dropped(tmp_path, out, tok_instruct, alpaca_path):
    with pytest.raises(ValueError, match="no rows left to train on after overflow='drop'"):
        _sft(alpaca_path, out, tok_instruct, seq_length=8, overflow="drop")
    assert files_in(out) == []
