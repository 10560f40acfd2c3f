"""Activation-whitened truncated SVD (SVD-LLM): the rank-r ``Ŵ`` with the smallest OUTPUT error.

For a linear layer ``Y = X Wᵀ`` (``W`` of shape ``(m, n)`` = (out, in), calibration inputs ``X`` of
shape ``(N, n)``) and ``H = XᵀX`` (``(n, n)``, an unnormalised sum over tokens), the output error of
any ``Ŵ`` is ``||X (W - Ŵ)ᵀ||_F = ||(W - Ŵ) S||_F`` for any ``S`` with ``S Sᵀ = H``. SVD-LLM [1]
(section 3.1, truncation-aware whitening) takes ``S`` from a Cholesky factorisation and the SVD
``W S = U Σ Vᵀ``; truncating it at rank r leaves exactly the output error
``||X (W - Ŵ_r)ᵀ||_F / ||X Wᵀ||_F = sqrt(Σ_{i>r} σ_i² / Σ_i σ_i²)`` (the Eckart–Young–Mirsky curve of
``W S``, :func:`whitened_rank_error_curve`), the smallest possible for rank r.

Choices made here:

- **Whitening**: Cholesky (lower) of ``H + λI`` with ``λ = damp · mean(diag H)``, ``damp = 1e-6``
  by default, ALWAYS applied (multiplied by 10 up to 6 times if the factorisation still fails).
  Always, rather than only on failure as in [1]'s code, so the result is a continuous function of
  ``H`` and its effect is exact and small: the objective becomes ``||X Δᵀ||² + λ||Δ||²``
  (``Δ = W - Ŵ``), i.e. λ times plain SVD's objective is added; this makes a rank-deficient ``H``
  (fewer tokens than inputs, dead inputs with zero rows/columns) positive definite, and directions
  with no activation energy are then fitted like plain SVD does, with weight λ. The exact price:
  the relative output error² is ``e[r]²`` within a factor ``1 ± κ``, ``κ = λ / λ_min(H)``
  (:attr:`Whitening.kappa`). Cholesky (the paper's choice; n = 1536 in float64 on CPU: 0.18 s
  against 1.7 s for an eigen-decomposition) rather than ``S = Q (Λ + λ)^(1/2)``: any two square
  roots of ``H + λI`` differ by an orthogonal factor on the right, so ``U``, ``Σ`` and ``Ŵ`` are
  the same either way, and the factors below never need ``S⁻¹``, so its conditioning does not
  enter. The eigenvalues of ``H`` (eigvalsh, about 3x a Cholesky's time)
  are still computed once, for the diagnostics (dead inputs, directions below λ, κ).
- **Factors without S⁻¹**: from ``U_rᵀ W S = Σ_r V_rᵀ`` it follows that SVD-LLM's
  ``V_rᵀ S⁻¹ = Σ_r⁻¹ U_rᵀ W`` and ``Ŵ_r = U_r Σ_r V_rᵀ S⁻¹ = U_r (U_rᵀ W)``: the projection of ``W``
  onto the top-r left singular vectors of ``W S``. So no triangular solve (nor inverse) is needed,
  and ``Ŵ`` is bounded, ``||Ŵ|| <= ||W||``, however ill-conditioned ``H`` is. (Tested against the
  solve form ``(U_r Σ_r)(V_rᵀ S⁻¹)``.)
- **Storage**: plain SVD's :class:`~sahc_core.methods.lowrank.LowRankTensor` (same keys, same bytes,
  :func:`~sahc_core.methods.lowrank.lowrank_bytes`; factors fp16 or int-k quantized by
  :func:`~sahc_core.methods.lowrank.factor_quant`). Each rank component ``i`` is split so that
  ``u_i = sqrt(c_i) U_i`` and ``v_i = (U_iᵀ W) / sqrt(c_i)`` have equal norms, ``c_i = ||U_iᵀ W||``,
  as plain SVD's ``sqrt(σ_i)`` split does (to which it reduces when ``H ∝ I``). Unlike SVD-LLM's
  ``A = U_r Σ_r``, ``B = V_rᵀ S⁻¹``, the factor magnitudes then do not scale with ``sqrt(N)`` of the
  unnormalised ``H`` (which can overflow fp16 in ``A`` and underflow it in ``B``).
- Computation in float64 on ``device``; the stored factors are made from float32 copies, as in
  :func:`~sahc_core.methods.lowrank.lowrank`.

References
----------
.. [1] X. Wang, Y. Zheng, Z. Wan, M. Zhang, "SVD-LLM: Truncation-aware Singular Value Decomposition
   for Large Language Model Compression", 2024, arXiv:2403.07378, section 3.1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sahc_core.device import resolve_device
from sahc_core.methods.lowrank import LowRankTensor, SVDConfig, _dims, factor_quant, resolve_rank
from sahc_core.methods.quant import quantize
from sahc_core.spectra.spectrum import rank_error_curve

#: Default ``damp``: ``λ = damp · mean(diag H)`` is added to ``H`` before the Cholesky factorisation.
DEFAULT_DAMP = 1e-6
_DAMP_RETRIES = 6  # λ x10 per retry when Cholesky still fails (needs an H that is far from PSD)


@dataclass(frozen=True, eq=False)
class Whitening:
    """``S`` with ``S Sᵀ = H + λI`` and what it says about ``H`` (see :func:`whitening`)."""

    S: Tensor              # (n, n) float64, lower triangular
    lam: float             # λ actually added (absolute, H's units)
    kappa: float           # λ / λ_min(H) (inf when H is singular): e[r]² is the output error² within (1 ± κ)
    dead_inputs: int       # inputs whose H row/column is zero (never active on the calibration data)
    weak_directions: int   # eigenvalues of H below λ: input directions the whitening fits only with weight λ
    note: str              # "" or one sentence about dead inputs / rank deficiency


@dataclass(frozen=True, eq=False)
class WhitenedFactors:
    """The full SVD of ``W S``, computed once; :func:`whitened_lowrank` then only slices rows.

    ``U`` ``(m, k)``, ``S`` ``(k,)`` descending, ``Vh`` ``(k, n)`` (whitened input space) with
    ``k = min(m, n)``; ``UtW = Uᵀ W`` ``(k, n)``, whose first r rows give the rank-r factors
    (``Σ_r V_rᵀ S⁻¹ = U_rᵀ W``); ``whitening`` is ``S`` and its diagnostics. All float64.
    """

    U: Tensor
    S: Tensor
    Vh: Tensor
    UtW: Tensor
    whitening: Whitening


def _check_stats(H: Tensor) -> Tensor:
    """``H`` as float64, symmetrised; ValueError when it cannot be a ``XᵀX``."""
    if H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] < 1:
        raise ValueError(f"the calibration statistics H must be a square (n, n) matrix, got shape {tuple(H.shape)}.")
    H = H.detach().to(torch.float64)
    if not torch.isfinite(H).all():
        raise ValueError("the calibration statistics H contain NaN or Inf values; recapture them.")
    scale = float(H.abs().max())
    if scale == 0.0:
        raise ValueError("the calibration statistics H are all zero (the layer saw no input); "
                         "whitened SVD needs activations, use plain SVD instead.")
    if float((H - H.T).abs().max()) > 1e-6 * scale or float(H.diagonal().min()) < 0:
        raise ValueError("H is not a symmetric positive semi-definite XᵀX (asymmetric or negative diagonal); "
                         "pass the sum of x xᵀ over calibration tokens.")
    return (H + H.T) / 2


def whitening(H: Tensor, *, damp: float = DEFAULT_DAMP, device: str = "auto") -> Whitening:
    """Lower Cholesky ``S`` of ``H + λI``, ``λ = damp · mean(diag H)`` (module docstring: why always).

    Parameters
    ----------
    H : Tensor
        ``(n, n)`` ``XᵀX`` over calibration tokens (any float dtype; used in float64).
    damp : float
        Relative regularisation, ``> 0``.
    device : str
        Where to factorise ("auto": GPU when there is one).
    """
    if not (isinstance(damp, (int, float)) and not isinstance(damp, bool) and 0 < damp < 1):
        raise ValueError(f"damp must be a number in (0, 1), got {damp!r}.")
    Hd = _check_stats(H).to(resolve_device(device))
    n = Hd.shape[0]
    diag = Hd.diagonal()
    lam0 = lam = damp * float(diag.mean())
    eye = torch.eye(n, dtype=torch.float64, device=Hd.device)
    for _ in range(_DAMP_RETRIES + 1):
        S, info = torch.linalg.cholesky_ex(Hd + lam * eye)
        if int(info) == 0:
            break
        lam *= 10.0  # numerically indefinite H (round-off in a nearly singular sum): more damping
    else:
        raise ValueError("H + λI has no Cholesky factor even with λ = 1e6 x damp x mean(diag H); "
                         "H is far from positive semi-definite, recapture it.")
    dead = int((diag == 0).sum())
    ev = torch.linalg.eigvalsh(Hd)  # ascending; diagnostics only (about 3x a Cholesky's time)
    weak = int((ev < lam).sum())
    kappa = lam / float(ev[0]) if float(ev[0]) > 0 else float("inf")
    note = "" if lam == lam0 else f"λ raised from {lam0:.3g} to {lam:.3g}: H + λI was not positive definite. "
    if dead or weak:
        note += (f"H is rank-deficient: {weak} of {n} input directions ({dead} dead inputs with zero activation) "
                f"carry less energy than the regulariser λ = {lam:.3g}; whitened SVD fits them only with weight λ, "
                "so the output error is controlled on the calibration inputs, not on inputs in those directions.")
    return Whitening(S, lam, kappa, dead, weak, note)


def _whitened_input(W: Tensor, H: Tensor, damp: float, device: str) -> tuple[Tensor, Whitening]:
    """``W`` as an ``(m, n)`` float64 matrix on ``device`` and the whitening of its ``H``."""
    m, n = _dims(tuple(W.shape))
    dev = resolve_device(device)
    M = W.detach().reshape(m, n).to(device=dev, dtype=torch.float64)
    if not torch.isfinite(M).all():
        raise ValueError("the tensor contains NaN or Inf values; its SVD is undefined.")
    if tuple(H.shape) != (n, n):
        raise ValueError(f"the calibration statistics H must be ({n}, {n}) for a layer with {n} inputs, "
                         f"got shape {tuple(H.shape)}.")
    return M, whitening(H, damp=damp, device=dev)


def whitened_factors(W: Tensor, H: Tensor, *, damp: float = DEFAULT_DAMP, device: str = "auto") -> WhitenedFactors:
    """Whitening of ``H`` and the full thin SVD of ``W S`` (float64 on ``device``), computed once.

    Pass the result as ``whitened_lowrank(W, H, cfg, factors=...)`` so a new rank or bit width only
    slices and quantizes (like :func:`~sahc_core.methods.lowrank.svd_factors`).

    Parameters
    ----------
    W : Tensor
        ``(m, n)`` (out, in) weight (``ndim >= 2`` is viewed as ``(prod(shape[:-1]), shape[-1])``).
    H : Tensor
        ``(n, n)`` ``XᵀX`` of the layer's calibration inputs.
    """
    M, wh = _whitened_input(W, H, damp, device)
    U, S, Vh = torch.linalg.svd(M @ wh.S, full_matrices=False)  # (m, k), (k,), (k, n)
    return WhitenedFactors(U, S, Vh, U.T @ M, wh)


def whitened_split(factors: WhitenedFactors, r: int) -> tuple[Tensor, Tensor]:
    """The unquantized stored factors ``u`` ``(r, m)`` and ``v`` ``(r, n)`` (float32), ``uᵀ v = U_r U_rᵀ W``.

    Component ``i``: ``u_i = sqrt(c_i) U_i``, ``v_i = (U_iᵀ W) / sqrt(c_i)``, ``c_i = ||U_iᵀ W||``
    (both of norm ``sqrt(c_i)``; a component with ``c_i = 0`` is stored as zeros).
    """
    G = factors.UtW[:r]                                   # (r, n) = Σ_r V_rᵀ S⁻¹
    c = torch.linalg.vector_norm(G, dim=1)                # (r,)
    sq = c.sqrt()
    inv = torch.where(c > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).reciprocal(), torch.zeros_like(sq))
    u = (factors.U[:, :r] * sq).T.contiguous()            # (r, m)
    v = (G * inv[:, None]).contiguous()                   # (r, n)
    return u.to(torch.float32), v.to(torch.float32)


def whitened_lowrank(W: Tensor, H: Tensor, cfg: SVDConfig, factors: WhitenedFactors | None = None, *,
                     damp: float = DEFAULT_DAMP, device: str = "auto") -> LowRankTensor:
    """Rank-r activation-whitened SVD of ``W`` with fp16 or int-k quantized factors.

    Parameters
    ----------
    W : Tensor
        ``(m, n)`` weight (``ndim >= 2``).
    H : Tensor
        ``(n, n)`` ``XᵀX``; only used (with ``damp``, ``device``) when ``factors`` is omitted.
    cfg : SVDConfig
        Rank (or rank fraction) and factor storage, exactly as for plain SVD.
    factors : WhitenedFactors, optional
        :func:`whitened_factors` of this ``W`` and ``H``.

    Returns
    -------
    LowRankTensor
        Plain SVD's storage (bytes = ``lowrank_bytes(W.shape, cfg)``). Its ``singular_values`` are
        the WHITENED spectrum ``σ(W S)``: the EYM curve of it is the output error
        (:func:`whitened_rank_error_curve`), not the weight error.
    """
    shape = tuple(W.shape)
    m, n = _dims(shape)
    r = resolve_rank(shape, cfg)
    q = factor_quant(m, n, cfg)
    f = factors if factors is not None else whitened_factors(W, H, damp=damp, device=device)
    k = min(m, n)
    if tuple(f.U.shape) != (m, k) or tuple(f.UtW.shape) != (k, n):
        raise ValueError(f"whitened factors of shapes {tuple(f.U.shape)}, {tuple(f.UtW.shape)} "
                         f"do not belong to a {m}x{n} matrix.")
    u, v = whitened_split(f, r)
    su, sv = (u.to(torch.float16), v.to(torch.float16)) if q is None else (quantize(u, q), quantize(v, q))
    return LowRankTensor(shape, cfg, r, su, sv, u, v, f.S.to(torch.float32))


def whitened_rank_error_curve(W: Tensor, H: Tensor, *, damp: float = DEFAULT_DAMP,
                              device: str = "auto") -> np.ndarray:
    """``e[r] = sqrt(Σ_{i>r} σ_i(WS)² / Σ_i σ_i(WS)²)``, r = 0..min(m, n): the EYM curve in the
    whitened space, i.e. the relative OUTPUT error ``||X (W - Ŵ_r)ᵀ|| / ||X Wᵀ||`` of rank r (up to
    the regulariser λ, see the module docstring). Singular values only, no vectors; with the
    factors at hand, ``rank_error_curve(factors.S.cpu().numpy())`` is the same curve."""
    M, wh = _whitened_input(W, H, damp, device)
    return rank_error_curve(torch.linalg.svdvals(M @ wh.S).cpu().numpy())
