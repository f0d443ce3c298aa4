"""The data-file writer's pieces: a tensor's stored record is exactly ``torch.save``'s archive (CRC
fields 0), written around the tensor's bytes; unchanged byte ranges are copied file to file, with a
fallback where the kernel cannot; a data file reads back through DCP's reader (torch.load)."""

from __future__ import annotations

import errno
import io
import os

import pytest
import torch

from qwen3_next_mcore.convert import dcp_io
from qwen3_next_mcore.convert.safetensors_io import copy_range


@pytest.mark.parametrize(("dtype", "shape"), [(torch.bfloat16, (3, 5)), (torch.float32, (1, 7, 4)),
                                              (torch.float16, (11,)), (torch.bfloat16, (2, 0))])
def test_tensor_record_is_torch_save(dtype, shape):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    head, tail = dcp_io.tensor_record(dtype, shape)
    raw = head + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() + tail
    was = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        ref = io.BytesIO()
        torch.save(t, ref)
    finally:
        torch.serialization.set_crc32_options(was)
    assert torch.serialization.get_crc32_options() == was  # tensor_record put the option back
    assert raw == ref.getvalue()
    got = torch.load(io.BytesIO(raw), weights_only=True)
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8))


def _files(tmp_path, data: bytes):
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    return src, dst


@pytest.mark.parametrize("kernel", [True, False])
def test_copy_range(tmp_path, monkeypatch, kernel):
    data = os.urandom(3 << 20)
    if not kernel:  # e.g. across filesystems on an old kernel
        def refuse(*args, **kwargs):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    src, dst = _files(tmp_path, data)
    try:
        copy_range(src, 1000, dst, 10, 2 << 20)
        copy_range(src, 0, dst, 0, 10)
        with pytest.raises(ValueError, match="unexpected end of file"):  # the source ends early
            copy_range(src, (3 << 20) - 5, dst, 3 << 20, 10)
    finally:
        os.close(src)
        os.close(dst)
    out = (tmp_path / "dst").read_bytes()
    assert out[:10] == data[:10] and out[10:10 + (2 << 20)] == data[1000:1000 + (2 << 20)]


def test_data_file_reads_back_through_dcp(tmp_path):
    """Tensors written from memory and from file ranges, and byte objects, in one data file."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 6, generator=gen).to(torch.bfloat16)
    b = torch.randn(2, 3, 5, generator=gen)
    (tmp_path / "src.bin").write_bytes(b"xyz" + b.numpy().tobytes())
    fd = os.open(tmp_path / "src.bin", os.O_RDONLY)
    chunks = [dcp_io.Chunk("a", (4, 6), (0, 0), (4, 6), torch.bfloat16),
              dcp_io.Chunk("b", (4, 3, 5), (2, 0, 0), (2, 3, 5), torch.float32)]
    produced = {"a": a, "b": dcp_io.FileSpans(((fd, 3, b.nbytes // 2, "src a"), (fd, 3 + b.nbytes // 2,
                                                                                 b.nbytes // 2, "src b")))}
    objects = {"obj/shard_0_1": dcp_io.object_bytes([{"x": 1}])}
    release = tmp_path / "ckpt"
    release.mkdir()
    items = [[dcp_io.object_write_item(k) for k in objects] + [c.write_item() for c in chunks]]
    writer = dcp_io.StreamingWriter(release, items)
    source = dcp_io.ChunkSource(lambda c: produced[c.key], objects, prefetch_bytes=1 << 20)
    source.start(chunks)
    done = []
    try:
        results = writer.write(0, source, done.append)
    finally:
        source.stop()
        os.close(fd)
    assert done == [a.nbytes, b.nbytes]
    writer.finish(dcp_io.build_metadata(chunks, objects), results)
    reader = dcp_io.McoreCheckpointReader(release)
    got_a, got_b = reader.read([("a", (0, 0), (4, 6)), ("b", (2, 0, 0), (2, 3, 5))])
    assert torch.equal(got_a.view(torch.uint8), a.view(torch.uint8)) and torch.equal(got_b, b)
