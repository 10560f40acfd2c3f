"""One JSON sanitizer for the cache, the gate log and the CLI (their contracts differ in two places).

:func:`jsonable` turns numpy / torch / pandas values, paths, sets, dataclasses and timestamps into
plain JSON values. Parameters say what the caller's contract needs:

- ``nonfinite``: ``"keep"`` (the cache stores NaN/Infinity tokens, DuckDB's JSON reads them back),
  ``"null"`` (gate evidence: a non-finite number becomes ``null``), ``"string"`` (the CLI's
  ``--json`` line must be strict JSON: NaN becomes ``null``, ±inf the strings ``"inf"``/``"-inf"``);
- ``strict``: raise ``TypeError`` for a value of an unknown type (the cache, so nothing is silently
  stored as text) or store ``str(value)`` (the CLI and gate evidence, which only display it).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_NONFINITE = ("keep", "null", "string")


def _float(x: float, nonfinite: str) -> Any:
    if math.isfinite(x) or nonfinite == "keep":
        return x
    if nonfinite == "null" or math.isnan(x):
        return None
    return "inf" if x > 0 else "-inf"


def jsonable(obj: Any, nonfinite: str = "keep", strict: bool = False) -> Any:
    """A plain-JSON copy of ``obj`` (see the module docstring for ``nonfinite`` and ``strict``)."""
    if nonfinite not in _NONFINITE:
        raise ValueError(f"nonfinite must be one of {', '.join(_NONFINITE)}, got {nonfinite!r}.")
    return _convert(obj, nonfinite, strict)


def _convert(obj: Any, nonfinite: str, strict: bool) -> Any:
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return _float(float(obj), nonfinite)
    if isinstance(obj, Mapping):
        return {str(k): _convert(v, nonfinite, strict) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_convert(v, nonfinite, strict) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [_convert(v, nonfinite, strict) for v in sorted(obj)]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _convert(dataclasses.asdict(obj), nonfinite, strict)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy array or scalar, torch tensor
        return _convert(obj.tolist(), nonfinite, strict)
    if hasattr(obj, "item") and callable(obj.item):
        return _convert(obj.item(), nonfinite, strict)
    if hasattr(obj, "isoformat"):  # pandas Timestamp
        return obj.isoformat()
    try:  # pandas NA / NaT
        import pandas as pd

        if pd.isna(obj):
            return None
    except (TypeError, ValueError, ImportError):
        pass
    if strict:
        raise TypeError(f"value of type {type(obj).__name__} cannot be stored as JSON")
    return str(obj)
