"""Truncated SVD of a tensor too big for its thin SVD: factors from the Gram's eigenvectors, U never formed.

The What-if fast path of :mod:`sahc_core.methods.svd` keeps the thin SVD, whose ``U`` is m x n float32
(4 GB for the 248,320 x 4,096 embedding) next to ``W Vhᵀ`` (4 GB more). For a tall matrix (m >= n)
above ``io.rows.BOUNDED_MIN_BYTES`` this module uses instead

* ``G = WᵀW`` from float32 row-block products accumulated in float64 (:func:`spectra._blocked.gram_of`,
  W in its stored dtype), ``G = V Λ Vᵀ`` (float64 ``eigh``), ``σ = sqrt(λ)``: kept per tensor;
* the stored factors ``u = (U_r sqrt(S_r))ᵀ = (W V_r / sqrt(σ_r))ᵀ`` formed one block of rows at a
  time (a block of W's rows is a block of u's columns, so u's groups along m are quantized exactly
  per block; per-row scales take one extra pass for each rank row's range) and
  ``v = sqrt(S_r) V_rᵀ`` (r x n, small).

Errors, per block of rows (``P = B V_r`` the block's coordinates in V_r, ``Ŵ_B = û_Bᵀ v̂``):

* ``rel_error``, ``weight_cosine``: row norms of Ŵ_B and B − Ŵ_B (as :func:`registry.measure`);
* ``quant_error = ‖W_r − Ŵ‖ / ‖W‖`` with ``W_r = W V_r V_rᵀ``: splitting v̂ along V_r and its
  complement, ``‖W_r − Ŵ‖² = Σ_B ‖P − û_Bᵀ (v̂ V_r)‖² + tr(û K ûᵀ)``, ``K = v̂ (I − V_r V_rᵀ) v̂ᵀ``
  (r x r, float64): two differences that never cancel, at r x r cost per row;
* ``trunc_error``: ``‖W − W_r‖² = Σ_{i>r} λ_i`` exactly for this W_r, so it equals ``eym_error``
  (the in-memory path's float32 SVD leaves a ~1e-6 residual that separates them).

**Whitened SVD** (:func:`whitened_bounded_measure`, :func:`whitened_lowrank_bounded`; the kernel of
:mod:`sahc_core.methods._wsvd` for a big tensor): with ``S Sᵀ = H + λI`` (the same Cholesky whitening),
``(W S)ᵀ(W S) = Sᵀ G S = V Λ Vᵀ`` gives the right singular vectors of ``W S``; ``U_rᵀ W =
Λ_r^(-1/2) V_rᵀ Sᵀ G`` (r x n) needs G alone, and ``u_Bᵀ = B S V_r Λ_r^(-1/2) diag(sqrt(c))``,
``v = diag(1/sqrt(c)) U_rᵀ W`` (``c_i = ‖U_iᵀ W‖``, the equal-norm split of :mod:`._wsvd`) are the
same factors as the in-memory path's, formed a block of rows at a time; ``whitened_eym_error =
sqrt(Σ_{i>r} λ_i / Σ λ_i)``.

:func:`lowrank_bounded` gives the stored factors the same way (for assembly). Wide matrices (m < n)
and tensors of more than 2 dimensions are refused (no weight of a supported
architecture above the size limit is either). Memory: W as stored, G and V (2 x 8 n² bytes), a few
float32 blocks of rows.

References: Eckart & Young 1936; Higham, "Accuracy and Stability of Numerical Algorithms", §20 (Gram).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sahc_core.methods._bounded import ErrorSums, block_rows, float_blocks
from sahc_core.methods.lowrank import LowRankTensor, SVDConfig, factor_quant, lowrank_bytes, resolve_rank
from sahc_core.methods.quant import (QuantConfig, _decode, _grid_params, _round_to_grid, _safe_scale, fake_quantize,
                                     quantize)

#: Relative floor below which a singular value counts as zero (its column of u is set to 0).
_ZERO_SIGMA = 1e-12


def gram_eig(W: Tensor, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """``(λ, V)`` of ``WᵀW``: eigenvalues descending (float64, clamped at 0) and eigenvectors (n, n) float64."""
    from sahc_core.spectra._blocked import gram_of

    G = gram_of(W, precision="float32", device=device)
    lam, V = torch.linalg.eigh(G)
    del G
    return lam.flip(0).clamp_min(0.0), V.flip(1)


def takes_gram_path(W: Tensor) -> bool:
    """Whether (whitened) SVD compresses ``W`` through the Gram: a tall 2-D W above ``io.rows.BOUNDED_MIN_BYTES``
    of float32 (its thin SVD would not fit the memory bound)."""
    from sahc_core.io import rows

    return W.ndim == 2 and W.shape[0] >= W.shape[1] and 4 * W.numel() > rows.BOUNDED_MIN_BYTES


def _fp16_or_quant(v: Tensor, q: QuantConfig | None) -> Tensor:
    """``v`` as stored: fp16 without a factor grid, else fake-quantized on it (float32)."""
    return v.half().float() if q is None else fake_quantize(v, q)


def _check(W: Tensor) -> tuple[int, int]:
    if W.ndim != 2 or W.shape[0] < W.shape[1]:
        raise ValueError(f"a bounded SVD takes a tall 2-D matrix (m >= n), got shape {tuple(W.shape)}; "
                         "a wide or N-D tensor this large has no bounded SVD path.")
    return int(W.shape[0]), int(W.shape[1])


class _UQuant:
    """Quantizes the blocks ``u_B`` (r, b) of the stored factor ``u`` (r, m) exactly as ``quantize(u)`` would."""

    def __init__(self, q: QuantConfig | None, lo: Tensor | None = None, hi: Tensor | None = None) -> None:
        self.q = q
        self.scales = self.zeros = None
        if q is not None and q.group_size is None:  # one scale per rank row over all m: from the global range
            self.scales, self.zeros = _grid_params(torch.stack([lo, hi], dim=-1)[:, None, :], q)

    def __call__(self, u_block: Tensor) -> Tensor:
        if self.q is None:
            return u_block.half().float()
        if self.q.group_size is not None:  # the block's width is a multiple of the group size
            return fake_quantize(u_block, self.q)
        z = None if self.zeros is None else self.zeros.float()[..., None]
        x = u_block[:, None, :]  # (r, 1, b): one group per rank row
        qv = _round_to_grid(x, _safe_scale(self.scales)[..., None], z, self.q)
        return _decode(qv, self.scales, self.zeros).reshape(u_block.shape)


def _factors(lam: Tensor, V: Tensor, r: int, q: QuantConfig | None, dev: torch.device) -> dict:
    """Everything of rank r that does not depend on W's rows: V_r, 1/sqrt(σ_r), v̂, v̂ V_r and K."""
    sigma = lam.sqrt()
    sq = sigma[:r].sqrt()
    inv = torch.where(sigma[:r] > sigma[0] * _ZERO_SIGMA, 1.0 / sq.clamp_min(1e-300), torch.zeros_like(sq))
    Vr64 = V[:, :r].to(dev)
    v = (sq.to(dev)[:, None] * Vr64.T).to(torch.float32)  # (r, n)
    v_hat = _fp16_or_quant(v, q)
    vV = v_hat.double() @ Vr64  # (r, r): v̂ in the V_r basis
    K = v_hat.double() @ v_hat.double().T - vV @ vV.T  # v̂ (I - V_r V_rᵀ) v̂ᵀ, PSD
    return {"Vr": Vr64.to(torch.float32), "inv": inv.to(device=dev, dtype=torch.float32), "v_hat": v_hat,
            "vV": vV, "K": K}


def _u_range(W: Tensor, Vr: Tensor, inv: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """Per rank row, min and max of ``u`` over all m (the range of a per-row scale): one pass over W."""
    lo = hi = None
    for _, _, B in float_blocks(W, rows):
        u = (B.to(Vr.device) @ Vr * inv).T  # (r, b)
        blo, bhi = torch.aminmax(u, dim=1)
        lo = blo if lo is None else torch.minimum(lo, blo)
        hi = bhi if hi is None else torch.maximum(hi, bhi)
    return lo, hi


def _stored_factors(W: Tensor, cfg: SVDConfig, r: int, proj: Tensor, scale: Tensor, v: Tensor) -> LowRankTensor:
    """The stored rank-r factors: ``u = ((W proj) * scale)ᵀ`` formed a block of rows at a time, then quantized.

    Holds ``u`` (r x m float32) once to quantize it (``quantize`` works in row blocks); the result has
    no unquantized copies (``u_f32`` etc. are ``None``, as after loading).
    """
    m, n = W.shape
    q = factor_quant(m, n, cfg)
    proj, scale = proj.to(device=W.device, dtype=torch.float32), scale.to(device=W.device, dtype=torch.float32)
    u = torch.empty(r, m, dtype=torch.float32, device=W.device)
    for a, b, B in float_blocks(W, block_rows(n)):
        u[:, a:b] = (B @ proj * scale).T
    v = v.to(device=W.device, dtype=torch.float32)
    if q is None:
        return LowRankTensor((m, n), cfg, r, u.to(torch.float16), v.to(torch.float16))
    return LowRankTensor((m, n), cfg, r, quantize(u, q), quantize(v, q))


def lowrank_bounded(W: Tensor, cfg: SVDConfig, eig: tuple[Tensor, Tensor] | None = None) -> LowRankTensor:
    """``lowrank(W, cfg)`` of a big tall W in its stored dtype: the stored factors from the Gram (U never formed)."""
    m, n = _check(W)
    lam, V = eig if eig is not None else gram_eig(W, str(W.device))
    r = resolve_rank((m, n), cfg)
    sigma = lam.sqrt()
    sq = sigma[:r].sqrt()
    inv = torch.where(sigma[:r] > sigma[0] * _ZERO_SIGMA, 1.0 / sq.clamp_min(1e-300), torch.zeros_like(sq))
    return _stored_factors(W, cfg, r, V[:, :r], inv, sq[:, None] * V[:, :r].T)  # u = (U_r sqrt(S_r))ᵀ


def whitened_eig(W: Tensor, H: Tensor, damp: float, device: str = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(λ, V, SᵀG, S)``: the eigendecomposition of ``Sᵀ G S`` (``G = WᵀW`` from row blocks, ``S`` the
    Cholesky whitening of ``H``, :func:`._wsvd.whitening`), all float64."""
    from sahc_core.methods._wsvd import whitening
    from sahc_core.spectra._blocked import gram_of

    G = gram_of(W, precision="float32", device=device)
    S = whitening(H, damp=damp, device=device).S.to(G.device)
    StG = S.T @ G
    del G
    lam, V = torch.linalg.eigh(StG @ S)
    return lam.flip(0).clamp_min(0.0), V.flip(1), StG, S


def _whitened_factors(S: Tensor, lam: Tensor, V: Tensor, StG: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(proj, scale, v)`` of rank r: ``u_Bᵀ = (B proj) * scale`` and ``v`` as :mod:`._wsvd` stores them."""
    sigma = lam[:r].sqrt()
    ok = sigma > lam[0].sqrt() * _ZERO_SIGMA
    one = torch.ones_like(sigma)
    Vr = V[:, :r]
    UtW = (Vr.T @ StG) / torch.where(ok, sigma, one)[:, None]  # U_rᵀ W, (r, n)
    sc = torch.where(ok, UtW.norm(dim=1), torch.zeros_like(sigma)).sqrt()  # sqrt(c)
    live = sc > 0
    scale = torch.where(live, sc / torch.where(ok, sigma, one), torch.zeros_like(sc))
    v = torch.where(live[:, None], UtW / torch.where(live, sc, one)[:, None], torch.zeros_like(UtW))
    return S @ Vr, scale, v


def whitened_lowrank_bounded(W: Tensor, H: Tensor, cfg: SVDConfig, damp: float) -> LowRankTensor:
    """:func:`._wsvd.whitened_lowrank` of a big tall W in its stored dtype (the module docstring's Gram form)."""
    m, n = _check(W)
    lam, V, StG, S = whitened_eig(W, H, damp, str(W.device))
    r = resolve_rank((m, n), cfg)
    return _stored_factors(W, cfg, r, *_whitened_factors(S, lam, V, StG, r))


def bounded_measure(W: Tensor, cfg: SVDConfig, ctx: Any) -> dict:
    """:func:`registry.measure` numbers of ``lowrank(W, cfg)`` for a big tall W in its stored dtype.

    ``ctx``: the What-if context (``cached``, ``device``, ``w_row2``, ``calib``, ``xtx``, ``wHw``);
    the Gram's eigendecomposition is computed once per tensor and kept in ``ctx.cached``.
    """
    m, n = _check(W)
    lam, V = ctx.cached("svd_gram_eig", lambda: gram_eig(W, ctx.device))
    r, q = resolve_rank((m, n), cfg), factor_quant(m, n, cfg)
    f = _factors(lam, V, r, q, torch.device(ctx.device))
    out, quant2 = _row_pass(W, "svd", cfg, f["Vr"], f["inv"], f["v_hat"], ctx, (f["vV"], f["K"]))
    w2, total = float(ctx.w_row2.sum()), float(lam.sum())
    eym = math.sqrt(float(lam[r:].sum()) / total) if total > 0 else 1.0
    out.update(rank=r, trunc_error=eym, eym_error=eym,
               quant_error=math.sqrt(max(quant2, 0.0) / w2) if w2 > 0 else 1.0, measured_in_blocks=True)
    return out


def _row_pass(W: Tensor, method: str, cfg: SVDConfig, proj: Tensor, scale: Tensor, v_hat: Tensor, ctx: Any,
              basis: tuple[Tensor, Tensor] | None = None) -> tuple[dict, float]:
    """One pass over W's row blocks: ``û_Bᵀ`` quantized as ``quantize(u)`` would, ``Ŵ_B = û_Bᵀ v̂`` measured.

    With ``basis = (v̂ V_r, K)`` (plain SVD: ``proj = V_r``) it also sums ``‖W_r − Ŵ‖²`` (module docstring).
    """
    m, n = W.shape
    q = factor_quant(m, n, cfg)
    dev = torch.device(ctx.device)
    rows = block_rows(n, multiple=q.group_size if q is not None and q.group_size else 1)
    uq = _UQuant(q, *(_u_range(W, proj, scale, rows) if q is not None and q.group_size is None else ()))
    H = ctx.xtx() if ctx.calib is not None else None
    sums = ErrorSums(m, H, dev)
    quant2 = 0.0
    for a, b, B in float_blocks(W, rows):
        B = B.to(dev)
        P = B @ proj  # (b, r)
        u_hat_t = uq((P * scale).T.contiguous()).T  # (b, r) = û_Bᵀ
        if basis is not None:
            quant2 += float((P.double() - u_hat_t.double() @ basis[0]).square().sum())
            uh = u_hat_t.double()
            quant2 += float(((uh @ basis[1]) * uh).sum())
        sums.add(a, b, B, u_hat_t @ v_hat)  # Ŵ_B (b, n)
    return sums.numbers(method, W, lowrank_bytes((m, n), cfg), ctx.w_row2, ctx.wHw() if H is not None else None), quant2


def whitened_bounded_measure(W: Tensor, cfg: Any, ctx: Any) -> dict:
    """:func:`registry.measure` numbers of whitened SVD (``cfg``: a ``WSVDConfig``) for a big tall W in its stored dtype.

    Needs ``ctx.calib`` (the tensor's ``XᵀX`` through ``ctx.xtx()``); ``Sᵀ G S``'s eigendecomposition is
    kept in ``ctx.cached`` per statistics and ``damp``, so a rank or bit change re-uses it.
    """
    m, n = _check(W)
    if ctx.calib is None:
        raise ValueError("whitened SVD needs calibration statistics (its whitening is XᵀX's Cholesky factor).")
    H = ctx.xtx()
    key = f"wsvd_gram_eig:{getattr(ctx.calib, 'key', id(ctx.calib))}:{cfg.damp}"
    lam, V, StG, S = ctx.cached(key, lambda: whitened_eig(W, H, cfg.damp, ctx.device))
    svd = cfg.svd
    r, q = resolve_rank((m, n), svd), factor_quant(m, n, svd)
    proj, scale, v = _whitened_factors(S, lam, V, StG, r)
    dev = torch.device(ctx.device)
    v_hat = _fp16_or_quant(v.to(device=dev, dtype=torch.float32), q)
    out, _ = _row_pass(W, "wsvd", svd, proj.to(device=dev, dtype=torch.float32),
                       scale.to(device=dev, dtype=torch.float32), v_hat, ctx)
    total = float(lam.sum())
    out.update(rank=r, whitened_eym_error=math.sqrt(float(lam[r:].sum()) / total) if total > 0 else 1.0,
               measured_in_blocks=True)
    return out
