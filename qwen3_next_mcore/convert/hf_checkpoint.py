"""Read a Hugging Face safetensors checkpoint one tensor at a time, with strict validation.

``HFCheckpoint(dir)`` opens ``model.safetensors.index.json`` (or a single ``model.safetensors``),
reads every shard's header (checking it against the file size, so a truncated shard fails here) and
serves tensors by name, each read with plain positional file reads into a fresh tensor: nothing else
of the checkpoint is read or kept resident. Fused expert tensors (transformers 5.x in-memory layout
``mlp.experts.gate_up_proj`` [E, 2F, H] with gate rows first, ``mlp.experts.down_proj`` [E, H, F]) are
also served under the per-expert names used on disk (``mlp.experts.{e}.gate_proj.weight`` ...), so both
layouts load the same. :func:`check_against_config` validates names, shapes and dtypes before use.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Self

import torch

from .safetensors_io import TensorEntry, pread_into, read_header

_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<which>gate_up_proj|down_proj)$")


def fused_expert_names(shapes: dict[str, tuple[int, ...]], where) -> dict[str, tuple[str, int, str]]:
    """The per-expert names under which fused expert tensors (transformers 5.x:
    ``...mlp.experts.gate_up_proj`` ``[E, 2F, H]`` as ``[gate; up]``, ``down_proj`` ``[E, H, F]``) are listed: ``{name: (fused name, expert,
    part)}`` with part ``gate``, ``up`` or ``all``. ``shapes``: every stored name's shape; ``where(name)``
    names its file in errors."""
    virtual: dict[str, tuple[str, int, str]] = {}
    for key, shape in shapes.items():
        m = _FUSED.match(key)
        if not m:
            continue
        if len(shape) != 3:
            raise ValueError(f"{where(key)}: fused expert tensor {key!r} has shape {list(shape)}, expected "
                             "[experts, rows, cols]")
        for e in range(shape[0]):
            p = f"{m['prefix']}.{e}"
            if m["which"] == "gate_up_proj":
                virtual[f"{p}.gate_proj.weight"] = (key, e, "gate")
                virtual[f"{p}.up_proj.weight"] = (key, e, "up")
            else:
                virtual[f"{p}.down_proj.weight"] = (key, e, "all")
    return virtual


def listed_names(stored, virtual: dict[str, tuple[str, int, str]]) -> set[str]:
    """Stored names with the fused expert tensors replaced by their per-expert names."""
    return (set(stored) - {v[0] for v in virtual.values()}) | set(virtual)


class HFCheckpoint:
    """Lazy, validated access to the tensors of a HF checkpoint folder (close it, or use ``with``)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: no such checkpoint folder")
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index (expected a 'weight_map'): {e}") from None
        else:
            if not (self.directory / "model.safetensors").is_file():
                raise FileNotFoundError(f"{self.directory}: neither model.safetensors.index.json nor model.safetensors")
            weight_map = None
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._entries: dict[str, dict[str, TensorEntry]] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{index}: points to {name}, which does not exist in {self.directory}")
            self._entries[name] = read_header(path)
        self._where: dict[str, str] = {}
        for name, entries in self._entries.items():
            for key in entries:
                if key in self._where:
                    raise ValueError(f"{self.directory}: tensor {key!r} appears in both {self._where[key]} and {name}")
                self._where[key] = name
        if weight_map:
            missing = sorted(k for k, f in weight_map.items() if self._where.get(k) != f)
            if missing:
                raise ValueError(f"{index}: {len(missing)} tensors listed in the index are not in their shard "
                                 f"(first: {missing[0]!r} -> {weight_map[missing[0]]})")
        self._fds: dict[str, int] = {}
        self._virtual = fused_expert_names({k: self._entry(k).shape for k in self._where},
                                           lambda k: self.directory / self._where[k])

    def _entry(self, key: str) -> TensorEntry:
        return self._entries[self._where[key]][key]

    def keys(self) -> set[str]:
        """Stored names, with fused expert tensors listed under their per-expert names."""
        return listed_names(self._where, self._virtual)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._virtual:
            real, _, part = self._virtual[key]
            _, rows, cols = self._entry(real).shape
            return (rows // 2, cols) if part != "all" else (rows, cols)
        return self._entry(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(self._virtual[key][0] if key in self._virtual else key).dtype

    def nbytes(self, key: str) -> int:
        return math.prod(self.shape(key)) * self.dtype(key).itemsize

    def file_of(self, key: str) -> str:
        return self._where[self._virtual[key][0] if key in self._virtual else key]

    def location(self, key: str) -> tuple[str, int]:
        """(shard file, byte offset) of ``key``'s data: reading in this order is sequential on disk."""
        real = self._virtual[key][0] if key in self._virtual else key
        return self._where[real], self._entry(real).offset + self._virtual_offset(key)

    def _virtual_offset(self, key: str) -> int:
        if key not in self._virtual:
            return 0
        real, e, part = self._virtual[key]
        entry = self._entry(real)
        per_expert = entry.nbytes // entry.shape[0]
        return e * per_expert + (per_expert // 2 if part == "up" else 0)

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (a fresh CPU tensor; only this tensor is read)."""
        if key not in self._where and key not in self._virtual:
            raise KeyError(f"{self.directory}: no tensor {key!r}")
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        self.read_into(key, out)
        return out

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read ``key`` into ``out``, a contiguous CPU tensor of its shape and dtype (e.g. a view of a
        larger buffer: no intermediate copy)."""
        if tuple(out.shape) != self.shape(key) or out.dtype != self.dtype(key) or not out.is_contiguous():
            raise ValueError(f"{key}: cannot read {self.dtype(key)} {list(self.shape(key))} into a "
                             f"{'' if out.is_contiguous() else 'non-contiguous '}{out.dtype} {list(out.shape)}")
        real = self._virtual[key][0] if key in self._virtual else key
        file = self._where[real]
        try:
            pread_into(self._fd(file), out, self._entry(real).offset + self._virtual_offset(key))
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.directory / file}: cannot read {key!r}: {e}") from None

    def byte_range(self, key: str) -> tuple[int, int, int, str]:
        """``(fd, offset, nbytes, label)``: where ``key``'s bytes are, in an open file of this checkpoint
        (valid until :meth:`close`), to be copied without reading them into memory."""
        if key not in self._where and key not in self._virtual:
            raise KeyError(f"{self.directory}: no tensor {key!r}")
        real = self._virtual[key][0] if key in self._virtual else key
        file = self._where[real]
        return (self._fd(file), self._entry(real).offset + self._virtual_offset(key), self.nbytes(key),
                f"{self.directory / file}: {key!r}")

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            fd = os.open(self.directory / file, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger kernel read-ahead
            self._fds[file] = fd
        return self._fds[file]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


# Weights a checkpoint may keep in float32 when the rest is in the config's dtype (spec 3.7: stacks keep
# the GDN decay parameters in fp32 under bf16 training).
FP32_ALLOWED = ("linear_attn.A_log", "linear_attn.dt_bias")
_FLOAT = (torch.bfloat16, torch.float16, torch.float32)


def config_dtype(hf_config: dict) -> torch.dtype | None:
    """The dtype a HF ``config.json`` declares (``dtype`` or legacy ``torch_dtype``), if any."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name)


def check_against_config(ckpt: HFCheckpoint, expected: dict[str, tuple[int, ...]], *,
                         dtype: torch.dtype | None = None, allow_extra: bool = False) -> list[str]:
    """Validate ``ckpt`` against the expected names/shapes (:func:`.mapping.expected_hf_shapes`).

    Every expected tensor must be present with its shape; floating dtypes only, and ``dtype`` (the
    config's) for all but :data:`FP32_ALLOWED` weights, which may also be float32. Unknown tensors raise
    unless ``allow_extra``. Returns the unknown names (skipped). Raises ValueError naming the key.
    """
    present = ckpt.keys()
    missing = sorted(set(expected) - present)
    if missing:
        raise ValueError(f"{ckpt.directory}: {len(missing)} expected tensors are missing, e.g. {missing[:3]}")
    extra = sorted(present - set(expected))
    if extra and not allow_extra:
        raise ValueError(f"{ckpt.directory}: {len(extra)} unknown tensors, e.g. {extra[:3]} "
                         "(pass --allow-extra / allow_extra=True to skip them)")
    for key, shape in expected.items():
        where = ckpt.directory / ckpt.file_of(key)
        if ckpt.shape(key) != tuple(shape):
            raise ValueError(f"{where}: {key} has shape {list(ckpt.shape(key))}, the config implies {list(shape)}")
        got = ckpt.dtype(key)
        if got not in _FLOAT:
            raise ValueError(f"{where}: {key} has dtype {got}, expected a floating dtype (bf16, fp16, fp32)")
        if dtype is not None and got != dtype and not (got == torch.float32 and key.endswith(FP32_ALLOWED)):
            raise ValueError(f"{where}: {key} has dtype {got}, the config declares {dtype}")
    return extra
