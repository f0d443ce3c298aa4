import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from qwen3_next_mcore.data import IGNORE_INDEX, build_item, pack, to_packed_seq_params
from qwen3_next_mcore.data.packing import pack_best_fit, pack_sequential

IG = IGNORE_INDEX


def _sample(tokens, labels):
    return np.array(tokens, dtype=np.int64), np.array(labels, dtype=np.int64)


def test_pack_rules_on_a_known_case():
    lengths = [5, 3, 7, 2, 6]
    assert pack_sequential(lengths, 10) == [[0, 1], [2, 3], [4]]
    # best-fit decreasing: 7 -> r0 (room 3), 6 -> r1 (4), 5 -> r2 (5), 3 -> r0 (0), 2 -> r1 (2)
    assert pack_best_fit(lengths, 10) == [[0], [1, 2], [3, 4]]
    with pytest.raises(ValueError, match="sample 2 has 7 tokens"):
        pack(lengths, 6, "sequential")
    with pytest.raises(ValueError, match="pack strategy"):
        pack(lengths, 10, "random")


@pytest.mark.parametrize("strategy", ["best_fit", "sequential"])
def test_pack_keeps_every_sample_once_within_capacity(strategy):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500).tolist()
    rows = pack(lengths, 512, strategy)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert max(sum(lengths[i] for i in r) for r in rows) <= 512
    assert rows == pack(lengths, 512, strategy)  # deterministic
    if strategy == "sequential":
        assert [i for r in rows for i in r] == list(range(500))
    # best-fit needs no more rows than sequential
    assert len(pack(lengths, 512, "best_fit")) <= len(pack(lengths, 512, "sequential"))


def test_build_item_layout():
    a = _sample([10, 11, 12], [IG, 12, 99])  # label 99 at a's last token must be cut
    b = _sample([20, 21], [21, 77])
    c = _sample([30, 31, 32, 33], [IG, IG, 33, IG])
    item = build_item([a, b, c], 12, pad_id=5, loss_average="sample")
    assert item["tokens"].tolist() == [10, 11, 12, 20, 21, 30, 31, 32, 33, 5, 5, 5]
    assert item["labels"].tolist() == [IG, 12, IG, 21, IG, IG, IG, 33, IG, IG, IG, IG]
    assert item["loss_mask"].tolist() == [0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]
    assert item["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]
    assert item["cu_seqlens"].dtype == torch.int32 and item["cu_seqlens"].shape == (13,)
    assert item["cu_seqlens"].tolist() == [0, 3, 5, 9, 12] + [12] * 8
    assert (item["cu_seqlens_len"].item(), item["num_seqs"].item(), item["max_seqlen"].item()) == (5, 3, 4)
    # per-sample weights: every sample with targets sums to 1
    w = item["loss_weight"]
    assert [w[0:3].sum().item(), w[3:5].sum().item(), w[5:9].sum().item(), w[9:].sum().item()] == [1, 1, 1, 0]
    for k in ("tokens", "labels", "position_ids"):
        assert item[k].dtype == torch.int64
    assert item["loss_mask"].dtype == torch.float32
    token_avg = build_item([a, b, c], 12, pad_id=5)
    assert torch.equal(token_avg["loss_weight"], token_avg["loss_mask"])


def test_full_row_has_no_padding_segment():
    item = build_item([_sample([1, 2], [2, IG]), _sample([3, 4, 5], [4, 5, IG])], 5, pad_id=0)
    assert item["cu_seqlens"].tolist() == [0, 2, 5, 5, 5, 5]
    assert item["cu_seqlens_len"].item() == 3 and item["num_seqs"].item() == 2
    with pytest.raises(ValueError, match="do not fit"):
        build_item([_sample([1, 2, 3], [IG] * 3)] * 2, 5, pad_id=0)


def test_to_packed_seq_params_for_a_micro_batch():
    row0 = build_item([_sample([1, 2, 3], [2, 3, IG]), _sample([4, 5], [5, IG])], 8, pad_id=0)  # 3, 2, pad 3
    row1 = build_item([_sample(list(range(8)), [IG] * 8)], 8, pad_id=0)  # full
    batch = default_collate([row0, row1])
    params = to_packed_seq_params(batch)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 8, 16]
    assert params.cu_seqlens_kv is params.cu_seqlens_q
    assert params.max_seqlen_q == params.max_seqlen_kv == 8
    single = to_packed_seq_params(row0)
    assert single.cu_seqlens_q.tolist() == [0, 3, 5, 8] and single.max_seqlen_q == 3
