"""``wsvd``: activation-whitened truncated SVD (SVD-LLM), as a registry entry.

The kernel is :mod:`sahc_core.methods._wsvd` (Wang et al. 2024, section 3.1): truncate ``W S`` with
``S Sᵀ = XᵀX + λI``, so that the rank-r truncation minimises the OUTPUT error on the calibration
activations; the factors are stored exactly like plain SVD's (same keys, same bytes, optional int-k
factors). Needs the layer's calibration statistics. A slider move re-truncates the cached whitened
SVD of the tensor (``compress_in``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sahc_core.methods._svd_bounded import takes_gram_path, whitened_bounded_measure, whitened_lowrank_bounded
from sahc_core.methods._wsvd import DEFAULT_DAMP, whitened_factors, whitened_lowrank
from sahc_core.methods.lowrank import SVDConfig, _load as _svd_load, lowrank_bytes
from sahc_core.methods.registry import MethodSpec, Param, Tagged, register
from sahc_core.methods.svd import SWEEP_RANK_FRACTIONS, _adapt, _mn, _rank_options, label_for
from sahc_core.methods.rtn import PLAN_GROUPS, group_options


@dataclass(frozen=True)
class WSVDConfig:
    """Whitened SVD settings: plain SVD's (rank or rank_fraction, factor bits/group/scheme) plus ``damp``."""

    rank: int | None = None
    rank_fraction: float | None = None
    bits: int | None = 4
    group_size: int | None = 128
    scheme: str = "asym"
    damp: float = DEFAULT_DAMP

    def __post_init__(self) -> None:
        self.svd  # validates the SVD fields
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp < 1):
            raise ValueError(f"damp must be a small positive fraction of mean(diag H), got {self.damp!r}.")

    @property
    def svd(self) -> SVDConfig:
        return SVDConfig(self.rank, self.rank_fraction, self.bits, self.group_size, self.scheme)


def _compress(W, cfg: WSVDConfig, calib) -> Tagged:
    """A tall 2-D W above ``io.rows.BOUNDED_MIN_BYTES`` of float32 takes the Gram path (``_svd_bounded``)."""
    if takes_gram_path(W):
        return Tagged(whitened_lowrank_bounded(W, calib.xtx, cfg.svd, cfg.damp), "wsvd", cfg)
    return Tagged(whitened_lowrank(W, calib.xtx, cfg.svd, damp=cfg.damp), "wsvd", cfg)


def _compress_in(ctx, cfg: WSVDConfig) -> Tagged:
    """Re-truncate the tensor's whitened SVD, computed once per (tensor, statistics, damp)."""
    f = ctx.cached(f"wsvd:{getattr(ctx.calib, 'key', id(ctx.calib))}:{cfg.damp}",
                   lambda: whitened_factors(ctx.W, ctx.calib.xtx, damp=cfg.damp))
    return Tagged(whitened_lowrank(ctx.W, ctx.calib.xtx, cfg.svd, factors=f), "wsvd", cfg)


def _load(state, meta, cfg: WSVDConfig) -> Tagged:
    return Tagged(_svd_load(state, meta, cfg.svd), "wsvd", cfg)


def _extras(W, c, W_hat) -> dict:
    """rank and the whitened EYM error: the predicted OUTPUT error on the fitting statistics."""
    out = {"rank": c.inner.rank}
    S = getattr(c.inner, "singular_values", None)
    if S is not None:
        s2 = S.detach().to(torch.float64).square()
        total = float(s2.sum())
        out["whitened_eym_error"] = math.sqrt(float(s2[c.inner.rank:].sum()) / total) if total > 0 else 1.0
    return out


def _candidates(shape, component) -> list[WSVDConfig]:
    m, n = _mn(shape)
    k = min(m, n)
    ranks = sorted({max(1, round(f * k)) for f in SWEEP_RANK_FRACTIONS})
    g = next((g for g in (128, 64, 32) if m % g == 0 and n % g == 0), None)
    return [WSVDConfig(rank=r, bits=b, group_size=g) for r in ranks for b in (4, 8, None)]


SPEC = register(MethodSpec(
    name="wsvd", title="Whitened SVD (SVD-LLM)", config=WSVDConfig, compress=_compress,
    nbytes=lambda shape, cfg: lowrank_bytes(shape, cfg.svd), load=_load,
    params=(
        Param("rank", "int", None, min=1, nullable=True, scope="tensor", omit_if_none=True,
              options=_rank_options, default_for=lambda shape: max(1, min(_mn(shape)) // 4), help="kept rank r"),
        Param("rank_fraction", "float", 0.25, min=0.0, max=1.0, nullable=True, scope="plan", omit_if_none=True,
              unless="rank", help="r = rank_fraction * min(m, n)"),
        Param("bits", "int", 4, min=2, max=8, nullable=True, null_label="fp16", choices=(2, 3, 4, 5, 6, 8)),
        Param("group_size", "int", 128, min=1, nullable=True, null_label="per row", choices=PLAN_GROUPS,
              options=lambda shape: group_options(math.gcd(*_mn(shape)))),
        Param("scheme", "choice", "asym", choices=("asym", "sym")),
        Param("damp", "float", DEFAULT_DAMP, min=0.0, max=1.0, scope="json",
              help="λ = damp · mean(diag XᵀX) added before the Cholesky whitening"),
    ),
    label=lambda cfg: label_for(cfg, "wsvd"), min_ndim=2, needs_calibration=True, extras=_extras, candidates=_candidates,
    adapt=lambda shape, cfg: _adapt(shape, cfg), compress_in=_compress_in, measure_bounded=whitened_bounded_measure,
    color="#E45756",
    description="Activation-whitened SVD (Wang et al. 2024, SVD-LLM): the truncation minimises the output "
                "error on calibration activations; plain SVD's storage and bytes."))

