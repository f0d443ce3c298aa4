import json

import pytest
import torch

from qwen3_next_mcore.data import IGNORE_INDEX, RawSFTDataset, build_sft_dataset

IM_END = 151645


@pytest.fixture(scope="module")
def alpaca_items(alpaca_path, tok_instruct):
    """alpaca_zh_demo.json, one row per item, long enough that nothing is truncated."""
    return build_sft_dataset(alpaca_path, tok_instruct, 2048)


def _reply_text(tok, item):
    return tok.decode(item["labels"][item["loss_mask"] > 0])


def _user(row):
    return row["instruction"] + ("\n" + row["input"] if row["input"] else "")


def test_loss_is_exactly_each_reply_and_im_end(alpaca_items, alpaca_rows, tok_instruct):
    ds = alpaca_items
    assert len(ds) == 1000 and ds.stats.truncated == ds.stats.dropped == 0
    for row, item in zip(alpaca_rows, (ds[i] for i in range(len(ds)))):
        assert _reply_text(tok_instruct, item) == row["output"] + "<|im_end|>"
        n = int(item["cu_seqlens"][1])
        messages = [{"role": "user", "content": _user(row)}, {"role": "assistant", "content": row["output"]}]
        # the tokens decode to exactly the chat template's rendering, then padding
        assert tok_instruct.decode(item["tokens"][:n]) == tok_instruct.apply_chat_template(
            messages, tokenize=False
        )
        assert (item["tokens"][n:] == 151643).all() and (item["labels"][n:] == IGNORE_INDEX).all()
        assert item["loss_mask"][n:].sum() == 0
        # targets are the next tokens; the prompt through "<|im_start|>assistant\n" is never a target
        m = item["loss_mask"] > 0
        assert torch.equal(item["labels"][:-1][m[:-1]], item["tokens"][1:][m[:-1]])
        first = int(m.nonzero()[0])
        prompt = tok_instruct.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        assert tok_instruct.decode(item["tokens"][: first + 1]) == prompt
        assert item["labels"][int(m.nonzero()[-1])] == IM_END
        assert torch.equal(item["position_ids"][:n], torch.arange(n))


def test_item_fields(alpaca_items):
    item = alpaca_items[0]
    assert {
        k: v.dtype for k, v in item.items() if k in ("tokens", "labels", "loss_mask", "position_ids")
    } == {
        "tokens": torch.int64,
        "labels": torch.int64,
        "loss_mask": torch.float32,
        "position_ids": torch.int64,
    }
    assert all(item[k].shape == (2048,) for k in ("tokens", "labels", "loss_mask", "position_ids"))


def test_qwen3_hybrid_template(alpaca_path, alpaca_rows, tok):
    # the folder's own Qwen3 template: the reply the model must produce starts with an empty think block
    ds = RawSFTDataset(alpaca_path, tok, 2048)
    assert _reply_text(tok, ds[0]) == "<think>\n\n</think>\n\n" + alpaca_rows[0]["output"] + "<|im_end|>"
    # with enable_thinking=False the template puts the think block in the prompt
    ds = RawSFTDataset(alpaca_path, tok, 2048, template_kwargs={"enable_thinking": False})
    assert _reply_text(tok, ds[5]) == alpaca_rows[5]["output"] + "<|im_end|>"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_multi_turn_chat_and_system(tmp_path, tok_instruct, tok):
    chat = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6, obviously."},
        ]
    }
    alpaca = {"system": "Be kind.", "query": "Name a colour.", "response": "Blue."}
    path = _write_jsonl(tmp_path / "chat.jsonl", [chat, alpaca])
    ds = build_sft_dataset(path, tok_instruct, 128)
    assert _reply_text(tok_instruct, ds[0]) == "4<|im_end|>6, obviously.<|im_end|>"
    assert _reply_text(tok_instruct, ds[1]) == "Blue.<|im_end|>"
    text = tok_instruct.decode(ds[1]["tokens"][: int(ds[1]["cu_seqlens"][1])])
    assert text.startswith(
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>"
    )
    # Qwen3's thinking template rewrites earlier assistant turns: not prefix-stable, so refused
    with pytest.raises(
        ValueError, match=r"chat\.jsonl:1 \(row 1\): the chat template is not prefix-stable at message 3"
    ):
        build_sft_dataset(path, tok, 128)


def _lengths(ds):
    return [len(t) for t, _ in ds.samples]


def test_overflow_truncate(alpaca_path, alpaca_items, tok_instruct):
    full = alpaca_items.samples
    ds = build_sft_dataset(alpaca_path, tok_instruct, 64, overflow="truncate")
    long_rows = [i for i, (t, _) in enumerate(full) if len(t) > 64]
    no_target = [i for i in long_rows if (full[i][1][:63] == IGNORE_INDEX).all()]
    assert ds.num_truncated == len(long_rows) - len(no_target) and ds.num_dropped == len(no_target)
    assert ds.num_truncated > 500  # most rows are longer than 64 tokens
    assert len(ds) == 1000 - len(no_target)
    kept = [i for i in range(1000) if i not in set(no_target)]
    i = next(k for k, r in enumerate(kept) if r in long_rows)
    item, (t, lab) = ds[i], full[kept[i]]
    assert torch.equal(item["tokens"], torch.from_numpy(t[:64]))
    assert torch.equal(item["labels"][:63], torch.from_numpy(lab[:63])) and item["labels"][63] == IGNORE_INDEX


def test_overflow_drop_and_error(alpaca_path, alpaca_items, tok_instruct):
    n_long = sum(len(t) > 256 for t, _ in alpaca_items.samples)
    ds = build_sft_dataset(alpaca_path, tok_instruct, 256, overflow="drop")
    assert n_long > 0 and ds.num_dropped == n_long and ds.num_truncated == 0 and len(ds) == 1000 - n_long
    first_long = next(i for i, (t, _) in enumerate(alpaca_items.samples) if len(t) > 256)
    with pytest.raises(ValueError, match=rf"\(row {first_long + 1}\): \d+ tokens exceed seq_length 256"):
        build_sft_dataset(alpaca_path, tok_instruct, 256, overflow="error")
    with pytest.raises(ValueError, match="overflow must be one of"):
        build_sft_dataset(alpaca_path, tok_instruct, 256, overflow="cut")


def test_packed_raw_dataset(alpaca_path, alpaca_items, tok_instruct):
    ds = build_sft_dataset(alpaca_path, tok_instruct, 1024, packing=True)
    assert len(ds) < 200 and ds.stats.sequences == len(ds)
    seen = []
    for i in range(len(ds)):
        item = ds[i]
        cu = item["cu_seqlens"][: int(item["cu_seqlens_len"])].tolist()
        assert cu[0] == 0 and cu[-1] == 1024
        for s, e in zip(cu[:-1], cu[1:]):
            assert torch.equal(item["position_ids"][s:e], torch.arange(e - s))
            assert item["labels"][e - 1] == IGNORE_INDEX  # no target across the boundary
            m = item["loss_mask"][s : e - 1] > 0
            assert torch.equal(item["labels"][s : e - 1][m], item["tokens"][s + 1 : e][m])
        for s, e in zip(cu[: int(item["num_seqs"])], cu[1 : int(item["num_seqs"]) + 1]):
            seen.append(tuple(item["tokens"][s:e].tolist()))
    # every row appears exactly once across the packed items
    assert sorted(seen) == sorted(tuple(t.tolist()) for t, _ in alpaca_items.samples)
