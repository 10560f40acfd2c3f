"""Spectrum scan of every 2-D weight of a model (or of one component): resumable, cached, tidy.

Each tensor's spectrum is committed to the cache as soon as it is computed, so an interrupted scan
(a crash, Ctrl-C, a progress callback raising) continues where it stopped: the next call reads the
finished tensors from the cache and computes only the rest. :func:`scan_status` says which tensors
are done and how long the rest should take (from the measured time per shape); on CUDA same-shape
tensors are batched (:mod:`sahc_core.spectra.batched`); :func:`sahc_core.runs.distributed.ray_scan`
spreads the tensors over a Ray cluster.

A tensor whose spectrum is undefined (no elements, NaN or Inf values:
:class:`~sahc_core.errors.NumericalError`) does not stop the scan: its row carries the one-sentence
reason in the ``error`` column (statistics empty), the reason is cached like a spectrum (kind
``spectrum_error``, same fingerprint and version, so a changed file is looked at again), and the scan
goes on with the rest.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sahc_core.device import resolve_device
from sahc_core.errors import NumericalError
from sahc_core.io.components import tensor_table
from sahc_core.io.dtypes import is_analysed
from sahc_core.io.rows import is_bounded
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
    """Relative cost of one spectrum, m·n·min(m, n) flops (the Gram product), for shapes not timed yet."""
    m, n = int(shape[0]), int(np.prod(shape[1:]))
    return float(m) * n * min(m, n)


class Eta:
    """Remaining seconds of a scan from the MEASURED time per tensor shape.

    A shape already timed (in this scan, or in ``prior``: cached results of earlier scans on the same
    device) costs its mean; a shape not timed yet costs ``_cost(shape)`` times the seconds per cost
    unit measured so far. ``remaining()`` is ``None`` until something has been timed.
    """

    def __init__(self, todo: list[tuple[int, ...]], prior: dict[tuple, list[float]] | None = None) -> None:
        self.todo = Counter(tuple(int(d) for d in s) for s in todo)
        self._seen: dict[tuple, list[float]] = {k: list(v) for k, v in (prior or {}).items()}
        self.spent = 0.0  # seconds measured in this scan

    def done(self, shape: tuple[int, ...], seconds: float) -> None:
        key = tuple(int(d) for d in shape)
        self._seen.setdefault(key, []).append(float(seconds))
        self.spent += float(seconds)
        if self.todo[key] > 0:
            self.todo[key] -= 1

    def seconds_each(self, shape: tuple[int, ...]) -> float | None:
        """The measured mean seconds of one tensor of ``shape`` (``None``: not timed yet)."""
        t = self._seen.get(tuple(int(d) for d in shape))
        return sum(t) / len(t) if t else None

    def estimate(self, shape: tuple[int, ...]) -> float | None:
        """Seconds one tensor of ``shape`` should take: measured, else scaled from the other shapes."""
        each = self.seconds_each(shape)
        if each is not None:
            return each
        timed = [(k, t) for k, t in self._seen.items() if t]
        cost = sum(_cost(k) * len(t) for k, t in timed)
        return sum(sum(t) for _, t in timed) / cost * _cost(shape) if cost > 0 else None

    def remaining(self) -> float | None:
        """Seconds the tensors not done yet should take one after the other (``None`` before any timing)."""
        if not any(self._seen.values()):
            return None
        return sum(n * (self.estimate(k) or 0.0) for k, n in self.todo.items() if n > 0)


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
         progress: Progress | None = None, adaptive_threads: bool = False, batch: bool | None = None,
         batch_bytes: int | None = None) -> pd.DataFrame:
    """Spectrum statistics of every 2-D weight (1-D norms and biases are skipped).

    Parameters
    ----------
    source : ModelSource
        The model; tensors are read one at a time (or one same-shape batch at a time).
    component : str, optional
        Restrict to one component (``"ffn"``, ``"attention_full"``, ...).
    cache : Cache, optional
        Where each finished tensor is committed (makes the scan resumable and a rerun instant).
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
    progress : callable, optional
        ``progress(done, total, name, eta_s)`` after each tensor (cached ones first); ``eta_s`` comes
        from the measured time per shape (:class:`Eta`, primed by the cache's earlier timings on the
        same device) and is ``None`` until one is known. An exception it raises stops the scan
        (finished tensors stay cached).
    batch : bool, optional
        Stack same-shape tensors (:mod:`sahc_core.spectra.batched`); default: on CUDA only. Tensors
        above ``io.rows.BOUNDED_MIN_BYTES`` always go one by one (blocked Gram).
    batch_bytes : int, optional
        Device bytes per batch (default ``batched.DEFAULT_BATCH_BYTES``).

    Returns
    -------
    pandas.DataFrame
        One row per tensor: ``name, component, kind, layer, shape, matrix_shape, note, device,
        cached, seconds, compute_seconds, error`` and every key of
        :func:`~sahc_core.spectra.spectrum.spectrum_stats` (empty where ``error`` says why; see
        :func:`failed`).
    """
    table = matrix_table(source, component)
    metas = table.to_dict(orient="records")
    stored = stored_spectra(cache, source.fingerprint) if cache is not None else {}
    errors = stored_spectra(cache, source.fingerprint, ERROR_KIND) if cache is not None else {}
    dev = resolve_device(device)
    eta = Eta([m["shape"] for m in metas if m["name"] not in stored and m["name"] not in errors],
              _timings(stored, dev))
    results: dict[str, SpectrumResult | dict] = {}
    total = len(metas)

    def finish(meta: dict, result: SpectrumResult | dict) -> None:
        results[meta["name"]] = result
        if isinstance(result, SpectrumResult) and not result.cached:
            eta.done(meta["shape"], result.compute_seconds)
        elif isinstance(result, dict) and not result["cached"]:
            eta.done(meta["shape"], result["seconds"])
        if progress is not None:
            progress(len(results), total, meta["name"], eta.remaining())

    for meta in metas:
        if meta["name"] in stored:
            finish(meta, SpectrumResult.from_value(meta["name"], stored[meta["name"]], True, 0.0))
        elif meta["name"] in errors:
            finish(meta, {"error": errors[meta["name"]]["error"], "cached": True, "seconds": 0.0})
    todo = [m for m in metas if m["name"] not in results]
    if (dev.startswith("cuda") if batch is None else batch) and todo:
        from sahc_core.spectra.batched import DEFAULT_BATCH_BYTES, iter_batches

        by_name = {m["name"]: m for m in todo}
        small = [source.info(m["name"]) for m in todo if not is_bounded(source.info(m["name"]))
                 and math.prod(source.info(m["name"]).shape) > 0]
        for info, value in iter_batches(source, small, dev, batch_bytes or DEFAULT_BATCH_BYTES):
            if not all(math.isfinite(s) for s in value["singular_values"]):
                continue  # a NaN / Inf tensor: the per-tensor path below names it
            if cache is not None:
                cache.put(CACHE_KIND, source.fingerprint, info.name, SPECTRUM_VERSION, value)
            finish(by_name[info.name], SpectrumResult.from_value(info.name, value, False, value["compute_seconds"]))
        todo = [m for m in todo if m["name"] not in results]
    for meta in todo:
        t0 = time.perf_counter()
        try:
            result = tensor_spectrum(source, meta["name"], cache=cache, device=dev, adaptive_threads=adaptive_threads)
        except NumericalError as exc:  # named, recorded, and the scan goes on
            record_error(cache, source.fingerprint, meta["name"], str(exc))
            finish(meta, {"error": str(exc), "cached": False, "seconds": time.perf_counter() - t0})
        else:
            finish(meta, result)
    return finished_frame(metas, results)


def record_error(cache: Cache | None, model_fp: str, name: str, error: str) -> None:
    """Cache the one-sentence reason tensor ``name`` has no spectrum (kind :data:`ERROR_KIND`)."""
    if cache is not None:
        cache.put(ERROR_KIND, model_fp, name, SPECTRUM_VERSION, {"error": error})


def finished_frame(metas: list[dict], results: dict[str, SpectrumResult | dict]) -> pd.DataFrame:
    """The scan's rows, in the table's order, of the tensors in ``results`` (a dict ``{error, cached,
    seconds}`` is a tensor without a spectrum)."""
    rows = []
    for meta in metas:
        r = results.get(meta["name"])
        if isinstance(r, SpectrumResult):
            rows.append(result_row(meta, r))
        elif r is not None:
            rows.append(error_row(meta, r["error"], cached=r["cached"], seconds=r["seconds"]))
    return _frame(rows)


def _timings(stored: dict[str, dict], device: str) -> dict[tuple, list[float]]:
    """Measured seconds per matrix shape of the cached spectra computed on ``device`` (an ETA's prior)."""
    out: dict[tuple, list[float]] = {}
    for value in stored.values():
        if value.get("device") == device and "batched" not in value.get("stats", {}):
            out.setdefault(tuple(value.get("tensor_shape", value["shape"])), []).append(float(value["compute_seconds"]))
    return out


def scan_status(source: ModelSource, cache: Cache | None, component: str | None = None,
                device: str = "auto") -> dict:
    """Which tensors a scan has done (in the cache) and how long the rest should take, computing nothing.

    Returns
    -------
    dict
        ``total``, ``done`` (spectra and recorded reasons), ``failed`` (tensors without a spectrum),
        ``todo`` (names, table order), ``eta_seconds`` (serial, from the measured time per shape on
        ``device``; ``None`` before anything was timed there) and ``shapes``: one row per (shape, dtype)
        with ``done``, ``todo``, ``seconds_each`` (measured mean or ``None``) and ``estimated_seconds``
        (what one more tensor of that shape should take).
    """
    table = matrix_table(source, component)
    stored = stored_spectra(cache, source.fingerprint) if cache is not None else {}
    errors = stored_spectra(cache, source.fingerprint, ERROR_KIND) if cache is not None else {}
    known = stored.keys() | errors.keys()
    eta = Eta([r.shape for r in table.itertuples() if r.name not in known], _timings(stored, resolve_device(device)))
    shapes: dict[tuple, dict] = {}
    for r in table.itertuples():
        row = shapes.setdefault((tuple(r.shape), source.info(r.name).dtype),
                                {"shape": list(r.shape), "dtype": source.info(r.name).dtype, "done": 0, "todo": 0})
        row["done" if r.name in known else "todo"] += 1
    for (shape, _), row in shapes.items():
        row.update(seconds_each=eta.seconds_each(shape), estimated_seconds=eta.estimate(shape))
    return {"total": len(table), "done": sum(r.name in known for r in table.itertuples()),
            "failed": sum(r.name in errors for r in table.itertuples()),
            "todo": [r.name for r in table.itertuples() if r.name not in known], "eta_seconds": eta.remaining(),
            "shapes": list(shapes.values())}


def scan_status_line(status: dict) -> str:
    """``Scan: done/total tensors done · ETA x min`` of a :func:`scan_status` (no ETA once nothing is left)."""
    eta = status["eta_seconds"]
    eta_txt = "" if not status["todo"] else (" · ETA unknown until a tensor is timed on this device" if eta is None
                                             else f" · ETA {eta / 60:.1f} min")
    return f"Scan: {status['done']}/{status['total']} tensors done{eta_txt}"


def cached_scan(source: ModelSource, cache: Cache, component: str | None = None) -> pd.DataFrame:
    """The rows of :func:`scan` already in the cache, computing nothing (may be partial or empty)."""
    table = matrix_table(source, component)
    stored = stored_spectra(cache, source.fingerprint)
    errors = stored_spectra(cache, source.fingerprint, ERROR_KIND)
    rows = []
    for meta in table.to_dict(orient="records"):
        if meta["name"] in stored:
            rows.append(result_row(meta, SpectrumResult.from_value(meta["name"], stored[meta["name"]], True, 0.0)))
        elif meta["name"] in errors:
            rows.append(error_row(meta, errors[meta["name"]]["error"], cached=True))
    return _frame(rows)


def stored_spectra(cache: Cache, model_fp: str, kind: str = CACHE_KIND) -> dict[str, dict]:
    """Every value of ``kind`` (spectra, or :data:`ERROR_KIND` reasons) stored for this model fingerprint
    and version, in ONE query (name -> value)."""
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
