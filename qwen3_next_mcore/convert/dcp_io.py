"""megatron-core's ``torch_dist`` checkpoint format, written and read in bounded pieces.

A ``torch_dist`` checkpoint folder is a torch.distributed.checkpoint (DCP) checkpoint (``.metadata``
plus ``*.distcp`` data files) and megatron-core's ``metadata.json``. megatron-core stores each
``ShardedTensor`` under its key with its global shape, as one or more chunks, and each ``ShardedObject``
(``_extra_state``, the ``common_state`` dict) as a torch-saved list of its values under
``{key}/shard_{offset}_{shape}``.

megatron-core's own ``dist_checkpointing.save`` needs every tensor in memory at once (its state dict);
here the chunks are described up front (key, global shape, offsets, dtype), split into buckets of
bounded size, and each bucket is written as one data file, a chunk's data produced only when the writer
reaches it. The file names, plans and ``.metadata`` are DCP's ``FileSystemWriter``'s own
(``prepare_global_plan``, ``finish``); the data files are written by :class:`StreamingWriter` in the
layout ``FileSystemWriter.write_data`` produces: each byte object's bytes, then each tensor as a
``torch.save`` archive, one after the other, located by ``(file, offset, length)`` in the metadata.
DCP's ``FileSystemReader`` (which megatron-core's loader uses) reads a tensor item with ``torch.load``,
so this is what the file must hold; but the archive of a tensor is fixed bytes around the raw tensor
bytes, so the writer builds those bytes once per dtype and shape (:func:`tensor_record`) and writes the
tensor bytes straight from the tensor's memory, or copies them file to file in the kernel when a chunk
is an unchanged range of an input file (:class:`FileSpans`), instead of ``torch.save`` per tensor
(which also computes a zip CRC32 that torch's reader never checks). Reading goes the other way:
:class:`McoreCheckpointReader` reads any region of any tensor through ``FileSystemReader.read_data``
with DCP's own resharding arithmetic.
"""

from __future__ import annotations

import functools
import io
import math
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
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
from torch.distributed.checkpoint.storage import WriteResult

from .safetensors_io import copy_range, pwrite_from

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


@dataclass(frozen=True)
class FileSpans:
    """A chunk's data that is, unchanged, the concatenation of byte ranges of open files:
    ``(fd, offset, nbytes, label)`` each, ``label`` naming the range in errors. The writer copies them
    file to file (:func:`.safetensors_io.copy_range`): they never pass through this process's memory."""

    spans: tuple[tuple[int, int, int, str], ...]

    @property
    def nbytes(self) -> int:
        return sum(s[2] for s in self.spans)

    def copy_to(self, fd: int, offset: int) -> None:
        for src, src_offset, n, label in self.spans:
            try:
                copy_range(src, src_offset, fd, offset, n)
            except (OSError, ValueError) as e:
                raise ValueError(f"{label}: cannot copy: {e}") from None
            offset += n


class _Recorder:
    """A write-only file object for ``torch.save`` that keeps what is written and where (skipped ranges
    read as zeros, as in a file)."""

    def __init__(self):
        self.pos = self.end = 0
        self.pieces: list[tuple[int, bytes]] = []

    def write(self, data) -> int:
        data = bytes(data)
        self.pieces.append((self.pos, data))
        self.pos += len(data)
        self.end = max(self.end, self.pos)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.end + offset
        self.end = max(self.end, self.pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass


@functools.lru_cache(maxsize=1024)
def tensor_record(dtype: torch.dtype, sizes: tuple[int, ...]) -> tuple[bytes, bytes]:
    """``(head, tail)``: ``torch.save(t)`` of any contiguous CPU tensor ``t`` of this dtype and shape
    (storage offset 0, storage of its own size, as a chunk's tensor is) is ``head + t's bytes + tail``,
    with the zip CRC32 fields left 0 (``torch.serialization.set_crc32_options(False)``: torch's reader
    is built without CRC checks, ``MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS``).

    Made with ``torch.serialization.skip_data``, which writes the archive but skips the storage bytes;
    the tensor saved is uninitialised memory that is never touched (so costs no resident memory)."""
    nbytes = math.prod(sizes) * dtype.itemsize
    rec = _Recorder()
    was = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        with torch.serialization.skip_data():
            torch.save(torch.empty(sizes, dtype=dtype), rec)  # type: ignore[arg-type]
    finally:
        torch.serialization.set_crc32_options(was)
    image = bytearray(rec.end)
    for at, data in rec.pieces:
        image[at:at + len(data)] = data
    # the one unwritten range of the tensor's size is its storage
    written = sorted((at, at + len(data)) for at, data in rec.pieces if data)
    holes, end = [], 0
    for a, b in written:
        if a > end:
            holes.append((end, a))
        end = max(end, b)
    if end < rec.end:
        holes.append((end, rec.end))
    if nbytes == 0:
        return bytes(image), b""
    storage = [h for h in holes if h[1] - h[0] == nbytes]
    if len(storage) != 1:
        raise AssertionError(f"torch.save of {dtype} {list(sizes)}: cannot locate the storage bytes ({holes})")
    start, stop = storage[0]
    return bytes(image[:start]), bytes(image[stop:])


def _pwrite_bytes(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


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
    """What the writer asks for data: ``resolve_data`` returns a chunk's data (produced by
    ``produce(chunk)``: a tensor, or :class:`FileSpans` for bytes copied unchanged from input files) or
    an object's bytes.

    A background thread produces the chunks given to :meth:`start` ahead of the writer, in that order,
    holding at most ``prefetch_bytes`` of memory (and at least one chunk) that the writer has not taken
    yet, so reading and writing overlap. ``memory(chunk)`` is the memory a chunk's data will hold (by
    default its size; 0 for chunks produced as :class:`FileSpans`, which hold none). The writer must ask
    for the chunks in the same order (:class:`StreamingWriter` does)."""

    def __init__(self, produce: Callable[[Chunk], torch.Tensor | FileSpans], objects: dict[str, io.BytesIO],
                 prefetch_bytes: int, memory: Callable[[Chunk], int] | None = None):
        self._produce, self._objects, self._budget = produce, objects, prefetch_bytes
        self._memory = memory or (lambda c: c.nbytes)
        self._ready: dict[MetadataIndex, tuple[torch.Tensor | FileSpans, int]] = {}
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
            need = self._memory(c)
            with self._cv:
                self._cv.wait_for(lambda n=need: self._stop or self._held == 0 or self._held + n <= self._budget)
                if self._stop:
                    return
            try:
                t = self._produce(c)
                if isinstance(t, FileSpans):
                    if t.nbytes != c.nbytes:
                        raise AssertionError(f"{c.key}: produced {t.nbytes} bytes for a chunk of {c.nbytes}")
                    need = 0
                elif tuple(t.shape) != c.sizes or t.dtype != c.dtype:
                    raise AssertionError(f"{c.key}: produced {t.dtype} {list(t.shape)} for a chunk of "
                                         f"{c.dtype} {list(c.sizes)}")
                else:
                    need = c.nbytes
            except BaseException as e:  # noqa: BLE001 - handed to the writer thread
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
                return
            with self._cv:
                self._ready[c.index] = (t, need)
                self._held += need
                self._cv.notify_all()

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return self._objects[write_item.index.fqn]
        with self._cv:
            self._cv.wait_for(lambda: write_item.index in self._ready or self._error is not None)
            if write_item.index not in self._ready:
                raise self._error  # type: ignore[misc]
            t, held = self._ready.pop(write_item.index)
            self._held -= held
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
    """A torch_dist data file per bucket, as DCP's ``FileSystemWriter.write_data`` lays it out.

    ``plans`` are the SavePlans of every bucket of every rank, in the same order on every rank (each
    gets a distinct file name from ``prepare_global_plan``); a rank writes its own buckets with
    :meth:`write` and the coordinator writes ``.metadata`` with :meth:`finish` (DCP's own).
    """

    def __init__(self, path: str | Path, bucket_items: list[list[WriteItem]]):
        self.path = Path(path)
        self._writer = FileSystemWriter(self.path, single_file_per_rank=True, sync_files=False, thread_count=1)
        self.plans: list[SavePlan] = self._writer.prepare_global_plan([SavePlan(items) for items in bucket_items])

    def write(self, bucket: int, source: ChunkSource, written: Callable[[int], None] | None = None) -> list:
        """Write bucket ``bucket``'s data file (``__{bucket}_0.distcp``, as ``write_data`` names it) with
        the data ``source`` resolves: its byte objects, then its tensors in plan order, each a
        ``torch.save`` archive (:func:`tensor_record` around the tensor's bytes, written with positional
        writes from the tensor's memory or copied file to file). Returns DCP's ``WriteResult`` per item.
        ``written(nbytes)`` is called after each tensor (progress)."""
        plan = self.plans[bucket]
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        items = ([i for i in plan.items if i.type == WriteItemType.BYTE_IO]
                 + [i for i in plan.items if i.type != WriteItemType.BYTE_IO])
        results = []
        fd = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pos = 0
            for item in items:
                data = source.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    _pwrite_bytes(fd, data.getbuffer(), pos)
                    length = data.getbuffer().nbytes
                else:
                    td = item.tensor_data
                    head, tail = tensor_record(td.properties.dtype, tuple(td.chunk.sizes))
                    nbytes = math.prod(td.chunk.sizes) * td.properties.dtype.itemsize
                    _pwrite_bytes(fd, head, pos)
                    if isinstance(data, FileSpans):
                        data.copy_to(fd, pos + len(head))
                    else:
                        if data.device.type != "cpu" or data.dtype != td.properties.dtype or \
                                tuple(data.shape) != tuple(td.chunk.sizes):
                            raise AssertionError(f"{item.index.fqn}: got {data.dtype} {list(data.shape)} on "
                                                 f"{data.device} for a chunk of {list(td.chunk.sizes)}")
                        pwrite_from(fd, data.contiguous(), pos + len(head))
                    _pwrite_bytes(fd, tail, pos + len(head) + nbytes)
                    length = len(head) + nbytes + len(tail)
                    if written is not None:
                        written(nbytes)
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(name, pos, length)))
                pos += length
        finally:
            os.close(fd)
        return results

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
