"""Is a tensor low-rank where the data lives? The rank-vs-OUTPUT-error curve in the whitened space.

The plain Eckart–Young–Mirsky curve ``e(r) = sqrt(Σ_{i>r} σ_i(W)² / Σ σ_i(W)²)`` is the best relative
WEIGHT error of a rank-r approximation. What a layer's output sees is ``‖X (W − Ŵ)ᵀ‖ / ‖X Wᵀ‖`` on
real activations X: with ``S Sᵀ = XᵀX`` (Cholesky whitening, SVD-LLM, Wang et al. 2024), the best
rank-r output error is the EYM curve of ``W S`` (:func:`sahc_core.methods._wsvd.whitened_rank_error_curve`).
A tensor whose weight spectrum is flat can still be low-rank on the directions its inputs use.

:func:`output_rank_curve` computes both curves for one tensor from the calibration statistics (the
fitting split), with the min ranks for 10/5/1 % output error, and caches them in DuckDB under the
statistics' key.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sahc_core.errors import ModelError
from sahc_core.spectra.spectrum import ERROR_LEVELS, as_matrix, rank_error_curve, singular_values

CURVE_VERSION = 1
CACHE_KIND = "whitened_curve"


def output_rank_curve(source: Any, name: str, calib: Any, cache: Any = None, device: str = "auto") -> dict:
    """Plain (weight) and whitened (output) rank-vs-error curves of tensor ``name``.

    Returns
    -------
    dict
        ``tensor``, ``weight_error`` and ``output_error`` (lists, index = rank r = 0..min(m, n)),
        ``min_rank`` and ``min_rank_output`` (``{"0.1": r, ...}``), ``n_tokens`` (fitting tokens).
    """
    from sahc_core.methods._wsvd import whitened_rank_error_curve

    stats = calib.for_weight(name)
    if stats is None:
        raise ModelError(f"the calibration statistics have no inputs for {name} (not a linear layer the model runs); "
                         "pick a projection weight.")
    key = f"{name}|{calib.key}"
    if cache is not None:
        hit = cache.get(CACHE_KIND, source.fingerprint, key, CURVE_VERSION)
        if hit is not None:
            return hit
    W, _ = as_matrix(source.read(name, dtype=torch.float32))
    if tuple(stats.xtx.shape) != (W.shape[1],) * 2:
        raise ModelError(f"{name} has {W.shape[1]} inputs but its statistics are {tuple(stats.xtx.shape)}; recapture them.")
    plain = rank_error_curve(singular_values(W, device=device))
    out = whitened_rank_error_curve(W, stats.xtx, device=device)
    value = {"tensor": name, "weight_error": plain.tolist(), "output_error": np.asarray(out).tolist(),
             "min_rank": {str(e): _first_at_most(plain, e) for e in ERROR_LEVELS},
             "min_rank_output": {str(e): _first_at_most(out, e) for e in ERROR_LEVELS},
             "n_tokens": int(stats.n_tokens)}
    if cache is not None:
        cache.put(CACHE_KIND, source.fingerprint, key, CURVE_VERSION, value)
    return value


def _first_at_most(curve: Any, eps: float) -> int:
    """Smallest rank r with curve[r] <= eps (the curve falls to 0 at full rank)."""
    return int(np.argmax(np.asarray(curve, dtype=np.float64) <= eps))
