"""Write a ``.bin``/``.idx`` pair under temporary names and rename them only once both are complete."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def dataset_prefix(output_prefix: str | Path, json_key: str = "text") -> str:
    """Megatron's file prefix for a preprocessed key: ``{output_prefix}_{json_key}_document``."""
    return f"{output_prefix}_{json_key}_document"


@contextlib.contextmanager
def atomic_bin_idx(prefix: str | Path) -> Iterator[tuple[str, str]]:
    """Yield temporary ``(bin_path, idx_path)``; on success rename them to ``prefix.bin``/``prefix.idx``.

    On any exception both temporary files are removed and nothing is left at the final names (an
    existing older pair there is left untouched). The output folder is created when missing.
    """
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_bin, tmp_idx = f"{prefix}.bin{tag}", f"{prefix}.idx{tag}"
    try:
        yield tmp_bin, tmp_idx
        if not (os.path.isfile(tmp_bin) and os.path.isfile(tmp_idx)):
            raise RuntimeError(f"writer finished without producing both {tmp_bin} and {tmp_idx}")
        # .idx last: a reader that sees the .idx sees a complete .bin
        os.replace(tmp_bin, f"{prefix}.bin")
        os.replace(tmp_idx, f"{prefix}.idx")
    finally:
        for p in (tmp_bin, tmp_idx):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
