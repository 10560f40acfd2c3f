"""Distributed work on a Ray cluster: one task per tensor, the driver the only DuckDB writer.

``scan --ray auto|local[:N]|ADDRESS`` (and :func:`ray_scan`) sends one Ray task per tensor that the
cache does not hold yet. Each worker opens the model from its path itself (shared storage: every
node sees the same directory; the fingerprint it reads must equal the driver's) and returns the
spectrum's cache value (:func:`sahc_core.spectra.spectrum.spectrum_value`: a plain dict, the
singular values and statistics). The driver takes results as they finish (``ray.wait``), commits
each to the cache at once and reports progress with an ETA, so an interrupted distributed scan (a
killed driver, Ctrl-C) continues where it stopped: the next call sends only the missing tensors.
Tasks ask for one GPU each (``num_gpus=1``) when the cluster has GPUs, else one CPU; a worker that
dies is retried by Ray (``max_retries``), and since a result is only written by the driver, under its
primary key, no row is lost or written twice.

Addresses: ``"local"`` / ``"local:N"`` start a private local cluster (N CPUs; shut down afterwards),
``"auto"`` joins the cluster this machine is part of (``ray start --head`` / ``ray start --address``),
anything else is a cluster address (``"10.0.0.1:6379"``, ``"ray://head:10001"``). A session that is
already connected (``ray.is_initialized()``) is used as it is. Ray is optional at install time
(the ``ray`` extra); without it a clear error names the extra.

The driver loop (connect, task resources, retries, ``ray.wait``, commit callback, cancel on
interrupt, error wrapping) is :func:`run_tasks`, shared with the plan optimizer's candidate
measurements (:mod:`sahc_core.plans._ray_candidates`, ``optimize --ray``). Scan workers import
:mod:`sahc_core.spectra.spectrum` and :mod:`sahc_core.io` only (never Streamlit).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from sahc_core.errors import NumericalError, SahcError
from sahc_core.spectra.scan import (ERROR_KIND, Eta, Progress, finished_frame, matrix_table, record_error,
                                    stored_spectra)
from sahc_core.spectra.spectrum import CACHE_KIND, SPECTRUM_VERSION, SpectrumResult, spectrum_value

if TYPE_CHECKING:
    from sahc_core.cache import Cache
    from sahc_core.io.source import ModelSource

#: Task attempts after a worker dies (Ray's own retry of system failures).
MAX_RETRIES = 3
RAY_EXTRA = "pip install 'sahc-explorer[ray]' (or: pip install ray==2.60.0)"


class DistributedError(SahcError):
    """A distributed scan could not start or a task failed for good."""


def _ray():
    try:
        import ray
    except ImportError:
        raise DistributedError(f"distributed scans need Ray, which is not installed; install the extra: {RAY_EXTRA}.") from None
    return ray


def parse_address(address: str) -> dict:
    """``ray.init`` keywords of an address: ``local[:N]``, ``auto`` or a cluster address."""
    text = str(address).strip()
    if text == "local" or text.startswith("local:"):
        n = text.partition(":")[2]
        if n and not (n.isdigit() and int(n) >= 1):
            raise ValueError(f"--ray local:N takes a positive number of CPUs, got {address!r}.")
        return {"num_cpus": int(n) if n else None, "include_dashboard": False}
    if not text:
        raise ValueError("--ray takes auto, local[:N] or a cluster address, got an empty string.")
    return {"address": text}


def check_address(address: str) -> None:
    """What a distributed command checks before any work: ``address`` parses and Ray is installed."""
    parse_address(address)
    _ray()


def connect(address: str) -> bool:
    """Connect to (or start) the cluster of ``address``; True when this call started the session."""
    ray = _ray()
    if ray.is_initialized():
        return False
    kwargs = parse_address(address)
    try:
        ray.init(**kwargs, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        raise DistributedError(f"cannot reach the Ray cluster at {address!r} ({exc}); start one with `ray start --head` "
                               "or use --ray local.") from exc
    return True


@dataclass(frozen=True)
class Running:
    """What a commit callback of :func:`run_tasks` may ask about the run: tasks at once, start time."""

    parallel: float
    t0: float

    def speedup(self, spent: float) -> float:
        """Observed speed-up of ``spent`` task seconds so far over the wall time (1 .. ``parallel``)."""
        wall = time.perf_counter() - self.t0
        return min(self.parallel, max(1.0, spent / wall)) if wall > 0 else 1.0


def run_tasks(address: str, task: Callable[..., Any], jobs: Sequence[tuple[str, tuple, dict]],
              commit: Callable[[str, Any, Running], None], *, what: str, device: str = "auto",
              shared: Mapping[str, Any] | None = None, max_retries: int = MAX_RETRIES) -> None:
    """Run one Ray task per job and hand each result to ``commit`` on the driver as it finishes.

    Each job ``(name, args, kwargs)`` runs ``task(*args, device, **kwargs, **shared)`` in a worker:
    ``device`` is the workers' device (``"auto"``: ``cuda`` when the cluster has GPUs, else ``cpu``),
    ``shared`` values are ``ray.put`` once and reach every task as the value. Tasks ask for one GPU
    each when the cluster has GPUs, else one CPU; Ray retries a task whose worker died
    (``max_retries``). ``commit(name, value, running)`` runs on the driver as each result arrives
    (``ray.wait``), so what it stores is kept when the run stops; an exception there (an interrupt, a
    progress callback) cancels every pending task and propagates. A task that fails for good is a
    :class:`DistributedError` naming ``what`` and the job (e.g. ``"the spectrum of" NAME``).
    Connects to (or starts) the cluster of ``address`` (:func:`connect`) and shuts down only a
    session it started.
    """
    ray = _ray()
    if not jobs:
        return
    started = connect(address)
    try:
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        options = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
        dev = ("cuda" if gpus >= 1 else "cpu") if device == "auto" else device
        parallel = max(1.0, gpus if gpus >= 1 else float(resources.get("CPU", 1)))
        common = {k: ray.put(v) for k, v in (shared or {}).items()}  # once, not once per task
        remote = ray.remote(max_retries=max_retries)(task).options(**options)
        refs = {remote.remote(*args, dev, **kwargs, **common): name for name, args, kwargs in jobs}
        running = Running(parallel, time.perf_counter())
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                name = refs[ready[0]]
                try:
                    value = ray.get(ready[0])
                except ray.exceptions.RayError as exc:
                    cause = getattr(exc, "cause", None) or exc  # a task's own exception, else Ray's
                    raise DistributedError(f"{what} {name} failed on the cluster ({type(cause).__name__}: "
                                           f"{str(cause).splitlines()[0] if str(cause) else ''}); rerun to resume "
                                           "(finished tensors are cached).") from exc
                commit(name, value, running)
        except BaseException:
            for ref in pending:  # an interrupted driver leaves no work running on the cluster
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


def open_checked(model_path: str, fingerprint: str) -> ModelSource:
    """The model at ``model_path`` as a worker sees it; refused unless its fingerprint is the driver's."""
    from sahc_core.io.source import ModelSource

    source = ModelSource.open(model_path)
    if source.fingerprint != fingerprint:
        raise DistributedError(f"the model at {model_path} on this node differs from the driver's (fingerprint "
                               f"{source.fingerprint[:12]} vs {fingerprint[:12]}); every node must see the same files.")
    return source


def spectrum_task(model_path: str, name: str, fingerprint: str, device: str) -> dict:
    """One worker's job: the cache value of tensor ``name`` of the model at ``model_path``."""
    source = open_checked(model_path, fingerprint)
    try:
        return spectrum_value(source, name, device=device)
    except NumericalError as exc:  # a NaN / Inf / empty tensor: its reason goes back to the driver, the scan goes on
        return {"error": str(exc)}


def ray_scan(source: ModelSource, component: str | None = None, cache: Cache | None = None,
             address: str = "local", device: str = "auto", progress: Progress | None = None,
             max_retries: int = MAX_RETRIES, task: Callable[[str, str, str, str], dict] = spectrum_task
             ) -> pd.DataFrame:
    """:func:`sahc_core.spectra.scan.scan` with one Ray task per missing tensor (see the module docstring).

    Parameters
    ----------
    source, component, cache, progress
        As :func:`~sahc_core.spectra.scan.scan`; ``progress(done, total, name, eta_s)`` after each commit.
    address : str
        ``"local"``, ``"local:N"``, ``"auto"`` or a cluster address.
    device : str
        Device of the workers: ``"auto"`` uses the task's GPU when the cluster has GPUs, else CPU.
    max_retries : int
        Attempts Ray makes after a worker process dies.
    task : callable
        The per-tensor work ``task(model_path, name, fingerprint, device) -> cache value``
        (default :func:`spectrum_task`); runs in the workers.

    Returns
    -------
    pandas.DataFrame
        The rows :func:`~sahc_core.spectra.scan.scan` returns, in the table's order.
    """
    _ray()  # a missing extra is named before anything is read
    table = matrix_table(source, component)
    stored = stored_spectra(cache, source.fingerprint) if cache is not None else {}
    errors = stored_spectra(cache, source.fingerprint, ERROR_KIND) if cache is not None else {}
    metas = table.to_dict(orient="records")
    results: dict[str, SpectrumResult | dict] = {}
    eta = Eta([tuple(m["shape"]) for m in metas if m["name"] not in stored and m["name"] not in errors])
    done, total = 0, len(metas)
    for meta in metas:
        if meta["name"] in stored or meta["name"] in errors:
            results[meta["name"]] = (
                SpectrumResult.from_value(meta["name"], stored[meta["name"]], True, 0.0) if meta["name"] in stored
                else {"error": errors[meta["name"]]["error"], "cached": True, "seconds": 0.0})
            done += 1
            if progress is not None:
                progress(done, total, meta["name"], eta.remaining())
    by_name = {m["name"]: m for m in metas if m["name"] not in results}

    def commit(name: str, value: dict, running: Running) -> None:
        nonlocal done
        meta = by_name[name]
        if "error" in value:  # no spectrum: the reason is recorded like one (spectra.scan.ERROR_KIND)
            record_error(cache, source.fingerprint, name, value["error"])
            results[name] = {"error": value["error"], "cached": False, "seconds": 0.0}
        else:
            if cache is not None:  # the driver is the only writer: commit at once (resumable)
                cache.put(CACHE_KIND, source.fingerprint, name, SPECTRUM_VERSION, value)
            results[name] = SpectrumResult.from_value(name, value, False, float(value["compute_seconds"]))
            eta.done(tuple(meta["shape"]), float(value["compute_seconds"]))
        done += 1
        if progress is not None:
            rem = eta.remaining()
            progress(done, total, name, None if rem is None else rem / running.speedup(eta.spent))

    run_tasks(address, task, [(n, (str(source.path), n, source.fingerprint), {}) for n in by_name], commit,
              what="the spectrum of", device=device, max_retries=max_retries)
    return finished_frame(metas, results)
