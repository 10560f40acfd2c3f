"""Tensor-Train matrix (TT-matrix) decomposition of an embedding / LM head ``V × d``.

The matrix is padded with zero rows / columns to ``P = prod(row_factors) >= V`` and
``Q = prod(col_factors) >= d``, viewed as a tensor with modes ``(i_1 j_1, ..., i_D j_D)`` and
factorized into ``D`` cores ``G_k`` of shape ``(r_{k-1}, i_k, j_k, r_k)`` with ``r_0 = r_D = 1``::

    W[(a_1..a_D), (b_1..b_D)] = G_1[:, a_1, b_1, :] @ G_2[:, a_2, b_2, :] @ ... @ G_D[:, a_D, b_D, :]

(row / column multi-indices in row-major order). Example: ``49152 × 576`` with row factors
``(32, 32, 48)``, column factors ``(8, 8, 9)`` and ranks ``(1, 64, 64, 1)``.

Padding rows cost nothing by themselves (only the core sizes are stored); they are reported as
``padded_rows`` / ``padded_cols``. Default factors: the smallest ``P >= V`` (and ``Q >= d``) that splits
into ``D`` factors none larger than ``2 * ceil(P^(1/D))``, split as evenly as possible, ascending.

Factors are bounded by the real shape: ``prod(row_factors) <= 2 V`` and ``prod(col_factors) <= 2 d`` (the
padded tensor is at most twice the matrix along each side; every default split satisfies it), and a
TT has at most :data:`MAX_CORES` cores. Both, like the ranks, are checked by :func:`tt_bytes`, which a
plan calls for every tensor when it is projected, so a plan that does not fit is refused at plan time,
never after minutes of assembly.

Ranks are strict: ``r_k <= min(r_{k-1} i_k j_k, prod_{l>k} i_l j_l)`` (what the unfoldings allow);
anything else raises ``ValueError`` naming the largest allowed value (tensorly clamps silently,
which would make projected and actual bytes disagree). :func:`tt_ranks_for_error` picks ranks for an
error target (Oseledets' δ-truncation) so that a plan can fix them before projecting bytes.

Cores are stored in fp16 (``bits=None``) or quantized with :mod:`sahc_core.methods.quant`, each viewed as
``(r_{k-1}, i_k j_k r_k)`` (one row per left rank index; ``group_size`` must divide ``i_k j_k r_k``).
Bytes: ``Σ_k 2 r_{k-1} i_k j_k r_k`` or ``Σ_k quant_bytes((r_{k-1}, i_k j_k r_k))``.

The layout (factors, padding, rank limits) is in :mod:`sahc_core.methods._tt_layout`, the TT-SVD sweep
and the error it predicts in :mod:`sahc_core.methods._tt_sweep`, the streamed first step of a big matrix
in :mod:`sahc_core.methods._tt_bounded`.

References: I. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011;
A. Novikov et al., "Tensorizing Neural Networks", NeurIPS 2015.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sahc_core import metrics
from sahc_core.methods._tt_layout import _Layout, _layout, _tensorize, suggest_factors  # noqa: F401  (public here)
from sahc_core.methods._tt_sweep import _tt_svd, _tt_svd_from, predicted
from sahc_core.methods.quant import (QuantConfig, QuantizedTensor, _as_int, load_part, optional_quant_config, part_state,
                             quant_bytes, quantize, state_nbytes)


#: Most TT cores (the study uses 3; more than a handful only multiplies factors of 1).
MAX_CORES = 8


def _int_tuple(values: object, name: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a list of integers, got {values!r}.")
    return tuple(_as_int(v, name) for v in values)  # type: ignore[union-attr]


@dataclass(frozen=True)
class TTConfig:
    """TT-matrix settings.

    Parameters
    ----------
    ranks : tuple of int
        ``(1, r_1, ..., r_{D-1}, 1)``; ``len(ranks) - 1`` is the number of cores D (at least 2).
    bits : int or None
        Core code width (2..8), ``None`` = fp16 cores.
    row_factors, col_factors : tuple of int, optional
        D factors whose product is at least V (resp. d); chosen automatically when omitted.
    group_size : int or None
        Quantization group along each core's ``i_k j_k r_k`` row; ``None`` = one scale per row.
    scheme : {"asym", "sym"}
    """

    ranks: tuple[int, ...] = (1, 64, 64, 1)
    bits: int | None = None
    row_factors: tuple[int, ...] | None = None
    col_factors: tuple[int, ...] | None = None
    group_size: int | None = None
    scheme: str = "asym"

    def __post_init__(self) -> None:
        ranks = _int_tuple(self.ranks, "tt ranks")
        if len(ranks) < 3 or ranks[0] != 1 or ranks[-1] != 1 or min(ranks) < 1:
            raise ValueError(f"tt ranks must look like [1, r1, ..., 1] with at least 2 cores and every r >= 1, got {list(ranks)}.")
        if len(ranks) - 1 > MAX_CORES:
            raise ValueError(f"tt ranks give {len(ranks) - 1} cores; at most {MAX_CORES} are allowed.")
        object.__setattr__(self, "ranks", ranks)
        for name in ("row_factors", "col_factors"):
            f = getattr(self, name)
            if f is not None:
                f = _int_tuple(f, name)
                if len(f) != len(ranks) - 1 or min(f) < 1:
                    raise ValueError(f"{name} must hold {len(ranks) - 1} positive integers (one per core), got {list(f)}.")
                object.__setattr__(self, name, f)
        self.quant_config  # validates bits / group_size / scheme

    @property
    def n_cores(self) -> int:
        return len(self.ranks) - 1

    @property
    def quant_config(self) -> QuantConfig | None:
        """The core quantizer, or ``None`` for fp16 cores."""
        return optional_quant_config(self.bits, self.group_size, self.scheme)


def _core_quant(lay: _Layout, cfg: TTConfig) -> QuantConfig | None:
    q = cfg.quant_config
    if q is not None and q.group_size is not None:
        for k, (n, r) in enumerate(zip(lay.modes, lay.ranks[1:])):
            if (n * r) % q.group_size:
                raise ValueError(f"group_size {q.group_size} must divide the row length {n * r} of TT core {k}.")
    return q


def tt_bytes(shape: tuple[int, ...], cfg: TTConfig) -> int:
    """Exact stored bytes of ``tt_decompose(W, cfg)`` for a matrix of ``shape``."""
    lay = _layout(tuple(shape), cfg)
    q = _core_quant(lay, cfg)
    r = lay.ranks
    if q is None:
        return sum(2 * r[k] * n * r[k + 1] for k, n in enumerate(lay.modes))
    return sum(quant_bytes((r[k], n * r[k + 1]), q) for k, n in enumerate(lay.modes))


def tt_ranks_for_error(W: Tensor, eps: float, n_cores: int = 3, row_factors: tuple[int, ...] | None = None,
                       col_factors: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Ranks ``(1, ..., 1)`` of the δ-truncated TT-SVD with relative error at most ``eps`` (Oseledets 2011)."""
    if not 0 < eps < 1:
        raise ValueError(f"the TT error target must be in (0, 1), got {eps!r}.")
    cfg = TTConfig(ranks=(1,) * (n_cores + 1), row_factors=row_factors, col_factors=col_factors)
    lay = _layout(tuple(W.shape), cfg, check_ranks=False)
    X = _tensorize(W, lay)
    norm2 = float(torch.linalg.vector_norm(X, dtype=torch.float64)) ** 2
    cores, _ = _tt_svd(X, None, (eps ** 2) * norm2 / (n_cores - 1))
    return (1,) + tuple(c.shape[2] for c in cores)


@dataclass(frozen=True, eq=False)
class TTMatrix:
    """Stored TT cores (fp16 tensors or :class:`QuantizedTensor` of the ``(r_{k-1}, i_k j_k r_k)`` view).

    ``svd_cores`` (the unrounded TT-SVD cores ``(r_{k-1}, n_k, r_k)``) and ``discarded`` (δ_k² per
    step) are kept in memory for :func:`predicted`, not stored; ``None`` after loading.
    """

    shape: tuple[int, int]
    config: TTConfig
    tt_shape: dict
    cores: tuple[Tensor | QuantizedTensor, ...]
    svd_cores: tuple[Tensor, ...] | None = field(default=None, repr=False, compare=False)
    discarded: tuple[float, ...] | None = field(default=None, repr=False, compare=False)
    _float_cores: list = field(default_factory=list, repr=False, compare=False)

    @property
    def padded_rows(self) -> int:
        return math.prod(self.tt_shape["row_factors"]) - self.shape[0]

    @property
    def padded_cols(self) -> int:
        return math.prod(self.tt_shape["col_factors"]) - self.shape[1]

    def float_cores(self) -> list[Tensor]:
        """Cores ``(r_{k-1}, i_k, j_k, r_k)`` in float32 as stored (dequantized when quantized)."""
        if not self._float_cores:
            r, rf, cf = self.tt_shape["ranks"], self.tt_shape["row_factors"], self.tt_shape["col_factors"]
            for k, c in enumerate(self.cores):
                t = c.reconstruct(torch.float32) if isinstance(c, QuantizedTensor) else c.to(torch.float32)
                self._float_cores.append(t.reshape(r[k], rf[k], cf[k], r[k + 1]))
        return self._float_cores

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The full ``V × d`` matrix (tensorly's ``tt_matrix_to_tensor``, padding cut off)."""
        import tensorly as tl  # imported here: keeps ``import sahc_core.methods.registry`` cheap
        from tensorly.tt_matrix import tt_matrix_to_tensor

        with tl.backend_context("pytorch", local_threadsafe=True):
            full = tt_matrix_to_tensor(self.float_cores())
        P, Q = math.prod(self.tt_shape["row_factors"]), math.prod(self.tt_shape["col_factors"])
        return full.reshape(P, Q)[: self.shape[0], : self.shape[1]].to(dtype)

    def rows(self, idx: Tensor | list[int]) -> Tensor:
        """Rows ``idx`` of the matrix, ``(len(idx), d)`` float32, without building the full matrix."""
        cores = self.float_cores()
        idx_t = torch.as_tensor(idx, dtype=torch.int64, device=cores[0].device).reshape(-1)
        if idx_t.numel() and (idx_t.min() < 0 or idx_t.max() >= self.shape[0]):
            raise ValueError(f"row indices must be in [0, {self.shape[0]}).")
        digits, rest = [], idx_t
        for f in reversed(self.tt_shape["row_factors"]):  # row-major multi-index
            digits.append(rest % f)
            rest = rest // f
        digits.reverse()
        B, cols = idx_t.numel(), self.tt_shape["col_factors"][0]
        out = cores[0][0, digits[0]]  # (B, j_1, r_1)
        for k in range(1, len(cores)):
            g = cores[k].permute(1, 0, 2, 3)[digits[k]]  # (B, r_{k-1}, j_k, r_k)
            cols *= g.shape[2]
            out = torch.einsum("bxr,brys->bxys", out, g).reshape(B, cols, g.shape[-1])
        return out.reshape(B, cols)[:, : self.shape[1]]

    def state(self) -> dict[str, Tensor]:
        return {key: t for k, c in enumerate(self.cores) for key, t in part_state(f"core{k}", c).items()}

    def meta(self) -> dict:
        return {"method": "tt", "config": _plan_form(self.config), "shape": list(self.shape), "tt_shape": self.tt_shape}

    @property
    def nbytes(self) -> int:
        return state_nbytes(self.state())


def _store(core: Tensor, q: QuantConfig | None) -> Tensor | QuantizedTensor:
    view = core.reshape(core.shape[0], -1).to(torch.float32)  # (r_{k-1}, i_k j_k r_k)
    return view.to(torch.float16) if q is None else quantize(view, q)


def tt_decompose(W: Tensor, cfg: TTConfig, first_eig: tuple[Tensor, Tensor] | None = None) -> TTMatrix:
    """TT-SVD of the ``V × d`` matrix ``W`` (any float dtype) into TT-matrix cores (on ``W``'s device).

    When the first unfolding is wide (every default layout), its step is streamed from W in chunks
    (:mod:`sahc_core.methods._tt_bounded`: no float32 tensorization, the 248k embedding's TT in a
    bounded memory); ``first_eig`` (:func:`first_eig_of`) re-uses that step's Gram eigendecomposition,
    which depends on the layout only (a rank sweep computes it once).

    Returns
    -------
    TTMatrix
        With ``.tt_shape`` (row factors, column factors, ranks), ``.rows(idx)``, ``.padded_rows``.
    """
    from sahc_core.methods import _tt_bounded

    lay = _layout(tuple(W.shape), cfg)
    q = _core_quant(lay, cfg)
    if _tt_bounded.first_is_wide(lay.modes):
        L, R, d1 = _tt_bounded.first_step(W, lay.row_factors, lay.col_factors, lay.ranks[1], first_eig)
        cores, discarded = _tt_svd_from(R, lay.modes, lay.ranks, cores=[L.reshape(1, lay.modes[0], L.shape[1])],
                                        discarded=[d1])
    else:
        X = _tensorize(W, lay)
        if not torch.isfinite(X).all():
            raise ValueError("the matrix contains NaN or Inf values and cannot be decomposed.")
        cores, discarded = _tt_svd(X, lay.ranks)
    return TTMatrix((lay.V, lay.d), cfg, lay.tt_shape(), tuple(_store(c, q) for c in cores), tuple(cores),
                    tuple(discarded))


def first_eig_of(W: Tensor, cfg: TTConfig) -> tuple[Tensor, Tensor] | None:
    """The first TT-SVD step's Gram eigendecomposition for ``cfg``'s layout (``None``: not streamed)."""
    from sahc_core.methods import _tt_bounded

    lay = _layout(tuple(W.shape), cfg)
    if not _tt_bounded.first_is_wide(lay.modes):
        return None
    return _tt_bounded.first_eig(W, lay.row_factors, lay.col_factors)


def _compress_in(ctx, cfg: TTConfig) -> TTMatrix:
    """TT of the context's tensor re-using its cached first-step Gram (same layout for every rank)."""
    lay = _layout(tuple(ctx.W.shape), cfg, check_ranks=False)
    W = ctx.W.to(ctx.device)
    eig = ctx.cached(f"tt_first_eig:{lay.row_factors}:{lay.col_factors}", lambda: first_eig_of(W, cfg))
    return tt_decompose(W, cfg, eig)


def _load(state: dict[str, Tensor], meta: dict, cfg: TTConfig) -> TTMatrix:
    """Rebuild a :class:`TTMatrix` from ``state()`` / ``meta()`` (used by methods.load_compressed)."""
    shape = tuple(int(s) for s in meta["shape"])
    stored = meta.get("tt_shape", {})
    cfg_f = TTConfig(cfg.ranks, cfg.bits, tuple(stored.get("row_factors") or ()) or cfg.row_factors,
                     tuple(stored.get("col_factors") or ()) or cfg.col_factors, cfg.group_size, cfg.scheme)
    lay = _layout(shape, cfg_f)
    q = _core_quant(lay, cfg_f)
    cores = tuple(load_part(state, f"core{k}", (lay.ranks[k], n * lay.ranks[k + 1]), q, "TT")
                  for k, n in enumerate(lay.modes))
    out = TTMatrix(shape, cfg, lay.tt_shape(), cores)
    if set(state) != set(out.state()):
        raise ValueError(f"TT state must hold exactly {sorted(out.state())}, got {sorted(state)}.")
    return out


def _extras(W: Tensor, c: TTMatrix, W_hat: Tensor) -> dict:
    fresh = c if c.svd_cores is not None else tt_decompose(W, c.config)  # loaded: redo the sweep once
    norm2 = float(metrics.row_norm2(W.detach()).sum())  # float64 sum of per-row norms, no float64 copy of W
    return {"tt_shape": c.tt_shape, "padded_rows": c.padded_rows, "padded_cols": c.padded_cols,
            **predicted(fresh.svd_cores, fresh.discarded, c.config.quant_config, norm2,
                        padded=bool(c.padded_rows or c.padded_cols))}


#: The reference study's TT sweep (section 4), smallest to largest ranks.
STUDY_TT_RANKS: tuple[tuple[int, ...], ...] = (
    (1, 8, 8, 1), (1, 16, 16, 1), (1, 32, 32, 1), (1, 64, 64, 1), (1, 128, 128, 1), (1, 256, 256, 1))


def fitting(shape: tuple[int, ...], ranks_list, bits: int | None = None) -> list[TTConfig]:
    """TT configs of ``ranks_list`` that the reshaping of ``shape`` can hold (the others are skipped)."""
    out = []
    for ranks in ranks_list:
        cfg = TTConfig(ranks=tuple(int(r) for r in ranks), bits=bits)
        try:
            tt_bytes(tuple(shape), cfg)
        except ValueError:
            continue
        out.append(cfg)
    return out


def rank_options(shape: tuple[int, ...], r1: int | None = None, cap: int = 1024) -> list[int]:
    """Powers of two the 3-core TT layout of ``shape`` allows: for ``r1`` (``r1=None``) or for ``r2``."""
    out = []
    for p in (2**i for i in range(cap.bit_length())):
        try:
            tt_bytes(tuple(shape), TTConfig(ranks=(1, p, 1, 1) if r1 is None else (1, r1, p, 1)))
        except ValueError:
            break
        out.append(p)
    return out


def _label(cfg: TTConfig) -> str:
    return f"tt {list(cfg.ranks)}" + ("" if cfg.bits is None else f" int{cfg.bits}")


def _register() -> None:
    from sahc_core.methods import _tt_bounded
    from sahc_core.methods.registry import MethodSpec, Param, register

    register(MethodSpec(
        name="tt", title="Tensor-Train", config=TTConfig,
        compress=lambda W, cfg, calib=None: tt_decompose(W, cfg), nbytes=tt_bytes, load=_load,
        params=(
            Param("tt_ranks", "int_list", [1, 64, 64, 1], field="ranks", options=lambda shape: rank_options(shape),
                  help="[1, r1, ..., 1]: TT ranks (a widget offers the powers of two the reshaping allows)"),
            Param("bits", "int", None, min=2, max=8, nullable=True, null_label="fp16", choices=(4, 6, 8),
                  aliases=("tt_bits",), help="core code width; fp16 = unquantized cores"),
            Param("group_size", "int", None, min=1, nullable=True, null_label="per row", scope="plan"),
            Param("scheme", "choice", "asym", choices=("asym", "sym"), scope="plan"),
            Param("row_factors", "int_list", None, nullable=True, omit_if_none=True, scope="json",
                  help="factors of the padded row count (automatic when omitted)"),
            Param("col_factors", "int_list", None, nullable=True, omit_if_none=True, scope="json",
                  help="factors of the padded column count (automatic when omitted)"),
        ),
        label=_label, components=frozenset({"embedding"}), min_ndim=2, extras=_extras, compress_in=_compress_in,
        measure_bounded=_tt_bounded.bounded_measure,
        candidates=lambda shape, component: fitting(shape, STUDY_TT_RANKS) if component == "embedding" else [],
        color="#54A24B",
        description="Tensor-Train matrix of the embedding / LM head (Oseledets 2011; Novikov et al. 2015)."))


_register()


def _plan_form(cfg) -> dict:
    """The config's plan-JSON dict (the registry's generic form)."""
    from sahc_core.methods.registry import config_to_dict

    return config_to_dict(cfg)
