"""Every agreement number between a weight W and its approximation Ŵ, in one place.

Definitions (design.md "Numbers"):

- relative error ``‖W − Ŵ‖_F / ‖W‖_F`` (1.0 for a zero ``W``: a zero matrix scores exactly 1);
- weight cosine: mean over rows of ``cos(W_i, Ŵ_i)`` (rows = the last dimension; two zero rows count
  1, one zero row counts 0);
- output cosine: mean over tokens of ``cos(W x_n, Ŵ x_n)`` on real activations;
- a ``W`` holding NaN or Inf has no defined error: the functions return ``nan`` (never the 1.0 of a
  zero matrix), and :func:`check_finite` names the tensor and says why before any work;
- output error ``‖X Wᵀ − X Ŵᵀ‖_F / ‖X Wᵀ‖_F`` from the calibration second moment ``H = XᵀX`` alone
  (trace form ``sqrt(tr(E H Eᵀ) / tr(W H Wᵀ))``, ``E = W − Ŵ``), or for an embedding from the
  token counts ``c`` (``sqrt(Σ_t c_t ‖E_t‖² / Σ_t c_t ‖W_t‖²)``: the looked-up rows).

All sums accumulate in float64. Row norms are reduced in the tensor's own float dtype per row
(at most some 10^5 terms, accurate in float32) and the per-row totals added in float64: a single
float32 reduction over 5e7 elements was off by 0.4 % in torch 2.13 on CPU, and up-casting whole
matrices to float64 costs a full extra copy.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from sahc_core.errors import NumericalError

#: Rows of W (and Ŵ) turned into float64 at a time by :func:`output_error` (bounds the temporaries).
_OUTPUT_ERROR_ROWS = 4096


def check_finite(W: Tensor, what: str, consequence: str) -> None:
    """Raise :class:`NumericalError` naming ``what`` when ``W`` is empty or holds NaN / Inf values.

    Parameters
    ----------
    W : Tensor
        Any tensor (one pass over it; callers with row norms at hand check those first, see
        :func:`check_row_norms`).
    what : str
        How the message names it, e.g. ``"tensor 'model.layers.0.mlp.down_proj.weight'"``.
    consequence : str
        What cannot be computed, e.g. ``"its spectrum is undefined"``.
    """
    n = W.numel()
    if n == 0:
        raise NumericalError(f"{what} has no elements (shape {tuple(W.shape)}), so {consequence}; "
                             "leave the tensor out or repair the checkpoint.")
    if W.dtype.is_floating_point or W.dtype.is_complex:
        # in chunks of 16M entries: the boolean masks of a 248k-row embedding would be 1 GB each
        flat = W.reshape(-1)
        nan = inf = 0
        for part in flat.split(1 << 24):
            nan += int(torch.isnan(part).sum())
            inf += int(torch.isinf(part).sum())
        if nan or inf:
            raise NumericalError(f"{what} holds {nan:,} NaN and {inf:,} Inf value(s) among its {n:,} entries, so "
                                 f"{consequence}; repair the checkpoint or leave the tensor out.", math.nan)


def check_row_norms(W: Tensor, w_row2: Tensor, what: str, consequence: str) -> None:
    """:func:`check_finite` at the cost of a look at the row norms: only a non-finite norm reads ``W``
    again (to count its NaN / Inf); a norm that overflows although every entry is finite is named so."""
    if W.numel() and bool(torch.isfinite(w_row2).all()):
        return
    check_finite(W, what, consequence)
    raise NumericalError(f"{what} has entries so large that their squared row norms overflow, so {consequence}; "
                         "rescale the tensor.", math.inf)


def rows(x: Tensor) -> Tensor:
    """The ``(rows, last dim)`` view that row norms, row cosines and quantization groups refer to."""
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


def row_norm2(x: Tensor) -> Tensor:
    """Per-row ``‖x_i‖²`` as float64 (each row reduced in x's dtype, fused, no temporary)."""
    return torch.linalg.vector_norm(rows(x), dim=1).to(torch.float64).square()


def from_row_norms(w_row2: Tensor, h_row2: Tensor, e_row2: Tensor) -> tuple[float, float]:
    """``(rel_error, weight_cosine)`` from squared row norms of W, Ŵ and W − Ŵ (float64).

    Row dot products come from ``⟨w, ŵ⟩ = (|w|² + |ŵ|² − |w − ŵ|²) / 2``.
    """
    dot = (w_row2 + h_row2 - e_row2) / 2
    den = (w_row2 * h_row2).sqrt()
    cos = torch.where(den > 0, dot / den.clamp_min(1e-300), ((w_row2 == 0) & (h_row2 == 0)).double())
    w2 = float(w_row2.sum())
    if w2 > 0:
        rel = math.sqrt(max(float(e_row2.sum()), 0.0) / w2)
    else:  # a zero W scores 1.0 by definition; a W with NaN / Inf has no error (never "a zero matrix")
        rel = 1.0 if w2 == 0 else math.nan
    return rel, float(cos.clamp(-1.0, 1.0).mean())


def _pair(W: Tensor, W_hat: Tensor) -> tuple[Tensor, Tensor]:
    """Both on ``W``'s device in a common float dtype (at least float32)."""
    dt = torch.promote_types(torch.promote_types(W.dtype, W_hat.dtype), torch.float32)
    a = W.detach().to(dt)
    b = W_hat.detach().to(device=a.device, dtype=dt)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}.")
    return a, b


def compare(W: Tensor, W_hat: Tensor) -> tuple[float, float]:
    """``(rel_error, weight_cosine)`` in one pass (one difference tensor, three fused row norms)."""
    a, b = _pair(W, W_hat)
    return from_row_norms(row_norm2(a), row_norm2(b), row_norm2(a - b))


def rel_error(W: Tensor, W_hat: Tensor) -> float:
    """``‖W − Ŵ‖_F / ‖W‖_F`` (float64 accumulation); 1.0 by definition when ``‖W‖_F = 0``."""
    a, b = _pair(W, W_hat)
    norm2 = float(row_norm2(a).sum())
    return 1.0 if norm2 == 0 else math.sqrt(float(row_norm2(a - b).sum()) / norm2)


def row_cosine(W: Tensor, W_hat: Tensor) -> float:
    """Mean over rows (last dim = row) of ``cos(W_i, Ŵ_i)``; a zero row scores 1 if both are zero, else 0."""
    return compare(W, W_hat)[1]


def row_cosines(Y: Tensor, Y_hat: Tensor) -> Tensor:
    """``cos(y_n, ŷ_n)`` of every row in float64; two zero rows count 1, one zero row counts 0."""
    Y, Y_hat = Y.double(), Y_hat.double()
    dot = (Y * Y_hat).sum(-1)
    ny, nh = Y.norm(dim=-1), Y_hat.norm(dim=-1)
    both_zero = (ny == 0) & (nh == 0)
    return torch.where(ny * nh > 0, dot / (ny * nh).clamp_min(torch.finfo(torch.float64).tiny), both_zero.double())


def mean_row_cosine(Y: Tensor, Y_hat: Tensor) -> float:
    """Mean over rows of :func:`row_cosines`."""
    return float(row_cosines(Y, Y_hat).mean())


def output_cosine(W: Tensor, W_hat: Tensor, X: Tensor) -> float:
    """Mean over the rows of ``X`` of ``cos(X Wᵀ, X Ŵᵀ)`` (layer outputs with W vs with Ŵ).

    Parameters
    ----------
    W, W_hat : Tensor
        ``(out_features, in_features)`` weights.
    X : Tensor
        ``(N, in_features)`` activations (``evaluate.activations.capture_inputs``).
    """
    if W.shape != W_hat.shape or W.dim() != 2:
        raise ValueError(f"W and W_hat must be matrices of one shape, got {tuple(W.shape)} and {tuple(W_hat.shape)}.")
    if X.dim() != 2 or X.shape[1] != W.shape[1]:
        raise ValueError(f"X must be (N, {W.shape[1]}), got {tuple(X.shape)}.")
    # float32 matmuls on W's device (fast on GPU); the cosine itself in float64
    X = X.to(W.device, torch.float32)
    return mean_row_cosine(X @ W.float().T, X @ W_hat.to(W.device).float().T)


def output_error(W: Tensor, W_hat: Tensor, xtx: Tensor) -> float:
    """``‖X(W − Ŵ)ᵀ‖_F / ‖XWᵀ‖_F`` from ``H = XᵀX`` alone: ``sqrt(tr(E H Eᵀ) / tr(W H Wᵀ))``.

    Parameters
    ----------
    W, W_hat : Tensor
        ``(m, n)`` weights (out, in); Ŵ may be any float dtype/device.
    xtx : Tensor
        ``(n, n)`` symmetric PSD second moment of the layer's inputs (any positive scale), or a
        1-D ``(m,)`` vector of token counts for an embedding (rows looked up, not multiplied).

    Returns
    -------
    float
        The relative output error; ``nan`` when ``tr(W H Wᵀ) = 0`` (no calibration signal reaches
        the layer, so there is nothing to be relative to).
    """
    if W.dim() != 2 or W.shape != W_hat.shape:
        raise ValueError(f"W and W_hat must be matrices of one shape, got {tuple(W.shape)} and {tuple(W_hat.shape)}.")
    m, n = W.shape
    H = xtx.to(device=W.device, dtype=torch.float64)
    if H.dim() == 1:
        if H.numel() != m:
            raise ValueError(f"token counts must have one entry per row ({m}), got {H.numel()}.")
        e2 = float((row_norm2(W.float() - W_hat.to(W.device).float()) * H).sum())
        w2 = float((row_norm2(W.float()) * H).sum())
    else:
        if tuple(H.shape) != (n, n):
            raise ValueError(f"XᵀX must be ({n}, {n}) for a weight with {n} inputs, got {tuple(H.shape)}.")
        e2 = w2 = 0.0
        for i in range(0, m, _OUTPUT_ERROR_ROWS):  # (b, n) float64 blocks: tr(E H Eᵀ) = Σ_rows (e H)·e
            w = W[i:i + _OUTPUT_ERROR_ROWS].to(torch.float64)
            e = w - W_hat[i:i + _OUTPUT_ERROR_ROWS].to(device=W.device, dtype=torch.float64)
            e2 += float(((e @ H) * e).sum())
            w2 += float(((w @ H) * w).sum())
    if not w2 > 0:
        return math.nan
    return math.sqrt(max(e2, 0.0) / w2)
