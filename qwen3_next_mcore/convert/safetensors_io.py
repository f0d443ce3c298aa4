"""The safetensors file format, read and written one tensor at a time with plain file I/O.

A safetensors file is an 8-byte little-endian header length ``n``, a JSON header of ``n`` bytes
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets relative
to the end of the header) and the tensor bytes. Reading with ``os.preadv`` into a fresh tensor (rather
than through a memory map) keeps a converter's resident memory to the tensors it holds: pages of a
mapped 160 GB checkpoint would otherwise count as resident while the mapping lives. Writing with
``os.pwrite`` at offsets planned from the header lets tensors arrive in any order, one at a time.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names <-> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the header size
_IO_CHUNK = 1 << 30  # one read/write syscall moves at most ~2 GiB on Linux; stay well below


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file: absolute byte offset, length, dtype, shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file by name, checked against the file's size.

    Raises ValueError naming the file when the header is unreadable or the file is shorter than the
    header says (a truncated download or copy).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path}: truncated or not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    base = 8 + n
    out: dict[str, TensorEntry] = {}
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: bad header entry for {name!r}: {info}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise ValueError(f"{path}: {name!r} spans {end - begin} bytes, its shape {list(shape)} and dtype "
                             f"{info['dtype']} need {nbytes}")
        out[name] = TensorEntry(dtype, shape, base + begin, nbytes)
        end_max = max(end_max, end)
    if base + end_max > size:
        raise ValueError(f"{path}: truncated: the header describes {base + end_max} bytes, the file has {size}")
    return out


def pread_into(fd: int, out: torch.Tensor, offset: int) -> None:
    """Fill the contiguous CPU tensor ``out`` with the bytes at ``offset`` of file ``fd``."""
    buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:done + _IO_CHUNK]], offset + done)
        if n <= 0:
            raise ValueError(f"unexpected end of file at byte {offset + done} (truncated?)")
        done += n


def pwrite_from(fd: int, tensor: torch.Tensor, offset: int) -> None:
    """Write the bytes of the contiguous CPU tensor ``tensor`` at ``offset`` of file ``fd``."""
    buf = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:done + _IO_CHUNK], offset + done)


class ShardWriter:
    """One safetensors file written tensor by tensor, in any order, from a plan of names/dtypes/shapes.

    The header is written first (its offsets follow ``plan`` order); :meth:`write` puts each tensor's
    bytes at its place; :meth:`close` checks that every planned tensor arrived (and fsyncs the file).
    """

    def __init__(self, path: str | Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        begin = 0
        self._entries: dict[str, TensorEntry] = {}
        for name, dtype, shape in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, begin + nbytes]}
            self._entries[name] = TensorEntry(dtype, tuple(shape), begin, nbytes)
            begin += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data then starts 8-byte aligned, as safetensors writes it
        self._base = 8 + len(raw)
        self.size = self._base + begin
        self._pending = set(self._entries)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self._entries[name]
        if name not in self._pending:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(f"{self.path}: {name!r} is {tensor.dtype} {list(tensor.shape)}, planned "
                             f"{entry.dtype} {list(entry.shape)}")
        pwrite_from(self._fd, tensor.detach().cpu().contiguous(), self._base + entry.offset)
        self._pending.discard(name)

    @property
    def complete(self) -> bool:
        """Every planned tensor has been written."""
        return not self._pending

    def close(self, sync: bool = True) -> None:
        if self._fd < 0:
            return
        try:
            if self._pending:
                raise ValueError(f"{self.path}: {len(self._pending)} planned tensors were never written, "
                                 f"e.g. {sorted(self._pending)[:3]}")
            if sync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        """Close without checks (the file is being discarded)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_COPY_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY}
_COPY_BUFFER = 16 << 20


def copy_range(src: int, src_offset: int, dst: int, dst_offset: int, nbytes: int) -> None:
    """Copy ``nbytes`` at ``src_offset`` of file ``src`` to ``dst_offset`` of file ``dst``.

    ``os.copy_file_range`` moves the bytes inside the kernel (page cache to page cache, or a server-side
    copy on network filesystems): they never pass through this process's memory. Where the kernel or
    filesystem cannot (``EXDEV``, ``ENOSYS``, ``EOPNOTSUPP``, ``EINVAL``), the rest is copied with
    positional reads and writes through one 16 MiB buffer. Raises ValueError when ``src`` ends early.
    """
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                n = os.copy_file_range(src, dst, min(nbytes - done, _IO_CHUNK), src_offset + done, dst_offset + done)
                if n <= 0:
                    raise ValueError(f"unexpected end of file at byte {src_offset + done} (truncated?)")
                done += n
            return
        except OSError as e:
            if e.errno not in _COPY_FALLBACK_ERRNOS:
                raise
    buf = memoryview(bytearray(min(_COPY_BUFFER, nbytes - done)))
    while done < nbytes:
        want = min(len(buf), nbytes - done)
        n = os.preadv(src, [buf[:want]], src_offset + done)
        if n <= 0:
            raise ValueError(f"unexpected end of file at byte {src_offset + done} (truncated?)")
        w = 0
        while w < n:
            w += os.pwrite(dst, buf[w:n], dst_offset + done + w)
        done += n
