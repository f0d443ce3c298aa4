"""Reading JSON-array and JSONL files into rows (dicts), with errors that name the file and the line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Row:
    """One JSON object of an input file and where it came from (1-based ``index`` and ``line``)."""

    data: dict[str, Any]
    index: int
    line: int

    def where(self, path: str | Path) -> str:
        return f"{path}:{self.line} (row {self.index})"


def read_rows(path: str | Path) -> list[Row]:
    """All rows of ``path``: a JSON array of objects, or JSON Lines (one object a line, blank lines skipped).

    Raises ValueError naming the file and line for malformed JSON, non-object rows, or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    rows = _array_rows(path, text) if stripped.startswith("[") else _jsonl_rows(path, text)
    if not rows:
        raise ValueError(f"{path}: no rows (empty input)")
    return rows


def parse_json_line(path: str | Path, line_no: int, line: str) -> dict[str, Any]:
    """One JSONL line as a dict; ValueError names ``path:line`` when it is not a JSON object."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: malformed JSON (column {e.colno}): {e.msg}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _jsonl_rows(path: Path, text: str) -> list[Row]:
    rows = []
    # split on "\n" only: str.splitlines would also cut at U+2028 and friends, legal inside JSON strings
    for line_no, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            rows.append(Row(parse_json_line(path, line_no, line), len(rows) + 1, line_no))
    return rows


def _array_rows(path: Path, text: str) -> list[Row]:
    # walk the array element by element so every row keeps its line number
    counted = {"pos": 0, "line": 1}

    def line_of(pos: int) -> int:  # positions only grow, so newlines are counted once overall
        counted["line"] += text.count("\n", counted["pos"], pos)
        counted["pos"] = pos
        return counted["line"]

    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    rows: list[Row] = []
    try:
        while True:
            pos = _skip_ws(text, pos)
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            if rows:
                if pos >= len(text) or text[pos] != ",":
                    raise json.JSONDecodeError("expected ',' or ']'", text, pos)
                pos = _skip_ws(text, pos + 1)
            obj, end = decoder.raw_decode(text, pos)
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}:{line_of(pos)} (row {len(rows) + 1}): expected a JSON object, "
                    f"got {type(obj).__name__}"
                )
            rows.append(Row(obj, len(rows) + 1, line_of(pos)))
            pos = end
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON (column {e.colno}): {e.msg}") from None
    if text[pos:].strip():
        raise ValueError(f"{path}:{line_of(pos)}: malformed JSON: extra data after the closing ']'")
    return rows


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos
