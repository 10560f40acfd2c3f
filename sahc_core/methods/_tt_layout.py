"""The TT-matrix layout of a ``V × d`` matrix: row / column factors, padding, rank limits, the tensorization.

``suggest_factors`` picks the default factors (the smallest ``P >= V`` that splits into ``D`` factors none
larger than ``2 * ceil(P^(1/D))``, split as evenly as possible, ascending); :func:`_layout` resolves a
config's factors for a shape, bounds them by the real shape (``prod <= 2 V``, ``2 d``) and checks the
ranks against the unfoldings; :func:`_tensorize` writes the zero-padded, mode-interleaved float32 tensor
``(i_1 j_1, ..., i_D j_D)``. The public description is :mod:`sahc_core.methods.tt`'s docstring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from sahc_core.methods.tt import TTConfig


def _divisors(n: int) -> list[int]:
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


def _balanced_split(n: int, parts: int, cap: int) -> tuple[int, ...] | None:
    """Ascending factors of ``n`` into ``parts`` factors <= ``cap``, the largest as small as possible."""
    found: list[tuple[int, ...]] = []

    def rec(rest: int, k: int, lo: int, acc: tuple[int, ...]) -> None:
        if k == 1:
            if lo <= rest <= cap:
                found.append(acc + (rest,))
            return
        for f in _divisors(rest):
            if f ** k > rest:
                break
            if f >= lo:
                rec(rest // f, k - 1, f, acc + (f,))

    rec(n, parts, 1, ())
    return min(found, key=lambda f: (f[-1], -f[0])) if found else None


def suggest_factors(n: int, parts: int) -> tuple[int, ...]:
    """Ascending factors of the smallest ``P >= n`` splitting into ``parts`` factors <= 2*ceil(P^(1/parts))."""
    if n < 1 or parts < 1:
        raise ValueError(f"cannot factorize {n} into {parts} factors.")
    P = n
    while True:
        f = _balanced_split(P, parts, 2 * math.ceil(P ** (1 / parts) - 1e-9))
        if f is not None:
            return f
        P += 1


@dataclass(frozen=True)
class _Layout:
    V: int
    d: int
    row_factors: tuple[int, ...]
    col_factors: tuple[int, ...]
    ranks: tuple[int, ...]

    @property
    def modes(self) -> list[int]:
        return [i * j for i, j in zip(self.row_factors, self.col_factors)]

    def tt_shape(self) -> dict:
        return {"row_factors": list(self.row_factors), "col_factors": list(self.col_factors), "ranks": list(self.ranks)}


def _layout(shape: tuple[int, ...], cfg: TTConfig, check_ranks: bool = True) -> _Layout:
    """Resolve factors for ``shape`` and check the ranks against the unfoldings."""
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"a TT-matrix needs a non-empty 2-D matrix (embedding / LM head), got shape {tuple(shape)}.")
    V, d = int(shape[0]), int(shape[1])
    D = cfg.n_cores
    rf = cfg.row_factors or suggest_factors(V, D)
    cf = cfg.col_factors or suggest_factors(d, D)
    if math.prod(rf) < V or math.prod(cf) < d:
        raise ValueError(f"row factors {list(rf)} / column factors {list(cf)} must multiply to at least {V} / {d}.")
    if math.prod(rf) > 2 * V or math.prod(cf) > 2 * d:
        raise ValueError(f"row factors {list(rf)} / column factors {list(cf)} pad the {V} x {d} matrix to "
                         f"{math.prod(rf)} x {math.prod(cf)}, more than twice its size; choose factors whose products "
                         f"lie in [{V}, {2 * V}] and [{d}, {2 * d}].")
    lay = _Layout(V, d, tuple(rf), tuple(cf), cfg.ranks)
    if check_ranks:
        modes, r = lay.modes, cfg.ranks
        for k in range(1, D):
            limit = min(r[k - 1] * modes[k - 1], math.prod(modes[k:]))
            if r[k] > limit:
                raise ValueError(
                    f"tt rank r{k}={r[k]} is more than the unfolding allows for factors {list(rf)} x {list(cf)} "
                    f"(at most {limit}); lower it."
                )
    return lay


def _tensorize(W: Tensor, lay: _Layout) -> Tensor:
    """Zero-pad to ``P × Q`` and interleave modes: ``(i_1 j_1, ..., i_D j_D)`` in float32."""
    P, Q = math.prod(lay.row_factors), math.prod(lay.col_factors)
    X = W.detach().to(torch.float32)
    if (P, Q) != (lay.V, lay.d):
        X = torch.nn.functional.pad(X, (0, Q - lay.d, 0, P - lay.V))
    D = len(lay.row_factors)
    X = X.reshape(*lay.row_factors, *lay.col_factors)
    return X.permute([p for k in range(D) for p in (k, D + k)]).reshape(lay.modes)
