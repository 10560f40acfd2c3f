"""Lazy re-exports for package ``__init__`` files (PEP 562), so importing a package imports nothing.

Each ``__init__`` lists its public names by module; a name is imported on first access.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, api: Mapping[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for ``package`` from ``{module: (name, ...)}`` (module relative to it)."""
    where = {name: module for module, names in api.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(where)
