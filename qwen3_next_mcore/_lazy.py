"""Lazy package exports (PEP 562), so importing a package does not import torch or megatron-core."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the module defining it
    (absolute, or relative to ``package``); a name equal to its module's last part is the module itself."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        full = module if module.startswith("qwen3_next_mcore") else f"{package}.{module}"
        mod = importlib.import_module(full)
        return mod if full.endswith("." + name) else getattr(mod, name)

    def __dir__() -> list[str]:
        return sorted(list(namespace) + list(exports))

    return __getattr__, __dir__
