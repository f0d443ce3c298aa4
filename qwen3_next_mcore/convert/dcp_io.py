"""megatron-core's ``torch_dist`` checkpoint format, written and read in bounded pieces.

A ``torch_dist`` checkpoint folder is a torch.distributed.checkpoint (DCP) checkpoint (``.metadata``
plus ``*.distcp`` data files) and megatron-core's ``metadata.json``. megatron-core stores each
``ShardedTensor`` under its key with its global shape, as one or more chunks, and each ``ShardedObject``
(``_extra_state``, the ``common_state`` dict) as a torch-saved list of its values under
``{key}/shard_{offset}_{shape}``.

megatron-core's own ``dist_checkpointing.save`` needs every tensor in memory at once (its state dict);
here the writer is DCP's ``FileSystemWriter`` driven directly: the chunks are described up front (key,
global shape, offsets, dtype), split into buckets of bounded size, and each bucket is written as one
data file by ``write_data`` with a planner whose ``resolve_data`` produces a chunk's tensor only when
the writer asks for it. The DCP ``Metadata`` is built from the descriptions and written once by
``finish``. The result is byte-for-byte the format megatron-core reads (``dist_checkpointing.load``
reshards it to any parallel layout). Reading goes the other way: :class:`McoreCheckpointReader` reads
any region of any tensor through ``FileSystemReader.read_data`` with DCP's own resharding arithmetic.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

COMMON_STATE_KEY = "common_state/shard_0_1"  # megatron-core's ShardedObject("common_state", ..., (1,), (0,))


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a checkpoint tensor: ``key``'s region at ``offsets`` of size ``sizes``."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.sizes) * self.dtype.itemsize

    @property
    def index(self) -> MetadataIndex:
        return MetadataIndex(self.key, self.offsets)

    def write_item(self) -> WriteItem:
        return WriteItem(index=self.index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(torch.Size(self.offsets), torch.Size(self.sizes)),
            properties=TensorProperties(dtype=self.dtype), size=torch.Size(self.global_shape)))


def object_write_item(unique_key: str) -> WriteItem:
    return WriteItem(index=MetadataIndex(unique_key), type=WriteItemType.BYTE_IO)


def object_bytes(values: list) -> io.BytesIO:
    """The stored form of a megatron ``ShardedObject``: the torch-saved list of its values."""
    buf = io.BytesIO()
    torch.save(values, buf)
    buf.seek(0)
    return buf


def build_metadata(chunks: Iterable[Chunk], object_keys: Iterable[str]) -> Metadata:
    """DCP metadata for ``chunks`` and byte objects (storage locations are added by ``finish``)."""
    md: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for c in chunks:
        entry = md.get(c.key)
        if entry is None:
            entry = md[c.key] = TensorStorageMetadata(TensorProperties(dtype=c.dtype), torch.Size(c.global_shape), [])
        elif entry.size != torch.Size(c.global_shape) or entry.properties.dtype != c.dtype:
            raise ValueError(f"{c.key}: chunks disagree on the global shape or dtype")
        entry.chunks.append(ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)))
    for key in object_keys:
        md[key] = BytesStorageMetadata()
    return Metadata(state_dict_metadata=md)


def buckets_by_size(items: list, size_of: Callable[[object], int], limit: int) -> list[list]:
    """Consecutive runs of ``items`` of at most ``limit`` bytes each (an item larger than ``limit`` is
    a run of its own)."""
    out: list[list] = []
    current: list = []
    total = 0
    for item in items:
        n = size_of(item)
        if current and total + n > limit:
            out.append(current)
            current, total = [], 0
        current.append(item)
        total += n
    if current:
        out.append(current)
    return out


class ChunkSource:
    """The planner ``FileSystemWriter.write_data`` calls: ``resolve_data`` returns a chunk's tensor
    (produced by ``produce(chunk)``) or an object's bytes.

    A background thread produces the chunks given to :meth:`start` ahead of the writer, in that order,
    holding at most ``prefetch_bytes`` (and at least one chunk) that the writer has not taken yet, so
    reading and writing overlap. The writer must ask for the chunks in the same order (DCP's writer
    resolves a plan's tensor items in plan order with one thread per rank, as used here)."""

    def __init__(self, produce: Callable[[Chunk], torch.Tensor], objects: dict[str, io.BytesIO],
                 prefetch_bytes: int):
        self._produce, self._objects, self._budget = produce, objects, prefetch_bytes
        self._ready: dict[MetadataIndex, torch.Tensor] = {}
        self._held = 0
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    def start(self, chunks: list[Chunk]) -> None:
        self._thread = threading.Thread(target=self._run, args=(chunks,), daemon=True, name="convert-prefetch")
        self._thread.start()

    def _run(self, chunks: list[Chunk]) -> None:
        for c in chunks:
            with self._cv:
                self._cv.wait_for(lambda n=c.nbytes: self._stop or self._held == 0 or self._held + n <= self._budget)
                if self._stop:
                    return
            try:
                t = self._produce(c)
                if tuple(t.shape) != c.sizes or t.dtype != c.dtype:
                    raise AssertionError(f"{c.key}: produced {t.dtype} {list(t.shape)} for a chunk of "
                                         f"{c.dtype} {list(c.sizes)}")
            except BaseException as e:  # noqa: BLE001 - handed to the writer thread
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
                return
            with self._cv:
                self._ready[c.index] = t
                self._held += c.nbytes
                self._cv.notify_all()

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return self._objects[write_item.index.fqn]
        with self._cv:
            self._cv.wait_for(lambda: write_item.index in self._ready or self._error is not None)
            if write_item.index not in self._ready:
                raise self._error  # type: ignore[misc]
            t = self._ready.pop(write_item.index)
            self._held -= t.numel() * t.element_size()
            self._cv.notify_all()
        return t

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._ready.clear()


class StreamingWriter:
    """DCP's ``FileSystemWriter`` fed one bucket (one data file) at a time.

    ``plans`` are the SavePlans of every bucket of every rank, in the same order on every rank (each
    gets a distinct file name from ``prepare_global_plan``); a rank writes its own buckets with
    :meth:`write` and the coordinator writes ``.metadata`` with :meth:`finish`.
    """

    def __init__(self, path: str | Path, bucket_items: list[list[WriteItem]]):
        self.path = Path(path)
        self._writer = FileSystemWriter(self.path, single_file_per_rank=True, sync_files=False, thread_count=1)
        self.plans: list[SavePlan] = self._writer.prepare_global_plan([SavePlan(items) for items in bucket_items])

    def write(self, bucket: int, source: ChunkSource) -> list:
        return self._writer.write_data(self.plans[bucket], source).wait()  # type: ignore[arg-type]

    def finish(self, metadata: Metadata, results: list) -> None:
        self._writer.finish(metadata, [results])


# ----- reading -----------------------------------------------------------------------------------------
class _RegionPlanner:
    """What ``FileSystemReader.read_data`` calls: destination views for each read item."""

    def __init__(self, targets: dict[tuple[str, tuple[int, ...]], torch.Tensor]):
        self.targets = targets

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        t = self.targets[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(dim, start, length)
        return t

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise AssertionError("byte objects are not read by region")


class McoreCheckpointReader:
    """Regions of the tensors of a ``torch_dist`` checkpoint folder, read on demand (whatever the
    parallel layout that wrote it)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._reader = FileSystemReader(self.directory)
        try:
            self.metadata = self._reader.read_metadata()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.directory}: no .metadata (not a torch_dist checkpoint)") from None
        except Exception as e:  # noqa: BLE001 - unpickling errors of a damaged file
            raise ValueError(f"{self.directory / '.metadata'}: unreadable ({e})") from None
        self._reader.set_up_storage_reader(self.metadata, True)
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def read(self, regions: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
             dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """The tensors at ``(key, offsets, sizes)`` of each region, in the stored dtype (or ``dtype``)."""
        targets: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        by_key: dict[str, list[ChunkStorageMetadata]] = {}
        out = []
        for key, offsets, sizes in regions:
            md = self.tensors[key]
            t = torch.empty(sizes, dtype=dtype or md.properties.dtype)
            targets[(key, tuple(offsets))] = t
            by_key.setdefault(key, []).append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
            out.append(t)
        items: list[ReadItem] = []
        for key, chunks in by_key.items():
            items += create_read_items_for_chunk_list(key, self.tensors[key], chunks)
        covered: dict[tuple[str, tuple[int, ...]], int] = {}
        for it in items:
            k = (it.dest_index.fqn, tuple(it.dest_index.offset))
            n = 1
            for s in it.lengths:
                n *= s
            covered[k] = covered.get(k, 0) + n
        for (key, offsets), t in targets.items():
            if covered.get((key, offsets), 0) != t.numel():
                raise ValueError(f"{self.directory}: the stored chunks of {key!r} do not cover the region at "
                                 f"{list(offsets)} of size {list(t.shape)} (incomplete checkpoint?)")
        try:
            self._reader.read_data(LoadPlan(items), _RegionPlanner(targets)).wait()  # type: ignore[arg-type]
        except (OSError, RuntimeError, EOFError, ValueError) as e:
            keys = sorted(by_key)
            raise ValueError(f"{self.directory}: cannot read {keys[0]!r}{' and others' if len(keys) > 1 else ''} "
                             f"(damaged or truncated data file?): {e}") from None
        return out
