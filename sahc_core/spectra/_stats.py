"""Statistics of one singular-value spectrum: the EYM rank-vs-error curve, ranks, Marchenko–Pastur edges.

Pure functions of the descending singular values σ of an (m, n) matrix (no torch, no I/O); public
through :mod:`sahc_core.spectra.spectrum`, which re-exports every name here.

References
----------
.. [1] Eckart & Young, "The approximation of one matrix by another of lower rank", 1936.
.. [2] Roy & Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO 2007.
.. [3] Marchenko & Pastur, "Distribution of eigenvalues for some sets of random matrices", 1967.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from sahc_core.errors import NumericalError

#: Ranks at which σ_r and the energy are reported (those <= min(m, n)).
REPORT_RANKS = (1, 512, 1024, 2048, 4096)
#: Relative errors whose minimum rank is reported.
ERROR_LEVELS = (0.1, 0.05, 0.01)
_EPS32 = float(np.finfo(np.float32).eps)


def rank_error_curve(s: np.ndarray) -> np.ndarray:
    """Eckart–Young–Mirsky relative error of the best rank-r approximation, r = 0..len(s).

    ``e[r] = sqrt(sum_{i>r} σ_i² / sum_i σ_i²)``; ``e[0] = 1``, ``e[len(s)] = 0``. A zero matrix
    gets all ones (design.md: the relative error against a zero matrix is 1.0).
    """
    s = np.asarray(s, dtype=np.float64)
    energy = s**2
    total = float(energy.sum())
    if total == 0.0:
        return np.ones(s.size + 1)
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])  # tail[r] = sum_{i>=r} (0-based)
    return np.sqrt(np.clip(tail / total, 0.0, 1.0))


def numerical_rank(s: np.ndarray, rtol: float | None = None) -> int:
    """Number of σ above ``σ_max * rtol``; default rtol = len(s)·ε_float32 (weights are ≤ 32-bit)."""
    s = np.asarray(s, dtype=np.float64)
    if s.size == 0 or s[0] == 0.0:
        return 0
    rtol = s.size * _EPS32 if rtol is None else float(rtol)
    return int(np.count_nonzero(s > s[0] * rtol))


def min_rank(s: np.ndarray, eps: float) -> int:
    """Smallest rank r whose EYM relative error e(r) is <= ``eps``.

    Singular values below the numerical-rank tolerance (:func:`numerical_rank`) count as zero, so
    ``eps = 0`` gives the numerical rank and the result never grows as ``eps`` shrinks further.
    ``eps >= 1`` gives 0; a zero matrix gives 0.
    """
    if not (isinstance(eps, (int, float, np.floating)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"the relative error eps must be a finite number >= 0, got {eps!r}.")
    s = np.asarray(s, dtype=np.float64)
    r_num = numerical_rank(s)
    if r_num == 0 or eps >= 1.0:
        return 0
    e = rank_error_curve(np.where(np.arange(s.size) < r_num, s, 0.0))
    return int(np.argmax(e <= eps))  # e[r_num] == 0 exactly, so a hit always exists


def marchenko_pastur_edges(shape: tuple[int, int], variance: float) -> tuple[float, float]:
    """Singular-value edges of the Marchenko–Pastur bulk of an iid (m, n) matrix of that variance.

    ``σ± = sqrt(variance) * (sqrt(m) ± sqrt(n))`` (lower edge taken in absolute value).
    """
    m, n = (int(d) for d in shape)
    if m <= 0 or n <= 0:
        raise ValueError(f"the shape must have two positive dimensions, got {tuple(shape)}.")
    if not (math.isfinite(variance) and variance >= 0):
        raise ValueError(f"the variance must be a finite number >= 0, got {variance!r}.")
    sd = math.sqrt(variance)
    return sd * abs(math.sqrt(m) - math.sqrt(n)), sd * (math.sqrt(m) + math.sqrt(n))


def spectrum_stats(s: np.ndarray, shape: tuple[int, int], mean: float = 0.0) -> dict[str, Any]:
    """Tidy statistics of one spectrum (JSON-safe: non-finite numbers become ``None``).

    Parameters
    ----------
    s : np.ndarray
        All min(m, n) singular values, descending.
    shape : (int, int)
        Shape (m, n) of the matrix.
    mean : float
        Mean of the entries; the Marchenko–Pastur variance is ``‖W‖_F²/(mn) - mean²``.
    """
    s = np.asarray(s, dtype=np.float64)
    m, n = (int(d) for d in shape)
    if m * n == 0:
        raise NumericalError(f"a matrix of shape {(m, n)} has no elements, so it has no spectrum statistics.")
    if s.size != min(m, n):
        raise ValueError(f"expected min{(m, n)} = {min(m, n)} singular values, got {s.size}.")
    energy = s**2
    total = float(energy.sum())
    s_max = float(s[0]) if s.size else 0.0
    s_min = float(s[-1]) if s.size else 0.0
    p = s / s.sum() if total > 0 else np.zeros(0)
    p = p[p > 0]
    variance = max(total / (m * n) - float(mean) ** 2, 0.0)
    mp_lo, mp_hi = marchenko_pastur_edges((m, n), variance)
    above, below = int(np.count_nonzero(s > mp_hi)), int(np.count_nonzero(s < mp_lo))
    out: dict[str, Any] = {
        "rows": m, "cols": n, "full_rank": int(s.size),
        "sigma_max": s_max, "sigma_min": s_min,
        "condition_number": s_max / s_min if s_min > 0 else None,
        "frobenius_norm": math.sqrt(total),
        "stable_rank": total / s_max**2 if s_max > 0 else 0.0,
        "effective_rank": float(np.exp(-np.sum(p * np.log(p)))) if p.size else 0.0,
        "numerical_rank": numerical_rank(s),
    }
    cum = np.cumsum(energy) / total if total > 0 else np.zeros(s.size)
    for r in REPORT_RANKS:
        if r <= s.size:
            out[f"sigma_at_{r}"] = float(s[r - 1])
            out[f"energy_at_{r}"] = float(cum[r - 1])
    for eps in ERROR_LEVELS:
        r = min_rank(s, eps)
        out[f"min_rank_{eps}"] = r
        out[f"min_rank_frac_{eps}"] = r / s.size if s.size else 0.0
    out.update(mp_variance=variance, mp_lo=mp_lo, mp_hi=mp_hi, n_above_mp=above, n_below_mp=below,
               n_outside_mp=above + below, frac_outside_mp=(above + below) / s.size if s.size else 0.0)
    return out
