import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from qwen3_next_mcore.data import IGNORE_INDEX, build_sft_dataset, preprocess_sft

IG = IGNORE_INDEX


def _assert_same_items(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (i, k)


@pytest.mark.parametrize("packing,seq_length", [(False, 512), (True, 1024)])
def test_idxmap_and_raw_give_identical_items(tmp_path, alpaca_path, tok_instruct, packing, seq_length):
    report = preprocess_sft(
        alpaca_path, tmp_path / "sft", seq_length=seq_length, tokenizer=tok_instruct, packing=packing
    )
    raw = build_sft_dataset(alpaca_path, tok_instruct, seq_length, packing=packing, loss_average="sample")
    idx = build_sft_dataset(tmp_path / "sft", tok_instruct, seq_length, loss_average="sample")
    assert report.prefix == str(tmp_path / "sft_text_document")
    assert report.stats == raw.stats and report.stats.sequences == len(idx)
    _assert_same_items(raw, idx)


def test_record_layout_on_disk(tmp_path, alpaca_path, tok_instruct):
    L = 1024
    report = preprocess_sft(alpaca_path, tmp_path / "p", seq_length=L, tokenizer=tok_instruct, packing=True)
    raw = build_sft_dataset(alpaca_path, tok_instruct, L, packing=True)
    data = IndexedDataset(report.prefix)
    assert data.index.dtype == np.int32 and (data.sequence_lengths == 2 * L).all()
    for i in (0, len(data) - 1):
        record, item = data[i].astype(np.int64), raw[i]
        inputs, labels = record[:L], record[L:]
        cu = item["cu_seqlens"][: int(item["cu_seqlens_len"])].tolist()
        ends = [e - 1 for e in cu[1 : int(item["num_seqs"]) + 1]]
        # the last token t of every sample is stored as -1 - t; nothing else is negative
        assert np.flatnonzero(inputs < 0).tolist() == ends
        assert (-1 - inputs[ends] == item["tokens"].numpy()[ends]).all()
        assert np.array_equal(labels, item["labels"].numpy())


def _pai_records(rows, tok, seq_length, pad):
    """Records as Pai-Megatron-Patch's build_idxmap_sft_dataset.py lays them out (sequence packing on).

    Written here from the documented format, independently of our writer: user = instruction + input,
    the prompt rendered without the generation prompt, labels [-100] * (len(prompt) - 1) + the rest + [-100],
    the last token of each sample stored as -1 - t; padding with ``pad`` and -100.
    """

    def ids(messages):
        return tok.encode(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)

    records, samples, doc, lab = [], [], [], []
    for row in rows:
        text = [
            {"role": "user", "content": row["instruction"] + row["input"]},
            {"role": "assistant", "content": row["output"]},
        ]
        prompt, full = ids(text[:1]), ids(text)
        assert full[: len(prompt)] == prompt
        y = [IG] * (len(prompt) - 1) + full[len(prompt) :] + [IG]
        marked = full[:-1] + [-1 - full[-1]]
        if len(doc) + len(full) > seq_length:
            records.append(doc + [pad] * (seq_length - len(doc)) + lab + [IG] * (seq_length - len(lab)))
            doc, lab = [], []
        doc, lab = doc + marked, lab + y
        samples.append((full, y))
    records.append(doc + [pad] * (seq_length - len(doc)) + lab + [IG] * (seq_length - len(lab)))
    return records, samples


def test_loads_a_hand_built_pai_idxmap(tmp_path, alpaca_rows, tok_instruct):
    L, pad = 512, 151669  # Pai's Qwen2Tokenizer pads with the added <|extra_0|>
    records, samples = _pai_records(alpaca_rows[:12], tok_instruct, L, pad)
    prefix = str(tmp_path / "mmap_qwen3_sft_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for r in records:
        builder.add_document(np.array(r), [2 * L])
    builder.finalize(prefix + ".idx")

    ds = build_sft_dataset(prefix, tok_instruct, L)  # the prefix as Pai's training script takes it
    assert len(ds) == len(records) >= 3
    got = []
    for i in range(len(ds)):
        item = ds[i]
        n = int(item["num_seqs"])
        cu = item["cu_seqlens"][: int(item["cu_seqlens_len"])].tolist()
        for s, e in zip(cu[:n], cu[1 : n + 1]):
            got.append((item["tokens"][s:e].tolist(), item["labels"][s:e].tolist()))
            assert torch.equal(item["position_ids"][s:e], torch.arange(e - s))
        # padding: re-written with our pad id, never trained
        assert (item["tokens"][cu[n] :] == 151643).all() and item["loss_mask"][cu[n] :].sum() == 0
        assert torch.equal(item["loss_mask"], (torch.tensor(records[i][L:]) != IG).float())
    assert got == samples
    # Pai trains the generation prefix "<|im_start|>assistant\n" and the "\n" after <|im_end|>: kept
    first_target = next(t for t in samples[0][1] if t != IG)
    assert first_target == 151644
    # the same file through the --output-prefix form of the name
    assert len(build_sft_dataset(str(tmp_path / "mmap_qwen3_sft"), tok_instruct, L)) == len(records)


def _pai_position_ids(inputs):
    """Pai's reader: positions restart after every negative (boundary) token."""
    pos, p = [], 0
    for t in inputs:
        pos.append(p)
        p = 0 if t < 0 else p + 1
    return pos


def test_our_records_follow_pai_reader_semantics(tmp_path, alpaca_path, tok_instruct):
    L = 1024
    report = preprocess_sft(alpaca_path, tmp_path / "p", seq_length=L, tokenizer=tok_instruct, packing=True)
    data, ours = IndexedDataset(report.prefix), build_sft_dataset(report.prefix, tok_instruct, L)
    for i in range(0, len(data), 17):
        record, item = data[i].astype(np.int64), ours[i]
        assert item["position_ids"].tolist() == _pai_position_ids(record[:L])
        restored = np.where(record[:L] < 0, -1 - record[:L], record[:L])
        assert item["tokens"].tolist() == restored.tolist()
        assert torch.equal(item["loss_mask"], torch.from_numpy((record[L:] != IG).astype(np.float32)))


def test_wrong_seq_length_and_not_an_idxmap(tmp_path, alpaca_path, tok_instruct, c4_subset):
    report = preprocess_sft(alpaca_path, tmp_path / "s", seq_length=256, tokenizer=tok_instruct)
    with pytest.raises(
        ValueError, match=r"record 0 has 512 values, expected 2 \* seq_length = 1024 .*seq_length 256"
    ):
        build_sft_dataset(report.prefix, tok_instruct, 512)
    from qwen3_next_mcore.data import preprocess_pretrain

    pre = preprocess_pretrain(c4_subset, tmp_path / "c4", tokenizer=tok_instruct, workers=1, progress=False)
    with pytest.raises(ValueError, match="expected 2 \\* seq_length"):
        build_sft_dataset(pre.prefix, tok_instruct, 256)
