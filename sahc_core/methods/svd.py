"""``svd``: truncated SVD with fp16 or int-k factors (:mod:`sahc_core.methods.lowrank`), as a registry entry.

Also the fast What-if measurement of an SVD setting (:func:`fast_measure`): a new rank or factor bit
width only slices and quantizes the cached thin SVD of the tensor, never re-runs it. A tensor too big
for its thin SVD (the 248k embedding) is measured by :mod:`sahc_core.methods._svd_bounded` (factors
from the Gram's eigenvectors, U formed a block of rows at a time).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sahc_core import metrics
from sahc_core.methods._svd_bounded import bounded_measure, lowrank_bounded, takes_gram_path
from sahc_core.methods.lowrank import (
    LowRankTensor,
    SVDConfig,
    _load,
    factor_quant,
    lowrank,
    lowrank_bytes,
    resolve_rank,
    split_factors,
)
from sahc_core.methods.quant import QuantConfig, fake_quantize
from sahc_core.methods.registry import MethodSpec, Param, base_numbers, register
from sahc_core.methods.rtn import PLAN_GROUPS, adapt_group, group_options

#: Rank fractions a Pareto sweep tries (of min(m, n)).
SWEEP_RANK_FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)
#: Default rank fraction when neither rank nor rank_fraction is given.
DEFAULT_RANK_FRACTION = 0.25
#: Elements of Ŵ formed per block by :func:`fast_measure` (16 MiB of float32: the block's norms are
#: taken while it is in cache, and no m×n temporary is allocated).
_BLOCK_ELEMS = 1 << 22


def _mn(shape: tuple[int, ...]) -> tuple[int, int]:
    return math.prod(int(s) for s in shape[:-1]), int(shape[-1])


def predicted(S: Tensor, r: int, u: Tensor, v: Tensor, q: QuantConfig | None) -> dict:
    """The error of ``lowrank`` predicted from σ and the factors' storage alone (never from a measurement).

    With ``u = (U_r √S_r)ᵀ``, ``v = √S_r V_rᵀ`` stored as ``û = u + a``, ``v̂ = v + b`` (rounding errors,
    independent and zero-mean, entry variances from :func:`rtn.rounding_noise_var`):
    ``W − Ŵ = (W − W_r) − (aᵀv + uᵀb + aᵀb)``. The first term is the Eckart–Young–Mirsky residual,
    orthogonal to the other two (they lie in span(V_r) / span(U_r) rows / columns, up to ``aᵀb``), and
    ``E‖aᵀv‖² = Σ_k A_k ‖v_k‖² = Σ_k A_k σ_k`` (``A_k``: summed variances of row k of ``u``; ``B_k`` of
    ``v``), so ``E‖W − Ŵ‖² ≈ Σ_{i>r} σ_i² + Σ_{k≤r} (σ_k (A_k + B_k) + A_k B_k)``.

    Returns
    -------
    dict
        ``eym_error`` (EYM of rank r), ``predicted_quant_error`` (the factor part), ``predicted_error``
        (both in quadrature), ``prediction`` (the basis), all relative to ``‖W‖_F = sqrt(Σσ²)``.
    """
    from sahc_core.methods.rtn import rounding_noise_var

    s = S.detach().to(device="cpu", dtype=torch.float64)
    s2 = s.square()
    total = float(s2.sum())
    A = rounding_noise_var(u, q).sum(1).cpu()  # (r,)
    B = rounding_noise_var(v, q).sum(1).cpu()
    q2 = float((s[:r] * (A + B) + A * B).sum())
    rel = (lambda x2: math.sqrt(max(x2, 0.0) / total) if total > 0 else 1.0)  # noqa: E731
    return {"eym_error": rel(float(s2[r:].sum())), "predicted_quant_error": rel(q2),
            "predicted_error": rel(float(s2[r:].sum()) + q2),
            "prediction": "EYM error of the kept rank from sigma, in quadrature with the factors' rounding noise "
                          "sum_k sigma_k (A_k + B_k) + A_k B_k (A_k, B_k: sum of step^2/12 over factor row k; fp16: "
                          "ulp^2/12)"}


def extras(W: Tensor, c: LowRankTensor, W_hat: Tensor) -> dict:
    """rank, trunc_error and quant_error (measured, see lowrank's docstring) and the :func:`predicted` keys."""
    u, v, S = c.u_f32, c.v_f32, c.singular_values
    if u is None or v is None or S is None:  # loaded from storage: recompute the unquantized factors
        fresh = lowrank(W, c.config)
        u, v, S = fresh.u_f32, fresh.v_f32, fresh.singular_values
    Wd = W.detach().reshape(c.shape).to(device=u.device)
    W_r = (u.T @ v).reshape(c.shape)
    norm2 = float(metrics.row_norm2(Wd.to(torch.float32)).sum())
    W_hat = W_hat.to(device=u.device, dtype=torch.float32).reshape(c.shape)
    quant = math.sqrt(float(metrics.row_norm2(W_r - W_hat).sum()) / norm2) if norm2 > 0 else 1.0
    return {"rank": c.rank, "trunc_error": metrics.rel_error(Wd, W_r), "quant_error": quant,
            **predicted(S, c.rank, u, v, factor_quant(*_mn(c.shape), c.config))}


def _rotated(W: Tensor, factors: tuple[Tensor, Tensor, Tensor]) -> dict:
    """Per-tensor constants of the fast path: ``WV = W Vhᵀ`` (m, n); ``tail_col2[j] = ‖WV[:, j]‖²`` and
    ``head_col2[j] = ‖WV[:, j] − σ_j U[:, j]‖²``, so the measured truncation error of any rank r is
    ``Σ head_col2[:r] + Σ tail_col2[r:]`` without touching the matrix."""
    U, S, Vh = factors
    WV = W.to(Vh.device) @ Vh.T
    return {"WV": WV, "tail_col2": torch.linalg.vector_norm(WV, dim=0).double().square(),
            "head_col2": torch.linalg.vector_norm(WV - U * S, dim=0).double().square()}


def fast_measure(W: Tensor, cfg: SVDConfig, ctx: Any) -> dict:
    """:func:`registry.measure` numbers of ``lowrank(W, cfg)``, for m >= n computed in the right-singular basis.

    Hand-written for speed (a slider move must not redo two m×n products and six float64 passes):
    for m >= n, ``Vh`` is square orthogonal, so right-multiplying by ``Vhᵀ`` keeps every Frobenius
    norm, row norm and row dot product. In that basis ``W_r = [U_r S_r, 0]`` and ``Ŵ Vhᵀ = ûᵀ (v̂ Vhᵀ)``
    is the one m·r·n product per move; with ``E = WV − ŴV``: total² = ‖E‖², quant² = ‖W_r − Ŵ‖² =
    ‖E[:, :r]‖² + ‖ŴV[:, r:]‖² (up to the float32 residual ``WV[:, :r] − U_r S_r`` of the SVD,
    ~1e-6 relative), trunc² from cached column norms. At full rank (r = n) there is nothing to split, so
    the rotation is skipped and ``W − Ŵ`` is measured directly. The factors are quantized with
    :func:`quant.fake_quantize` (bit-identical to the stored codes, without packing); ``Ŵ`` is formed
    in blocks of rows whose norms are taken while the block is in cache. With calibration statistics
    ``tr(E H Eᵀ)`` accumulates per block (with ``Vh H Vhᵀ`` in the rotated basis). Agrees with
    :func:`registry.measure` (tested). Wide matrices (m < n) take the registry's measure.
    """
    factors = ctx.factors()
    if W.ndim != 2 or W.shape[0] < W.shape[1]:
        from sahc_core.methods.registry import measure

        return measure(W, cfg, compressed=lowrank(W, cfg, factors=factors), calib=ctx.calib)
    rot = ctx.cached("svd_rotated", lambda: _rotated(W, factors))
    _, S, Vh = factors
    m, n = W.shape
    r, dev, q = resolve_rank(tuple(W.shape), cfg), Vh.device, factor_quant(m, n, cfg)
    u, v = split_factors(factors, r)
    u_hat, v_hat = (f.half().float() if q is None else fake_quantize(f, q) for f in (u, v))
    full = r == n
    right = v_hat if full else v_hat @ Vh.T     # (r, n): Ŵ = ûᵀ right, in the original or rotated basis
    target = W.to(dev) if full else rot["WV"]   # W, or W Vhᵀ
    H = None
    if ctx.calib is not None:
        H = ctx.xtx().to(dev) if full else ctx.cached("svd_rotated_xtx", lambda: (Vh.double() @ ctx.xtx().to(dev)
                                                                                    @ Vh.double().T))
    h_row2 = torch.empty(m, dtype=torch.float64, device=dev)
    e_row2, head2, tail2, eHe = torch.empty_like(h_row2), 0.0, 0.0, 0.0
    step = max(1, _BLOCK_ELEMS // n)
    for i in range(0, m, step):
        Wh = u_hat[:, i:i + step].T @ right    # (b, n) block of Ŵ (Vhᵀ)
        h_row2[i:i + step] = metrics.row_norm2(Wh)
        if not full:
            tail2 += float(metrics.row_norm2(Wh[:, r:]).sum())
        E = Wh.sub_(target[i:i + step])         # in place: -(W - Ŵ) block
        e_row2[i:i + step] = metrics.row_norm2(E)
        if not full:
            head2 += float(metrics.row_norm2(E[:, :r]).sum())
        if H is not None:
            e = E.double()
            eHe += float(((e @ H) * e).sum())
    out = base_numbers("svd", W, lowrank_bytes(tuple(W.shape), cfg),
                       *metrics.from_row_norms(ctx.w_row2.to(dev), h_row2, e_row2))
    w2 = float(ctx.w_row2.sum())
    rel = (lambda x2: math.sqrt(max(x2, 0.0) / w2) if w2 > 0 else 1.0)  # noqa: E731
    out.update(rank=r, trunc_error=rel(float(rot["head_col2"][:r].sum() + rot["tail_col2"][r:].sum())),
               quant_error=rel(float(e_row2.sum()) if full else head2 + tail2), **predicted(S, r, u, v, q))
    if H is not None:
        wHw = ctx.wHw()
        out["output_error"] = math.sqrt(max(eHe, 0.0) / wHw) if wHw > 0 else math.nan
    return out


def _compress(W: Tensor, cfg: SVDConfig) -> LowRankTensor:
    """``lowrank(W, cfg)``; a tall 2-D W above ``io.rows.BOUNDED_MIN_BYTES`` of float32 takes the Gram path."""
    if takes_gram_path(W):
        return lowrank_bounded(W, cfg)
    return lowrank(W, cfg)


def label_for(cfg: Any, name: str = "svd") -> str:
    """``svd r256 int4-g128`` (or ``r0.25k`` for a rank fraction); shared with whitened SVD."""
    g = "row" if cfg.group_size is None else f"g{cfg.group_size}"
    bits = "fp16" if cfg.bits is None else f"int{cfg.bits}-{g}"
    r = f"r{cfg.rank}" if cfg.rank is not None else f"r{cfg.rank_fraction:g}k"
    return f"{name} {r} {bits}"


def _candidates(shape: tuple[int, ...], component: str | None) -> list[SVDConfig]:
    if len(shape) < 2:
        return []
    m, n = _mn(shape)
    k = min(m, n)
    ranks = sorted({max(1, round(f * k)) for f in SWEEP_RANK_FRACTIONS})
    g = next((g for g in (128, 64, 32) if m % g == 0 and n % g == 0), None)
    return [SVDConfig(rank=r, bits=b, group_size=g) for r in ranks for b in (4, 8, None)]


def _adapt(shape: tuple[int, ...], cfg: SVDConfig) -> tuple[SVDConfig, str] | None:
    """A factor group size that must divide both m and n falls back like int-k's, on gcd(m, n)."""
    m, n = _mn(shape)
    if cfg.bits is None:
        return None
    return adapt_group(math.gcd(m, n), cfg, what="gcd(m, n) of the factors")


def _rank_options(shape: tuple[int, ...]) -> list[int]:
    return list(range(1, min(_mn(shape)) + 1))


SPEC = register(MethodSpec(
    name="svd", title="SVD + int-k factors", config=SVDConfig,
    compress=lambda W, cfg, calib=None: _compress(W, cfg), nbytes=lowrank_bytes, load=_load,
    params=(
        Param("rank", "int", None, min=1, nullable=True, scope="tensor", omit_if_none=True,
              options=_rank_options, default_for=lambda shape: max(1, min(_mn(shape)) // 4), help="kept rank r"),
        Param("rank_fraction", "float", DEFAULT_RANK_FRACTION, min=0.0, max=1.0, nullable=True, scope="plan",
              omit_if_none=True, unless="rank", help="r = rank_fraction * min(m, n)"),
        Param("bits", "int", 4, min=2, max=8, nullable=True, null_label="fp16", choices=(2, 3, 4, 5, 6, 8),
              help="factor code width; fp16 = unquantized factors"),
        Param("group_size", "int", 128, min=1, nullable=True, null_label="per row", choices=PLAN_GROUPS,
              options=lambda shape: group_options(math.gcd(*_mn(shape))),
              default_for=lambda shape: max((g for g in group_options(math.gcd(*_mn(shape)))[:-1] if g <= 128),
                                            default=None),
              help="factor quantization group along m and n (must divide both)"),
        Param("scheme", "choice", "asym", choices=("asym", "sym")),
    ),
    label=label_for, min_ndim=2, measure=fast_measure, extras=extras, candidates=_candidates, adapt=_adapt,
    measure_bounded=bounded_measure,
    compress_in=lambda ctx, cfg: lowrank(ctx.W, cfg, factors=ctx.factors()),
    color="#F58518",
    description="Truncated SVD W ≈ U_r S_r V_rᵀ with the singular values folded into two factors, stored in "
                "fp16 or int-k."))
