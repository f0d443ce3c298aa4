"""Helpers shared by the data tests."""

from __future__ import annotations

from pathlib import Path


def files_in(folder: Path) -> list[str]:
    """Names of all files under ``folder`` (to check that a failed run left nothing behind)."""
    return sorted(p.name for p in Path(folder).rglob("*") if p.is_file())
