import numpy as np
import pytest
import torch

from qwen3_next_mcore.data import build_pretrain_datasets, parse_blend, preprocess_pretrain
from qwen3_next_mcore.data.gpt_datasets import num_samples_per_split
from qwen3_next_mcore.testing.distributed import run_distributed


@pytest.fixture(scope="module")
def c4_prefixes(tmp_path_factory, tokenizer_dir, c4_subset):
    """The 60-document subset with EOD (prefix a) and without (prefix b)."""
    out = tmp_path_factory.mktemp("gpt")
    a = preprocess_pretrain(
        c4_subset, out / "a", tokenizer=tokenizer_dir, append_eod=True, workers=1, progress=False
    )
    b = preprocess_pretrain(c4_subset, out / "b", tokenizer=tokenizer_dir, workers=1, progress=False)
    return a.prefix, b.prefix, out


def _doc_lengths(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)  # keep it alive: sequence_lengths is a view of its memory map
    return ds.sequence_lengths.astype(np.int64)


def test_sizes_like_megatron_lm():
    # 100 iters, eval every 30 for 5 iters: evaluations at 30, 60, 90 and at the end
    assert num_samples_per_split(8, 100, 5, 30) == [800, 4 * 5 * 8, 40]
    with pytest.raises(ValueError, match="train_iters"):
        num_samples_per_split(8, 0, 5, 30)


def test_split_samples_and_lengths(c4_prefixes, tokenizer_dir):
    prefix, _, out = c4_prefixes
    train, valid, test = build_pretrain_datasets(
        prefix,
        tokenizer=tokenizer_dir,
        seq_length=64,
        global_batch_size=4,
        train_iters=5,
        eval_iters=1,
        split="90,10,0",
        path_to_cache=out / "cache",
    )
    assert test is None
    lengths = _doc_lengths(prefix)
    # one epoch of each split covers the requested samples; GPTDataset reads seq_length + 1 tokens per sample
    assert len(train) == (lengths[:54].sum() - 1) // 64
    assert len(valid) == (lengths[54:].sum() - 1) // 64
    stream = set(_tokens_of(prefix).tolist())
    for i in (0, 7, len(train) - 1):
        s = train[i]
        assert s["tokens"].shape == (64,) and s["tokens"].dtype == torch.int64
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])
        assert torch.equal(s["position_ids"], torch.arange(64))
        assert s["loss_mask"].sum() == 64
        assert set(s["tokens"].tolist()) <= stream


def _tokens_of(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return np.concatenate([ds[i] for i in range(len(ds))])


def test_reset_position_ids_and_eod_mask(c4_prefixes, tokenizer_dir):
    prefix, _, out = c4_prefixes
    train = build_pretrain_datasets(
        prefix,
        tokenizer=tokenizer_dir,
        seq_length=1024,
        global_batch_size=1,
        train_iters=2,
        split="100,0,0",
        reset_position_ids=True,
        eod_mask_loss=True,
        path_to_cache=out / "cache",
    ).train
    found = 0
    for i in range(len(train)):
        s = train[i]
        eods = (s["tokens"] == 151645).nonzero().flatten().tolist()
        for e in eods:
            assert s["loss_mask"][e] == 0
            if e + 1 < 1024:
                assert s["position_ids"][e + 1] == 0
                found += 1
    assert found > 10


def test_weighted_blend(c4_prefixes, tokenizer_dir):
    a, b, out = c4_prefixes
    assert parse_blend(["0.3", a, "0.7", b]) == ([a, b], [0.3, 0.7])
    assert parse_blend(f"0.3 {a[: -len('_text_document')]} 0.7 {b}") == ([a, b], [0.3, 0.7])
    train = build_pretrain_datasets(
        ["0.3", a, "0.7", b],
        tokenizer=tokenizer_dir,
        seq_length=64,
        global_batch_size=4,
        train_iters=5,
        split="100,0,0",
        path_to_cache=out / "cache",
    ).train
    assert len(train) == 20
    # 30 % of the 20 samples come from the first dataset (ceil(20*0.3)=6, ceil(20*0.7)=14)
    assert np.bincount(train.dataset_index, minlength=2).tolist() == [6, 14]


def test_separate_valid_path(c4_prefixes, tokenizer_dir):
    a, b, out = c4_prefixes
    train, valid, test = build_pretrain_datasets(
        a,
        valid_data_path=b,
        tokenizer=tokenizer_dir,
        seq_length=64,
        global_batch_size=2,
        train_iters=3,
        eval_iters=1,
        path_to_cache=out / "cache",
    )
    assert test is None
    assert len(train) == (_doc_lengths(a).sum() - 1) // 64
    assert len(valid) == (_doc_lengths(b).sum() - 1) // 64
    assert (valid[0]["tokens"] == 151645).sum() == 0  # b has no EOD


def test_bad_blend_paths(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="no dataset at prefix"):
        build_pretrain_datasets(
            str(tmp_path / "missing"),
            tokenizer=tokenizer_dir,
            seq_length=8,
            global_batch_size=1,
            train_iters=1,
        )


def _build_on_rank(rank, prefix, cache, tokenizer_dir, tp):
    from qwen3_next_mcore import parallel

    parallel.initialize(tensor_parallel=tp)
    train, valid, _ = build_pretrain_datasets(
        prefix,
        tokenizer=tokenizer_dir,
        seq_length=64,
        global_batch_size=2,
        train_iters=4,
        eval_iters=1,
        split="90,10,0",
        path_to_cache=cache,
    )
    return None if train is None else (len(train), train[3]["tokens"].tolist(), len(valid))


def test_distributed_builds_on_rank_zero_first(c4_prefixes, tokenizer_dir, tmp_path):
    prefix = c4_prefixes[0]
    single = build_pretrain_datasets(
        prefix,
        tokenizer=tokenizer_dir,
        seq_length=64,
        global_batch_size=2,
        train_iters=4,
        eval_iters=1,
        split="90,10,0",
        path_to_cache=tmp_path / "c1",
    )
    expected = (len(single.train), single.train[3]["tokens"].tolist(), len(single.valid))
    # data parallel: both ranks get the same datasets (rank 0 writes the cache first)
    args = (prefix, str(tmp_path / "c2"), str(tokenizer_dir), 1)
    assert run_distributed(_build_on_rank, 2, args=args) == [expected, expected]
    # tensor parallel: only TP rank 0 builds, as in Megatron-LM
    args = (prefix, str(tmp_path / "c3"), str(tokenizer_dir), 2)
    assert run_distributed(_build_on_rank, 2, args=args) == [expected, None]
