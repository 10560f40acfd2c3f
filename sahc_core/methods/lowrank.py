"""Truncated SVD ``W ≈ U_r S_r V_rᵀ`` with fp16 or int-k quantized factors, and its error split.

Storage: the singular values are folded symmetrically into the factors,
``u = (U_r · sqrt(S_r))ᵀ`` of shape ``(r, m)`` and ``v = sqrt(S_r) · V_rᵀ`` of shape ``(r, n)``, so
``W_r = uᵀ v`` and both factors have the same scale (which suits a shared quantizer). Both are
stored with one row per rank component: in fp16 (``bits=None``, keys ``u``, ``v``) or quantized with
:mod:`sahc_core.methods.quant` group-wise **along the matrix dimension** (groups of ``group_size`` along m for
``u`` and along n for ``v``; keys ``u.codes``, ``u.scales``, ``u.zeros``, ...). Grouping along m / n
rather than along the rank means any rank works; ``group_size`` must divide both m and n.

Bytes: ``2 r (m + n)`` for fp16 factors, else ``quant_bytes((r, m)) + quant_bytes((r, n))``.

Errors (relative to ``||W||_F``), as in the reference study's "SVD error / total error":
``trunc_error = ||W - W_r|| / ||W||`` measured (equals the Eckart–Young–Mirsky prediction
``eym_error = sqrt(Σ_{i>r} σ_i² / Σ_i σ_i²)`` for an exact SVD), ``quant_error = ||W_r - Ŵ|| / ||W||``
and the total ``rel_error = ||W - Ŵ|| / ||W||``.

Tensors with more than 2 dimensions are viewed as ``(prod(shape[:-1]), shape[-1])``.

References: Eckart & Young 1936; Mirsky 1960.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sahc_core.device import resolve_device
from sahc_core.methods.quant import (
    QuantConfig,
    QuantizedTensor,
    _as_int,
    load_part,
    optional_quant_config,
    part_state,
    quant_bytes,
    quantize,
    state_nbytes,
)


@dataclass(frozen=True)
class SVDConfig:
    """Truncated SVD settings: give exactly one of ``rank`` / ``rank_fraction``.

    Parameters
    ----------
    rank : int, optional
        Kept rank r, ``1 <= r <= min(m, n)``.
    rank_fraction : float, optional
        ``r = max(1, round(rank_fraction * min(m, n)))``, ``0 < rank_fraction <= 1``.
    bits : int or None
        Factor code width (2..8); ``None`` stores the factors in fp16.
    group_size : int or None
        Quantization group along m (for ``u``) and n (for ``v``); ``None`` = one scale per rank row.
    scheme : {"asym", "sym"}
    """

    rank: int | None = None
    rank_fraction: float | None = None
    bits: int | None = 4
    group_size: int | None = 128
    scheme: str = "asym"

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.rank_fraction is None):
            raise ValueError("an SVD config needs exactly one of rank or rank_fraction.")
        if self.rank is not None:
            r = _as_int(self.rank, "rank")
            if r < 1:
                raise ValueError(f"rank must be at least 1, got {self.rank!r}.")
            object.__setattr__(self, "rank", r)
        else:
            f = self.rank_fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                raise ValueError(f"rank_fraction must be a number in (0, 1], got {f!r}.")
            object.__setattr__(self, "rank_fraction", float(f))
        self.quant_config  # validates bits / group_size / scheme

    @property
    def quant_config(self) -> QuantConfig | None:
        """The factor quantizer, or ``None`` for fp16 factors."""
        return optional_quant_config(self.bits, self.group_size, self.scheme)

def _dims(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2 or any(int(s) < 1 for s in shape):
        raise ValueError(f"low-rank SVD needs a matrix (2 or more non-empty dimensions), got shape {tuple(shape)}.")
    return math.prod(int(s) for s in shape[:-1]), int(shape[-1])


def resolve_rank(shape: tuple[int, ...], cfg: SVDConfig) -> int:
    """The rank r that ``cfg`` keeps for a tensor of ``shape`` (ValueError when above ``min(m, n)``)."""
    m, n = _dims(shape)
    k = min(m, n)
    r = cfg.rank if cfg.rank is not None else max(1, round(cfg.rank_fraction * k))
    if r > k:
        raise ValueError(f"rank {r} exceeds min(m, n) = {k} for shape {tuple(shape)}; pick a rank from 1 to {k}.")
    return r


def factor_quant(m: int, n: int, cfg: SVDConfig) -> QuantConfig | None:
    """The factor quantizer after checking that its group size divides both m and n."""
    q = cfg.quant_config
    if q is not None and q.group_size is not None and (m % q.group_size or n % q.group_size):
        raise ValueError(f"group_size {q.group_size} must divide both dimensions {m} and {n} to quantize the factors.")
    return q


def lowrank_bytes(shape: tuple[int, ...], cfg: SVDConfig) -> int:
    """Exact stored bytes of ``lowrank(W, cfg)`` for a tensor of ``shape``."""
    m, n = _dims(shape)
    r = resolve_rank(shape, cfg)
    q = factor_quant(m, n, cfg)
    if q is None:
        return 2 * r * (m + n)
    return quant_bytes((r, m), q) + quant_bytes((r, n), q)


def svd_factors(W: Tensor, device: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Full thin SVD ``(U, S, Vh)`` of ``W`` (viewed as m×n) in float32 on ``device``, computed once.

    ``U`` is ``(m, k)``, ``S`` ``(k,)`` descending, ``Vh`` ``(k, n)`` with ``k = min(m, n)``. Pass the
    result back as ``lowrank(W, cfg, factors=...)`` so a new rank only slices and quantizes. When the
    float32 solver does not converge the SVD is redone in float64 (then returned as float32).
    """
    m, n = _dims(tuple(W.shape))
    dev = resolve_device(device)
    M = W.detach().reshape(m, n).to(device=dev, dtype=torch.float32)
    if not torch.isfinite(M).all():
        raise ValueError("the tensor contains NaN or Inf values; its SVD is undefined.")
    try:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    except torch.linalg.LinAlgError:
        U, S, Vh = (t.to(torch.float32) for t in torch.linalg.svd(M.double(), full_matrices=False))
    return U, S, Vh


def split_factors(factors: tuple[Tensor, Tensor, Tensor], r: int) -> tuple[Tensor, Tensor]:
    """The unquantized stored factors ``u = (U_r sqrt(S_r))ᵀ`` ``(r, m)`` and ``v = sqrt(S_r) V_rᵀ`` ``(r, n)``."""
    U, S, Vh = factors
    sq = S[:r].to(torch.float32).clamp_min(0).sqrt()
    u = (U[:, :r].to(torch.float32) * sq).T.contiguous()      # (r, m)
    v = (sq[:, None] * Vh[:r].to(torch.float32)).contiguous()  # (r, n)
    return u, v


@dataclass(frozen=True, eq=False)
class LowRankTensor:
    """``Ŵ = uᵀ v`` from stored factors (fp16 tensors or :class:`QuantizedTensor`), see module docstring.

    ``u_f32``, ``v_f32`` and ``singular_values`` are the unquantized factors and the full spectrum,
    kept in memory (not stored) so :func:`sahc_core.methods.registry.measure` can split the error; they are
    ``None`` after :func:`sahc_core.methods.registry.load_compressed`.
    """

    shape: tuple[int, ...]
    config: SVDConfig
    rank: int
    u: Tensor | QuantizedTensor          # (r, m)
    v: Tensor | QuantizedTensor          # (r, n)
    u_f32: Tensor | None = field(default=None, repr=False)
    v_f32: Tensor | None = field(default=None, repr=False)
    singular_values: Tensor | None = field(default=None, repr=False)

    def _factor(self, f: Tensor | QuantizedTensor) -> Tensor:
        return f.reconstruct(torch.float32) if isinstance(f, QuantizedTensor) else f.to(torch.float32)

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``uᵀ v`` in float32 on the factors' device, reshaped to the original shape, then cast."""
        return (self._factor(self.u).T @ self._factor(self.v)).reshape(self.shape).to(dtype)

    def state(self) -> dict[str, Tensor]:
        return {**part_state("u", self.u), **part_state("v", self.v)}

    def meta(self) -> dict:
        return {"method": "svd", "config": _plan_form(self.config), "shape": list(self.shape), "rank": self.rank}

    @property
    def nbytes(self) -> int:
        return state_nbytes(self.state())


def lowrank(W: Tensor, cfg: SVDConfig, factors: tuple[Tensor, Tensor, Tensor] | None = None) -> LowRankTensor:
    """Rank-r approximation of ``W`` with fp16 or quantized factors.

    Parameters
    ----------
    W : Tensor
        The matrix (``ndim >= 2``, viewed as m×n).
    cfg : SVDConfig
    factors : (U, S, Vh), optional
        The output of :func:`svd_factors` for this ``W``; computed here (device "auto") when omitted.
        Work happens on the factors' device.
    """
    shape = tuple(W.shape)
    m, n = _dims(shape)
    r = resolve_rank(shape, cfg)
    q = factor_quant(m, n, cfg)
    U, S, Vh = factors if factors is not None else svd_factors(W)
    k = min(m, n)
    if tuple(U.shape) != (m, k) or tuple(S.shape) != (k,) or tuple(Vh.shape) != (k, n):
        raise ValueError(f"factors of shapes {tuple(U.shape)}, {tuple(S.shape)}, {tuple(Vh.shape)} do not belong to a {m}x{n} matrix.")
    u, v = split_factors((U, S, Vh), r)
    if q is None:
        su, sv = u.to(torch.float16), v.to(torch.float16)
    else:
        su, sv = quantize(u, q), quantize(v, q)
    return LowRankTensor(shape, cfg, r, su, sv, u, v, S)


def _load(state: dict[str, Tensor], meta: dict, cfg: SVDConfig) -> LowRankTensor:
    """Rebuild a :class:`LowRankTensor` from ``state()`` / ``meta()`` (used by methods.load_compressed)."""
    shape = tuple(int(s) for s in meta["shape"])
    m, n = _dims(shape)
    r = resolve_rank(shape, cfg)
    q = cfg.quant_config
    out = LowRankTensor(shape, cfg, r, load_part(state, "u", (r, m), q, "low-rank"),
                        load_part(state, "v", (r, n), q, "low-rank"))
    if set(state) != set(out.state()):
        raise ValueError(f"low-rank state must hold exactly {sorted(out.state())}, got {sorted(state)}.")
    return out


def _plan_form(cfg) -> dict:
    """The config's plan-JSON dict (the registry's generic form)."""
    from sahc_core.methods.registry import config_to_dict

    return config_to_dict(cfg)
