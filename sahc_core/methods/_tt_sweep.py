"""The TT-SVD sweep (Oseledets 2011, Alg. 1) and the error of a stored TT-matrix it predicts.

:func:`_tt_svd` / :func:`_tt_svd_from` factorize a float tensor step by step (:func:`_top_subspace`: one
step through the Gram matrix of the short side, in float64) and record the energy each step discards;
:func:`predicted` turns those energies and the cores' rounding noise into the predicted relative error
of :func:`sahc_core.methods.tt.tt_decompose`'s result. The streamed first step of a big matrix is in
:mod:`sahc_core.methods._tt_bounded`.

References: I. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from sahc_core.methods.quant import QuantConfig


def _top_subspace(M: Tensor, r: int | None, delta2: float = 0.0) -> tuple[Tensor, Tensor, float]:
    """Best rank-r split ``M ≈ L @ R`` with orthonormal columns in ``L`` (one TT-SVD step), and the
    energy it discards, ``‖M − L R‖² = Σ_{i>r} σ_i²`` (float64, from the same eigenvalues).

    Hand-written through the Gram matrix of the short side (eigendecomposed in float64) instead of
    ``torch.linalg.svd``: the SVD of the very wide first unfolding (e.g. 256 x 110592) took 17 s on a
    2-core CPU against about 3 s this way, which is what keeps a 7-config TT sweep of a 49152 x 576
    embedding under a minute. ``r=None`` picks the smallest rank whose discarded energy is at most
    ``delta2`` (δ-truncation).
    """
    a, b = M.shape
    wide = a <= b
    G = (M @ M.T) if wide else (M.T @ M)
    evals, evecs = torch.linalg.eigh(G.to(torch.float64))  # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    if r is None:
        tail = torch.cumsum(evals.flip(0), 0).flip(0)  # tail[i] = energy discarded at rank i
        ok = torch.nonzero(tail <= delta2).flatten()
        r = max(1, int(ok[0])) if ok.numel() else evals.numel()
    discarded = float(evals[r:].sum())
    top = evecs[:, :r].to(M.dtype)
    if wide:  # L = U_r, R = U_rᵀ M = S_r V_rᵀ
        return top, top.T @ M, discarded
    # L = M V_r / s (orthonormal: V_r are eigenvectors of MᵀM), R = diag(s) V_rᵀ; s = 0 columns dropped to 0
    s = evals[:r].sqrt().to(M.dtype)
    inv = torch.where(s > s[0] * 1e-12, 1 / s.clamp_min(1e-300), torch.zeros_like(s))
    return (M @ top) * inv, s[:, None] * top.T, discarded


def _tt_svd(X: Tensor, ranks: tuple[int, ...] | None, delta2: float = 0.0) -> tuple[list[Tensor], list[float]]:
    """TT-SVD (Oseledets 2011, Alg. 1) of a float tensor: cores ``(r_{k-1}, n_k, r_k)`` in its dtype, and
    the energy δ_k² each of the D - 1 steps discards.

    Each step splits the remaining core as ``M = L R + E_k`` with ``L`` orthonormal and ``E_k ⟂ L``, so
    in exact arithmetic ``‖X − TT‖² = Σ_k δ_k²`` (the equality behind Oseledets' Thm 2.2 bound).
    """
    return _tt_svd_from(X, list(X.shape), ranks, delta2)


def _tt_svd_from(M: Tensor, modes: list[int], ranks: tuple[int, ...] | None, delta2: float = 0.0,
                 cores: list[Tensor] | None = None,
                 discarded: list[float] | None = None) -> tuple[list[Tensor], list[float]]:
    """The TT-SVD sweep from step ``len(cores)`` on: ``M`` is what the previous steps left, (r_prev, rest);
    ``discarded`` the δ_k² of those steps."""
    cores = [] if cores is None else cores
    discarded = [] if discarded is None else discarded
    r_prev = cores[-1].shape[-1] if cores else 1
    for k in range(len(cores), len(modes) - 1):
        M = M.reshape(r_prev * modes[k], -1)
        L, M, d2 = _top_subspace(M, None if ranks is None else ranks[k + 1], delta2)
        cores.append(L.reshape(r_prev, modes[k], L.shape[1]))
        discarded.append(d2)
        r_prev = L.shape[1]
    cores.append(M.reshape(r_prev, modes[-1], 1))
    return cores, discarded


#: float64 bytes of one block of core rows in :func:`predicted`.
_PREDICT_BLOCK_BYTES = 64 << 20


def predicted(svd_cores: tuple[Tensor, ...], discarded: tuple[float, ...], q: QuantConfig | None,
              norm2: float, padded: bool) -> dict:
    """The error of a stored TT-matrix predicted from the TT-SVD sweep and the cores' storage alone.

    Truncation: ``Σ_k δ_k²``, the energies the sweep discards (Oseledets 2011, Thm 2.2: an upper bound
    on ``‖X − TT‖²``, here an equality since each step's residual is orthogonal to the rest). Storage:
    rounding each core entry with variance ``v_k[a, i, b]`` (:func:`rtn.rounding_noise_var` of the stored
    ``(r_{k-1}, n_k r_k)`` view) changes the tensor by ``L_{<k} ΔG_k R_{>k}``; the left interface has
    orthonormal columns (TT-SVD cores are left-orthogonal), so to first order
    ``E‖ΔX‖² = Σ_k Σ_{a,i,b} v_k[a, i, b] · (R_{>k} R_{>k}ᵀ)[b, b]``, with the right Gram built core by core.

    Returns
    -------
    dict
        ``trunc_bound``, ``core_noise``, ``predicted_error`` (both in quadrature), ``prediction``,
        ``prediction_sides`` ("upper" when the layout pads rows / columns: the prediction then also
        covers the padded part that the measurement drops), all relative to ``sqrt(norm2) = ‖W‖_F``.
    """
    from sahc_core.methods.rtn import rounding_noise_var

    gram = torch.ones(1, 1, dtype=torch.float64)  # R_{>D} R_{>D}ᵀ
    noise2 = 0.0
    for core in reversed(svd_cores):  # (r_{k-1}, n_k, r_k)
        r0, n, r1 = core.shape
        flat = core.detach().to("cpu").reshape(r0, n * r1)
        # In blocks of rows (64 MB of float64 each): a rank-256 core of the 248k embedding is 670 MB in
        # float64 and its noise variances several times that; rows are independent in both sums.
        step = max(1, _PREDICT_BLOCK_BYTES // (8 * n * r1))
        blocks = [(a, min(r0, a + step)) for a in range(0, r0, step)]
        diag = torch.diagonal(gram)
        new = torch.empty(r0, r0, dtype=torch.float64)
        for a, b in blocks:
            var = rounding_noise_var(flat[a:b], q).cpu().reshape(b - a, n, r1)  # per-row groups: block = whole
            noise2 += float((var * diag).sum())
            del var
            A = (flat[a:b].to(torch.float64).reshape(-1, r1) @ gram).reshape(b - a, n * r1)
            for d, e in blocks:  # R_{>k-1} R_{>k-1}ᵀ = Σ_{i,b,c} C[a,i,b] gram[b,c] C[d,i,c]
                new[a:b, d:e] = A @ flat[d:e].to(torch.float64).T
        gram = new
    trunc2 = float(sum(discarded))
    rel = (lambda x2: math.sqrt(max(x2, 0.0) / norm2) if norm2 > 0 else 1.0)  # noqa: E731
    return {"trunc_bound": rel(trunc2), "core_noise": rel(noise2), "predicted_error": rel(trunc2 + noise2),
            "prediction_sides": "upper" if padded else "two",
            "prediction": "TT-SVD discarded energies sum_k delta_k^2 (Oseledets 2011, Thm 2.2) in quadrature with "
                          "the cores' rounding noise through the orthonormal left interface"}
