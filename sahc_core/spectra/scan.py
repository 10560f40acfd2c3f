"""Spectrum scan of every 2-D weight of a model (or of one component): resumable, cached, tidy.

Each tensor's spectrum is committed to the cache as soon as it is computed, so an interrupted scan
(a crash, Ctrl-C, a progress callback raising) continues where it stopped: the next call reads the
finished tensors from the cache and computes only the rest.

A tensor whose spectrum is undefined (no elements, NaN or Inf values:
:class:`~sahc_core.errors.NumericalError`) does not stop the scan: its row carries the one-sentence
reason in the ``error`` column (statistics empty), the reason is cached like a spectrum (kind
``spectrum_error``, same fingerprint and version, so a changed file is looked at again), and the scan
goes on with the rest.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sahc_core.errors import NumericalError
from sahc_core.io.components import tensor_table
from sahc_core.io.dtypes import is_analysed
from sahc_core.spectra.spectrum import CACHE_KIND, SPECTRUM_VERSION, SpectrumResult, tensor_spectrum

if TYPE_CHECKING:
    from sahc_core.cache import Cache
    from sahc_core.io.source import ModelSource

#: progress(done, total, tensor_name, eta_seconds or None), called after each tensor is committed.
Progress = Callable[[int, int, str, "float | None"], Any]

_ID_COLUMNS = ["name", "component", "kind", "layer", "shape"]
#: Cache kind of the reason a tensor has no spectrum (value ``{"error": sentence}``).
ERROR_KIND = "spectrum_error"


def matrix_table(source: ModelSource, component: str | None = None) -> pd.DataFrame:
    """Rows of :func:`~sahc_core.io.components.tensor_table` for the weights that have a spectrum (ndim >= 2,
    stored as a float SAHC analyses: integer/boolean/8-bit tensors are left out, see :mod:`sahc_core.io.dtypes`).

    Raises
    ------
    ValueError
        If ``component`` names no component with a 2-D weight in this model.
    """
    table = tensor_table(source)
    table = table[(table["shape"].map(len) >= 2) & table["dtype"].map(is_analysed)]
    if component is not None:
        choices = sorted(table["component"].unique())
        if component not in choices:
            raise ValueError(f"component {component!r} has no 2-D weights in this model; choose one of {', '.join(choices)}.")
        table = table[table["component"] == component]
    return table.reset_index(drop=True)


def _cost(shape: tuple[int, ...]) -> float:
    """Relative cost of one spectrum, m·n·min(m, n) flops (the Gram product), for the ETA."""
    m, n = int(shape[0]), int(np.prod(shape[1:]))
    return float(m) * n * min(m, n)


def result_row(meta: dict, result: SpectrumResult) -> dict:
    """One tidy row: identity columns from the tensor table, then timing and all statistics."""
    row = {c: meta[c] for c in _ID_COLUMNS}
    row.update(matrix_shape=tuple(result.shape), note=result.note, device=result.device, cached=result.cached,
               seconds=result.seconds, compute_seconds=result.compute_seconds, error=None)
    row.update(result.stats)
    return row


def error_row(meta: dict, error: str, cached: bool, seconds: float = 0.0) -> dict:
    """The row of a tensor without a spectrum: identity columns and the reason, no statistics."""
    return {**{c: meta[c] for c in _ID_COLUMNS}, "matrix_shape": None, "note": None, "device": None,
            "cached": cached, "seconds": seconds, "compute_seconds": 0.0, "error": error}


def failed(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of a scan frame whose tensor has no spectrum (``name``, ``error``)."""
    if "error" not in df or df.empty:
        return pd.DataFrame(columns=["name", "error"])
    return df.loc[df["error"].notna(), ["name", "error"]].reset_index(drop=True)


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(rows)
    if df.empty:
        return pd.DataFrame(columns=_ID_COLUMNS)
    df["layer"] = df["layer"].astype("Int64")
    return df


def scan(source: ModelSource, component: str | None = None, cache: Cache | None = None, device: str = "auto",
         progress: Progress | None = None, adaptive_threads: bool = False) -> pd.DataFrame:
    """Spectrum statistics of every 2-D weight (1-D norms and biases are skipped).

    Parameters
    ----------
    source : ModelSource
        The model; tensors are read one at a time.
    component : str, optional
        Restrict to one component (``"ffn"``, ``"attention_full"``, ...).
    cache : Cache, optional
        Where each finished tensor is committed (makes the scan resumable and a rerun instant).
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
    progress : callable, optional
        ``progress(done, total, name, eta_s)`` after each tensor; ``eta_s`` is ``None`` until a
        tensor has been computed. An exception it raises stops the scan (finished tensors stay cached).

    Returns
    -------
    pandas.DataFrame
        One row per tensor: ``name, component, kind, layer, shape, matrix_shape, note, device,
        cached, seconds, compute_seconds, error`` and every key of
        :func:`~sahc_core.spectra.spectrum.spectrum_stats` (empty where ``error`` says why; see
        :func:`failed`).
    """
    table = matrix_table(source, component)
    stored = _stored(cache, source.fingerprint) if cache is not None else {}
    errors = _stored(cache, source.fingerprint, ERROR_KIND) if cache is not None else {}
    todo_cost = sum(_cost(r.shape) for r in table.itertuples() if r.name not in stored and r.name not in errors)
    spent_cost, spent_s = 0.0, 0.0
    rows: list[dict] = []
    total = len(table)
    for i, meta in enumerate(table.to_dict(orient="records")):
        t0 = time.perf_counter()
        name = meta["name"]
        if name in stored:
            rows.append(result_row(meta, SpectrumResult.from_value(name, stored[name], True, time.perf_counter() - t0)))
        elif name in errors:
            rows.append(error_row(meta, errors[name]["error"], cached=True))
        else:
            try:
                result = tensor_spectrum(source, name, cache=cache, device=device, adaptive_threads=adaptive_threads)
            except NumericalError as exc:  # named, recorded, and the scan goes on
                rows.append(error_row(meta, str(exc), cached=False, seconds=time.perf_counter() - t0))
                if cache is not None:
                    cache.put(ERROR_KIND, source.fingerprint, name, SPECTRUM_VERSION, {"error": str(exc)})
            else:
                rows.append(result_row(meta, result))
            spent_cost += _cost(meta["shape"])
            spent_s += time.perf_counter() - t0
        if progress is not None:
            eta = spent_s / spent_cost * max(todo_cost - spent_cost, 0.0) if spent_cost > 0 else None
            progress(i + 1, total, meta["name"], eta)
    return _frame(rows)


def cached_scan(source: ModelSource, cache: Cache, component: str | None = None) -> pd.DataFrame:
    """The rows of :func:`scan` already in the cache, computing nothing (may be partial or empty)."""
    table = matrix_table(source, component)
    stored = _stored(cache, source.fingerprint)
    errors = _stored(cache, source.fingerprint, ERROR_KIND)
    rows = []
    for meta in table.to_dict(orient="records"):
        if meta["name"] in stored:
            rows.append(result_row(meta, SpectrumResult.from_value(meta["name"], stored[meta["name"]], True, 0.0)))
        elif meta["name"] in errors:
            rows.append(error_row(meta, errors[meta["name"]]["error"], cached=True))
    return _frame(rows)


def _stored(cache: Cache, model_fp: str, kind: str = CACHE_KIND) -> dict[str, dict]:
    """Every value of ``kind`` stored for this model fingerprint and version, in ONE query (name -> value)."""
    rows = cache.execute("SELECT key, value FROM results WHERE kind = ? AND model_fp = ? AND version = ?",
                         [kind, model_fp, SPECTRUM_VERSION])
    return {key: json.loads(value) for key, value in rows}


def results_frame(results: list[SpectrumResult]) -> pd.DataFrame:
    """A stats table (one row per result) for display and CSV download."""
    rows = []
    for r in results:
        row = {"name": r.tensor, "shape": tuple(r.shape), "note": r.note, "device": r.device,
               "cached": r.cached, "seconds": r.seconds}
        row.update(r.stats)
        rows.append(row)
    return pd.DataFrame.from_records(rows)
