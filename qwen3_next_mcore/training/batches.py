"""Micro-batches for the training loop: a deterministic, resumable sampler sharded by data-parallel rank.

Sample order is a pure function of the seed and of the number of samples consumed so far, so a resumed
run continues exactly where the checkpoint stopped, and a run at any data-parallel size sees the same
micro-batches (Megatron-LM's order: consecutive blocks of ``micro_batch_size`` samples go to the
data-parallel ranks in turn).

A micro-batch is the dict :mod:`.step` takes: ``tokens``, ``labels`` (negative labels are replaced by 0
and masked), ``loss_mask``, and for packed SFT rows ``position_ids`` and ``packed_seq_params`` with the
rows flattened to ``[1, B * L]``. Unpacked rows drop ``position_ids`` (the model uses 0..S-1).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ResumableSampler(torch.utils.data.Sampler):
    """This data-parallel rank's sample indices from ``consumed`` on, in micro-batch-sized groups.

    ``shuffle=False`` walks the dataset in order (megatron's GPTDataset is already shuffled);
    ``shuffle=True`` walks a fresh permutation per epoch, seeded by ``seed + epoch``.
    """

    def __init__(self, num_samples: int, *, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 shuffle: bool, seed: int):
        if num_samples <= 0:
            raise ValueError("the dataset is empty (no samples of --seq-length tokens)")
        self.n, self.consumed, self.mbs = num_samples, consumed, micro_batch_size
        self.rank, self.dp, self.shuffle, self.seed = dp_rank, dp_size, shuffle, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def index(self, k: int) -> int:
        """The dataset index of the ``k``-th sample of the global stream."""
        epoch, pos = divmod(k, self.n)
        if not self.shuffle:
            return pos
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][pos])

    def __iter__(self) -> Iterator[int]:
        k = self.consumed
        block = self.mbs * self.dp
        while True:
            start = k + self.rank * self.mbs
            for j in range(start, start + self.mbs):
                yield self.index(j)
            k += block

    def __len__(self) -> int:  # infinite stream; DataLoader only needs this for warnings
        return 2**62


def to_micro_batch(batch: dict, packed: bool) -> dict:
    """A collated batch of dataset items -> the dict :func:`.step.forward_backward` consumes."""
    labels = batch["labels"]
    loss_mask = batch["loss_mask"].float() * (labels >= 0)
    labels = labels.clamp(min=0)
    out = {"tokens": batch["tokens"], "labels": labels, "loss_mask": loss_mask}
    if packed:
        from ..data import to_packed_seq_params

        out = {k: v.reshape(1, -1) for k, v in out.items()}
        out["position_ids"] = batch["position_ids"].reshape(1, -1)
        out["packed_seq_params"] = to_packed_seq_params(batch)
    return out


class MicroBatches:
    """An endless iterator of micro-batch dicts for this data-parallel rank, starting after ``consumed``
    samples of the global stream."""

    def __init__(self, dataset, *, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 shuffle: bool, seed: int, packed: bool = False):
        self.sampler = ResumableSampler(len(dataset), consumed=consumed, micro_batch_size=micro_batch_size,
                                        dp_rank=dp_rank, dp_size=dp_size, shuffle=shuffle, seed=seed)
        self.packed = packed
        keys = None if packed else ("tokens", "labels", "loss_mask")

        def collate(items):
            if keys is not None:
                items = [{k: it[k] for k in keys} for it in items]
            return torch.utils.data.default_collate(items)

        loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch_size, sampler=self.sampler,
                                             collate_fn=collate, num_workers=0)
        self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return to_micro_batch(next(self._it), self.packed)

    def take(self, n: int) -> list[dict]:
        return [next(self) for _ in range(n)]
