"""TT-SVD and TT measurements of a big V x d matrix without its float32 tensorization or Ŵ whole.

The textbook TT-SVD (:func:`sahc_core.methods._tt_sweep._tt_svd`) first writes the zero-padded, mode-interleaved
tensor X in float32 (4 GB for the 248,320 x 4,096 embedding) and factorizes its first unfolding
``M1 = X.reshape(i1 j1, rest)``. Its first step only needs the smaller Gram ``M1 M1ᵀ`` (i1 j1 x i1 j1:
640 x 640 for the embedding, never the 248,320² one) and ``R1 = L1ᵀ M1``, and both are sums over
column chunks of M1: for a fixed second row digit a2, the columns ``[a2 j2 n3, (a2 + 1) j2 n3)`` of
M1 (``n3 = prod(modes[2:])``) hold exactly the rows ``a1 i2 R3 + a2 R3 + t`` of W (``R3 = prod(i3..iD)``),
reordered. So :func:`first_chunks` builds each chunk from W in its stored dtype (1/i2 of the tensor
in float32 at a time, zero rows and columns for the padding), :func:`first_eig` accumulates the Gram
(float32 chunk products added in float64) and :func:`first_step` gives ``L1`` and ``R1`` (r1 x rest,
float32): then the usual TT-SVD continues on R1, which is r1 / (i1 j1) of X.

Rows of Ŵ come in slabs of one (first, second) row digit pair (:func:`row_slabs`): 260 GFLOP for the
embedding at ranks 256 against 4.2 TFLOP for gathering the cores row by row (:meth:`TTMatrix.rows`),
and nothing of the size of Ŵ or of the contracted cores 2..D (1.6 GB there) is held.

References: I. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011, Alg. 1.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sahc_core.methods._bounded import ErrorSums


def first_is_wide(modes: list[int]) -> bool:
    """True when the first unfolding ``(modes[0], prod(modes[1:]))`` is wide (its smaller Gram is M1 M1ᵀ)."""
    return modes[0] <= math.prod(modes[1:])


def first_chunks(W: Tensor, row_factors: tuple[int, ...], col_factors: tuple[int, ...]
                 ) -> Iterator[tuple[int, int, Tensor]]:
    """``(col_start, col_stop, M1[:, col_start:col_stop])`` in float32, one chunk per second row digit a2.

    ``W`` (V, d) in any float dtype; the chunk is ``(i1 j1, j2 n3)`` with padded rows/columns zero.
    """
    V, d = (int(s) for s in W.shape)
    rf, cf = list(row_factors), list(col_factors)
    D, Q = len(rf), math.prod(cf)
    R3 = math.prod(rf[2:])  # rows of W per (a1, a2)
    width = cf[1] * math.prod(rf[k] * cf[k] for k in range(2, D))  # j2 n3
    # a chunk viewed (i1, i3..iD, j1, j2, ..., jD) is permuted to (i1, j1, j2, i3, j3, ..., iD, jD)
    order = [0, D - 1] + [D] + [p for k in range(2, D) for p in (k - 1, D + k - 1)]
    base = (torch.arange(rf[0]) * (rf[1] * R3))[:, None] + torch.arange(R3)[None, :]  # (i1, R3)
    for a2 in range(rf[1]):
        idx = (base + a2 * R3).reshape(-1)
        valid = idx < V
        chunk = torch.zeros(idx.numel(), Q, dtype=torch.float32, device=W.device)
        chunk[valid, :d] = W[idx[valid].to(W.device)].to(torch.float32)
        if not bool(torch.isfinite(chunk).all()):
            raise ValueError("the matrix contains NaN or Inf values and cannot be decomposed.")
        X = chunk.reshape(rf[0], *rf[2:], *cf).permute(order)
        yield a2 * width, (a2 + 1) * width, X.reshape(rf[0] * cf[0], width)


def _chunk_gram(C: Tensor) -> Tensor:
    """``C Cᵀ`` of a wide float32 chunk, accumulated by the caller in float64 (BLAS ssyrk on CPU)."""
    if C.device.type != "cpu":
        return (C @ C.T).to(torch.float64)
    from scipy.linalg.blas import ssyrk

    A = C.contiguous().numpy()
    upper = ssyrk(1.0, A.T, trans=1, lower=0)  # (A.T)ᵀ (A.T) = A Aᵀ, upper triangle
    return torch.from_numpy(np.triu(upper) + np.triu(upper, 1).T).to(torch.float64)


def first_eig(W: Tensor, row_factors: tuple[int, ...], col_factors: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, float64, clamped at 0) and eigenvectors (float64) of ``M1 M1ᵀ``, from chunks."""
    n1 = row_factors[0] * col_factors[0]
    G = torch.zeros(n1, n1, dtype=torch.float64, device=W.device)
    for _, _, C in first_chunks(W, row_factors, col_factors):
        G += _chunk_gram(C)
    evals, evecs = torch.linalg.eigh(G)
    return evals.flip(0).clamp_min(0.0), evecs.flip(1)


def first_step(W: Tensor, row_factors: tuple[int, ...], col_factors: tuple[int, ...], r1: int,
               eig: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, float]:
    """``(L1 (i1 j1, r1), R1 (r1, rest), δ_1²)`` of the first TT-SVD step, ``M1 ≈ L1 R1`` (float32);
    ``δ_1²`` is the energy the step discards (the Gram's eigenvalues beyond ``r1``)."""
    if eig is None:
        eig = first_eig(W, row_factors, col_factors)
    L = eig[1][:, :r1].to(torch.float32)
    rest = math.prod(i * j for i, j in zip(row_factors[1:], col_factors[1:]))
    R = torch.empty(r1, rest, dtype=torch.float32, device=W.device)
    for a, b, C in first_chunks(W, row_factors, col_factors):
        R[:, a:b] = L.T @ C
    return L, R, float(eig[0][r1:].double().sum())


def _right_part(cores: list[Tensor]) -> Tensor:
    """Cores k..D contracted (``cores`` = those cores): ``(r_{k-1}, prod(i_k..), prod(j_k..))`` float32."""
    T = cores[-1][..., 0]  # (r_{D-1}, i_D, j_D)
    for G in reversed(cores[:-1]):  # (r_{k-1}, i_k, j_k, r_k)
        a, i, j, _ = G.shape
        T = torch.einsum("aijb,bIJ->aiIjJ", G, T).reshape(a, i * T.shape[1], j * T.shape[2])
    return T


def row_slabs(c: Any) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, Ŵ[start:stop])`` float32 of a :class:`TTMatrix`, one slab per (first, second) row digit.

    With three or more cores, ``T3`` (cores 3..D contracted, ``(r2, R3, Q3)``) is formed once and,
    per second digit a2, ``T_a2 = G2[:, a2] T3`` ``(r1, j2, R3, Q3)``; the slab of rows
    ``a1 i2 R3 + a2 R3 + [0, R3)`` is then ``G1[0, a1] T_a2``: nothing larger than one slab and T3
    is held (25 MB and 6 MB for the embedding at ranks 256). Two cores: one slab per first digit.
    """
    cores = c.float_cores()
    V, d = c.shape
    g1 = cores[0][0]  # (i1, j1, r1)
    i1, j1, r1 = g1.shape
    if len(cores) == 2:
        T = _right_part(cores[1:])  # (r1, i2, j2)
        R = T.shape[1]
        for a1 in range(i1):
            if a1 * R >= V:
                break
            slab = (g1[a1] @ T.reshape(r1, -1)).reshape(j1, R, -1).permute(1, 0, 2).reshape(R, -1)
            yield a1 * R, min(V, (a1 + 1) * R), slab[: min(V, (a1 + 1) * R) - a1 * R, :d]
        return
    T3 = _right_part(cores[2:])  # (r2, R3, Q3)
    G2 = cores[1]  # (r1, i2, j2, r2)
    i2, j2 = G2.shape[1], G2.shape[2]
    R3, Q3 = T3.shape[1], T3.shape[2]
    for a2 in range(i2):
        Ta2 = (G2[:, a2].reshape(r1 * j2, -1) @ T3.reshape(T3.shape[0], -1)).reshape(r1, j2 * R3 * Q3)
        for a1 in range(i1):
            start = a1 * i2 * R3 + a2 * R3
            if start >= V:
                continue
            slab = (g1[a1] @ Ta2).reshape(j1, j2, R3, Q3).permute(2, 0, 1, 3).reshape(R3, j1 * j2 * Q3)
            stop = min(V, start + R3)
            yield start, stop, slab[: stop - start, :d]


def bounded_measure(W: Tensor, cfg: Any, ctx: Any) -> dict:
    """Measure a TT setting on a big W (stored dtype): streamed decomposition, Ŵ compared slab by slab."""
    from sahc_core.methods.registry import spec_of

    c = ctx.compress(cfg)
    H = ctx.xtx() if ctx.calib is not None else None
    sums = ErrorSums(W.shape[0], H, W.device)
    for a, b, slab in row_slabs(c):
        sums.add(a, b, W[a:b].to(torch.float32), slab.to(W.device).contiguous())
    out = sums.numbers("tt", W, int(c.nbytes), ctx.w_row2, ctx.wHw() if H is not None else None)
    out.update(spec_of(cfg).extras(W, c, None))
    out["measured_in_blocks"] = True
    return out
