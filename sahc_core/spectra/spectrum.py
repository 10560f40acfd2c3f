"""Singular-value spectra of weight matrices: values, statistics, rank-vs-error curve, one tensor.

Pure array functions first (:func:`as_matrix`, :func:`singular_values`, :func:`rank_error_curve`,
:func:`min_rank`, :func:`spectrum_stats`, :func:`marchenko_pastur_edges`), then the thin wrapper
:func:`tensor_spectrum` that reads ONE tensor of a :class:`~sahc_core.io.source.ModelSource` and
caches the result in DuckDB. Whole-model scans live in :mod:`sahc_core.spectra.scan` (:func:`scan`).
The statistics are implemented in :mod:`sahc_core.spectra._stats` and the ``gram64`` kernel (Gram
matrix, eigensolver threads, error estimate) in :mod:`sahc_core.spectra._gram`; the statistics are
re-exported here.

Accuracy contract: every method returns singular values whose error, relative to σ_max, is below
1e-5 against ``numpy.linalg.svd`` in float64 (tests/test_spectrum.py).

Methods (``method=``)
  ``"gram64"``  eigenvalues of the smaller Gram matrix WᵀW (or WWᵀ) formed and diagonalised in
               float64, σ = sqrt(λ). Float32 products are exact in float64; the rounding of the sums
               and of ``eigvalsh`` perturbs λ by δλ ≲ ε₆₄(√m‖W‖_F² + √n σ_max²), so
               |Δσ_i| ≲ δλ / (σ_i + √δλ) ≤ √δλ. That is far below 1e-5·σ_max unless the spectrum is
               flat AND has (near-)zero values, which the a-posteriori estimate detects.
  ``"svd32"``   ``torch.linalg.svdvals`` in float32 (backward stable: |Δσ_i| ≲ p(n)·ε₃₂·σ_max).
  ``"svd64"``   ``torch.linalg.svdvals`` in float64 (the slow, reference-grade path).
  ``"auto"``    ``gram64``, falling back to ``svd64`` when the estimate exceeds ``_GRAM_TOL``.

References
----------
.. [1] Eckart & Young, "The approximation of one matrix by another of lower rank", 1936.
.. [2] Roy & Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO 2007.
.. [3] Marchenko & Pastur, "Distribution of eigenvalues for some sets of random matrices", 1967.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sahc_core.device import resolve_device
from sahc_core.errors import ModelError, NumericalError
from sahc_core.io.rows import is_bounded, memory_bound
from sahc_core.metrics import check_finite
from sahc_core.spectra._gram import _eigvalsh, _gram64, _gram_error_estimate
from sahc_core.spectra._stats import (ERROR_LEVELS, REPORT_RANKS, marchenko_pastur_edges,  # noqa: F401  (public here)
                                      min_rank, numerical_rank, rank_error_curve, spectrum_stats)

if TYPE_CHECKING:
    from sahc_core.cache import Cache
    from sahc_core.io.source import ModelSource

#: Bump when any stored number changes meaning; old cache rows are then ignored, never shown.
SPECTRUM_VERSION = 1
#: Cache ``kind`` of a stored spectrum.
CACHE_KIND = "spectrum"
METHODS = ("auto", "gram64", "svd32", "svd64")
#: Largest a-posteriori error estimate (relative to σ_max) accepted from the Gram path; 10x below
#: the 1e-5 accuracy contract because the estimate is a typical, not a worst-case, bound.
_GRAM_TOL = 1e-6
#: What a NaN / Inf / empty tensor makes impossible (the end of the :class:`NumericalError` sentence).
_UNDEFINED = "its singular-value spectrum is undefined"


# ------------------------------------------------------------------------------- pure numerics
def as_matrix(W: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """View a weight as a 2-D matrix ``(out, in)``; N-D weights are reshaped ``(d0, d1*d2*...)``.

    Returns
    -------
    (torch.Tensor, str or None)
        The 2-D view and a note saying how it was reshaped (``None`` for a 2-D weight).
    """
    if W.ndim < 2:
        raise ValueError(f"a {W.ndim}-D tensor (a norm, bias or scalar) has no singular-value spectrum; pick a 2-D weight.")
    if W.ndim == 2:
        return W, None
    shape = tuple(int(d) for d in W.shape)
    rows, cols = shape[0], int(np.prod(shape[1:]))
    if W.ndim == 3 and shape[1] == 1:  # depthwise conv1d (C, 1, K), e.g. Gated-DeltaNet's conv1d
        note = f"conv1d weight {shape} = (C, 1, K) reshaped to (C, K) = ({rows}, {cols})"
    else:
        note = f"{W.ndim}-D weight {shape} reshaped to (d0, d1*...*dk) = ({rows}, {cols})"
    return W.reshape(rows, cols), note


def _singular_values(W: torch.Tensor, device: str = "auto", method: str = "auto",
                     adaptive_threads: bool = False, what: str = "the matrix") -> tuple[np.ndarray, str]:
    """Singular values (float64, descending) and the method actually used.

    NaN / Inf entries raise :class:`~sahc_core.errors.NumericalError` naming ``what`` (the Gram path
    sees them on the Gram diagonal, the squared column norms, so a finite matrix costs no extra pass).
    """
    if method not in METHODS:
        raise ValueError(f"unknown spectrum method {method!r}; use one of {', '.join(METHODS)}.")
    M, _ = as_matrix(W)
    dev = resolve_device(device)
    if M.numel() == 0:
        return np.zeros(0), method
    M = M.to(dev)
    if not M.dtype.is_floating_point or M.dtype not in (torch.float32, torch.float64):
        M = M.to(torch.float32)  # bf16 / fp16 / ints: exact in float32
    if method in ("auto", "gram64"):
        G = _gram64(M)
        if not bool(torch.isfinite(torch.diagonal(G)).all()):
            check_finite(M, what, _UNDEFINED)
            raise NumericalError(f"{what} has entries so large that its Gram matrix overflows float64, so "
                                 f"{_UNDEFINED}; rescale the tensor.", math.inf)
        lam = _eigvalsh(G, adaptive_threads)  # ascending, float64
        s = torch.sqrt(torch.clamp(lam, min=0.0)).flip(0).cpu().numpy()
        if method == "gram64" or _gram_error_estimate(s, tuple(M.shape)) <= _GRAM_TOL:
            return s, "gram64"
        method = "svd64"
    else:
        check_finite(M, what, _UNDEFINED)
    dtype = torch.float32 if method == "svd32" else torch.float64
    s = torch.linalg.svdvals(M.to(dtype)).to(torch.float64).cpu().numpy()
    return s, method


def singular_values(W: torch.Tensor, device: str = "auto", method: str = "auto") -> np.ndarray:
    """All min(m, n) singular values of a weight, float64, descending.

    Parameters
    ----------
    W : torch.Tensor
        Any weight; N-D weights are reshaped by :func:`as_matrix`; any float dtype.
    device : str
        ``"auto"`` (cuda when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    method : str
        ``"auto"``, ``"gram64"``, ``"svd32"`` or ``"svd64"`` (see the module docstring).
    """
    return _singular_values(W, device, method)[0]


# ---------------------------------------------------------------------------- one model tensor
@dataclass(frozen=True)
class SpectrumResult:
    """The spectrum of one model tensor.

    ``seconds`` is the wall time of the call that returned this result (milliseconds when
    ``cached``); ``compute_seconds`` and ``device`` describe the computation that produced it.
    """

    tensor: str
    shape: tuple[int, int]
    note: str | None
    device: str
    seconds: float
    cached: bool
    singular_values: np.ndarray = field(repr=False)
    stats: dict
    method: str = "auto"
    compute_seconds: float = 0.0
    dtype: str = ""
    tensor_shape: tuple[int, ...] = ()

    @classmethod
    def from_value(cls, name: str, value: dict, cached: bool, seconds: float) -> SpectrumResult:
        """Rebuild a result from its stored cache value (the dict :func:`tensor_spectrum` puts)."""
        return cls(tensor=name, shape=tuple(value["shape"]), note=value["note"], device=value["device"],
                   seconds=seconds, cached=cached, singular_values=np.asarray(value["singular_values"], dtype=np.float64),
                   stats=dict(value["stats"]), method=value["method"], compute_seconds=float(value["compute_seconds"]),
                   dtype=value.get("dtype", ""), tensor_shape=tuple(value.get("tensor_shape", value["shape"])))

    def rank_error(self) -> np.ndarray:
        """EYM relative error e[r], r = 0..len(σ)."""
        return rank_error_curve(self.singular_values)

    def to_json(self) -> dict:
        """The CLI contract of ``spectrum`` (design.md) plus ``note``, ``cached``, ``mp``, timing."""
        st = self.stats
        return {
            "tensor": self.tensor, "shape": list(self.shape), "device": self.device,
            "seconds": self.seconds, "singular_values": self.singular_values.tolist(), "stats": dict(st),
            "rank_error": {"ranks": list(range(self.singular_values.size + 1)),
                           "rel_error": self.rank_error().tolist()},
            "min_rank": {str(eps): st[f"min_rank_{eps}"] for eps in ERROR_LEVELS},
            "note": self.note, "cached": self.cached,
            "mp": {"variance": st["mp_variance"], "lo": st["mp_lo"], "hi": st["mp_hi"],
                   "n_above": st["n_above_mp"], "n_outside": st["n_outside_mp"]},
            "method": self.method, "compute_seconds": self.compute_seconds, "dtype": self.dtype,
            "tensor_shape": list(self.tensor_shape),
        }


def cache_key(name: str, method: str = "auto") -> str:
    """Cache key of a tensor's spectrum: the tensor name (``name@method`` for a forced method)."""
    return name if method == "auto" else f"{name}@{method}"


def tensor_spectrum(source: ModelSource, name: str, cache: Cache | None = None, device: str = "auto",
                    method: str = "auto", adaptive_threads: bool = False) -> SpectrumResult:
    """Spectrum and statistics of ONE tensor of ``source`` (the only tensor read), cached.

    A tensor whose float32 copy exceeds ``io.rows.BOUNDED_MIN_BYTES`` (512 MiB: the 248,320 x 4,096
    embedding, not a 12,288 x 4,096 FFN matrix) is never read whole: its float64 Gram is accumulated
    from row blocks (:func:`sahc_core.spectra._blocked.spectrum_blocked`; peak = the Gram + one
    256 MiB block, 1.1 GB instead of 10.5 GB for the embedding), ``stats["blocked"]`` says so.
    ``adaptive_threads``: let the eigensolver pick its CPU thread count (see :func:`_eigvalsh`); only
    the CLI, which owns its process, sets it.

    The cache key is (``"spectrum"``, ``source.fingerprint``, tensor name, ``SPECTRUM_VERSION``):
    a changed model file changes the fingerprint, so a stale spectrum is never served.

    Raises
    ------
    ModelError
        If the tensor does not exist or is 1-D.
    NumericalError
        If the tensor has no elements or holds NaN / Inf values (the message names it).
    """
    t0 = time.perf_counter()
    _check_tensor(source, name, method)
    key = cache_key(name, method)
    hit = cache.get(CACHE_KIND, source.fingerprint, key, SPECTRUM_VERSION) if cache is not None else None
    if hit is not None:
        return SpectrumResult.from_value(name, hit, cached=True, seconds=time.perf_counter() - t0)
    value = spectrum_value(source, name, device, method, adaptive_threads)
    if cache is not None:
        cache.put(CACHE_KIND, source.fingerprint, key, SPECTRUM_VERSION, value)
    return SpectrumResult.from_value(name, value, cached=False, seconds=time.perf_counter() - t0)


def _check_tensor(source: ModelSource, name: str, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown spectrum method {method!r}; use one of {', '.join(METHODS)}.")
    info = source.info(name)
    if len(info.shape) < 2:
        raise ModelError(f"tensor {name!r} is {len(info.shape)}-D (a norm or bias) and has no spectrum; pick a 2-D weight.")
    if math.prod(info.shape) == 0:
        raise NumericalError(f"tensor {name!r} has no elements (shape {tuple(info.shape)}), so {_UNDEFINED}; "
                             "leave the tensor out or repair the checkpoint.")


def spectrum_value(source: ModelSource, name: str, device: str = "auto", method: str = "auto",
                   adaptive_threads: bool = False) -> dict:
    """The stored form of one tensor's spectrum (what :func:`tensor_spectrum` caches), computed, no cache.

    A plain JSON-able dict (``shape``, ``note``, ``device``, ``method``, ``compute_seconds``, ``dtype``,
    ``tensor_shape``, ``singular_values``, ``stats``): what a distributed scan's worker sends back.
    """
    t0 = time.perf_counter()
    _check_tensor(source, name, method)
    info = source.info(name)
    dev = resolve_device(device)
    extra: dict[str, Any] = {}
    if is_bounded(info):
        s, used, mean, note, extra = _bounded_values(source, name, dev, method)
        if not (np.isfinite(s).all() and math.isfinite(mean)):  # the blocked Gram of a NaN / Inf tensor
            raise NumericalError(f"tensor {name!r} holds NaN or Inf values (its blocked Gram matrix is not finite), "
                                 f"so {_UNDEFINED}; repair the checkpoint or leave the tensor out.", math.nan)
    else:
        W = source.read(name, device=dev)
        M, note = as_matrix(W)
        mean = float(M.mean(dtype=torch.float64)) if M.dtype.is_floating_point else float(M.double().mean())
        s, used = _singular_values(M, dev, method, adaptive_threads, what=f"tensor {name!r}")
        del W, M
    return make_value(info, s, used, mean, note, dev, time.perf_counter() - t0, extra)


def make_value(info: Any, s: np.ndarray, method: str, mean: float, note: str | None, device: str,
               seconds: float, extra: dict | None = None) -> dict:
    """The cache value of a spectrum from its parts (``info``: the tensor's ``TensorInfo``)."""
    shape = _matrix_shape(info.shape)
    value = {"shape": [int(d) for d in shape], "note": note, "device": device, "method": method,
             "compute_seconds": seconds, "dtype": info.dtype, "tensor_shape": [int(d) for d in info.shape],
             "singular_values": np.asarray(s, dtype=np.float64).tolist(), "stats": spectrum_stats(s, shape, mean)}
    value["stats"].update(method=method, **(extra or {}))
    return value


def _bounded_values(source: ModelSource, name: str, device: str,
                    method: str) -> tuple[np.ndarray, str, float, str | None, dict]:
    """σ of a tensor above ``io.rows.BOUNDED_MIN_BYTES`` from its blocked float64 Gram (never read whole).

    Returns ``(σ, method, mean, note, extra stats)``. ``"auto"`` cannot fall back to a float64 SVD
    here (8 bytes per element is above the memory bound), so an estimate above ``_GRAM_TOL`` is
    recorded (``gram_error_estimate``, ``within_contract: False``) instead of being hidden.
    """
    from sahc_core.spectra._blocked import spectrum_blocked

    info = source.info(name)
    if method not in ("auto", "gram64"):
        raise ValueError(f"method {method!r} needs tensor {name} whole in memory ({4 * info.numel / 1e9:.1f} GB as "
                         f"float32, above the {memory_bound(source) / 1e9:.1f} GB memory bound); use method 'auto'.")
    r = spectrum_blocked(source, name, device=device, precision="float64")
    m, n = r.shape
    note = None if len(info.shape) == 2 else f"{len(info.shape)}-D weight {tuple(info.shape)} reshaped to ({m}, {n})"
    extra = {"blocked": True, "gram_error_estimate": r.error_estimate, "within_contract": r.within_contract}
    return r.singular_values, "gram64", r.mean, note, extra


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (rows, cols) that :func:`as_matrix` gives an N-D shape."""
    return int(shape[0]), int(np.prod(shape[1:]))
