"""What both conversion directions share: the atomic output folder, side files, sizes, the report."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# tokenizer and generation files a HF checkpoint folder may carry; copied along in both directions
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion wrote: tensors (HF names for mcore->HF, checkpoint chunks for HF->mcore)."""

    direction: str
    output: Path
    tensors: int
    bytes: int
    seconds: float
    files: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        return (f"{self.direction}: wrote {self.output} ({self.tensors} tensors, {self.bytes / 1e9:.2f} GB in "
                f"{self.files} files) in {self.seconds:.1f} s ({self.gb_per_s:.2f} GB/s)")


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``5GB``, ``500MB``, ``2GiB``."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m or float(m[1]) <= 0:
        raise ValueError(f"size {size!r}: expected a positive size such as 5GB, 500MB or 2GiB")
    base = 1024 if m[3] else 1000
    return int(float(m[1]) * base ** " KMGT".index((m[2] or " ").upper()))


def check_output_free(output: Path) -> None:
    if output.exists():
        raise FileExistsError(f"{output} already exists; remove it or choose another --output")


def make_tmp_dir(output: Path) -> Path:
    """A fresh hidden folder beside ``output`` (``.{name}.tmp-...``), never mistaken for a finished one."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def atomic_output_dir(output: Path, sync: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``output`` (:func:`make_tmp_dir`); rename it to ``output`` when the
    block succeeds (after an fsync of its files when ``sync``).

    On any exception (KeyboardInterrupt included) the temporary folder is removed, so a failed or
    interrupted run never leaves a folder that looks finished. ``output`` must not exist.
    """
    check_output_free(output)
    tmp = make_tmp_dir(output)
    try:
        yield tmp
        publish(tmp, output, sync)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, output: Path, sync: bool) -> None:
    """Rename the finished ``tmp`` to ``output`` (files and folders fsynced first when ``sync``)."""
    if sync:
        for d in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
            fsync_tree(d)
    check_output_free(output)
    os.rename(tmp, output)
    if sync:
        fsync_path(output.parent)


def fsync_tree(directory: Path) -> None:
    """fsync every file directly in ``directory``, then the folder itself."""
    for p in directory.iterdir():
        if p.is_file():
            fsync_path(p)
    fsync_path(directory)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (its entries) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer/generation files of :data:`SIDE_FILES` found in ``src`` and not yet in ``dst``."""
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def progress_bar(total: int, desc: str, enabled: bool | None):
    """A tqdm bar in bytes on a terminal (``enabled=None``: when stderr is a TTY), else a no-op."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (and back as it was): a conversion allocates
    objects by the hundred thousand and frees them by reference counting; collections only cost time
    (about 8% of a conversion's CPU time)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
