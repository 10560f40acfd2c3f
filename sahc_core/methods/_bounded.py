"""Measurements of a tensor too big for float32 copies: W in its stored dtype, everything else in row blocks.

A What-if measurement of the 248,320 x 4,096 embedding through :func:`registry.float32_measure` holds W,
Ŵ and W − Ŵ in float32 (12 GB); here W stays in its stored dtype (2 GB bf16) and each block of rows
is converted, compressed or rebuilt, and compared while it is in cache, so the extra memory is a few
blocks of ``BLOCK_BYTES``. Which path a method takes (see :func:`sahc_core.whatif.measure.measure_tensor`):

* its own ``measure_bounded`` (int-k: the fake-quant chunks; SVD: factors from the Gram's
  eigenvectors; TT: the streamed first TT-SVD step and rows of Ŵ from the cores);
* else, for a ``row_separable`` method (keep, HQQ, GPTQ: rows are compressed independently, so
  ``compress(W)[rows] == compress(W[rows])``, tested), :func:`row_block_measure`;
* else a clear refusal naming the memory bound.

Numbers are those of :func:`registry.measure`: ``‖W − Ŵ‖_F / ‖W‖_F`` and the mean row cosine from
per-row squared norms (float32 rows, float64 sums, :func:`metrics.from_row_norms`), the output error
``tr(E H Eᵀ) / tr(W H Wᵀ)`` accumulated per block (H the (n, n) second moment, or the embedding's
token counts).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from sahc_core import metrics

#: Bytes of one float32 block of rows (a few of them live at once).
BLOCK_BYTES = 64 * 2**20


def block_rows(n_cols: int, multiple: int = 1, block_bytes: int = BLOCK_BYTES) -> int:
    """Rows per float32 block of ``n_cols`` columns, a positive multiple of ``multiple`` (a group size)."""
    rows = max(1, block_bytes // (4 * max(1, n_cols)))
    return max(multiple, rows // multiple * multiple)


def float_blocks(W: Tensor, rows: int) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, W2[start:stop] as float32)`` over the ``(rows, last dim)`` view of ``W`` (any dtype)."""
    W2 = metrics.rows(W)
    for a in range(0, W2.shape[0], rows):
        b = min(W2.shape[0], a + rows)
        yield a, b, W2[a:b].to(torch.float32)


def row_norm2_blocked(W: Tensor) -> Tensor:
    """Per-row ``‖W_i‖²`` (float64) of W in any dtype, each block reduced in float32 (bf16 sums are too coarse)."""
    W2 = metrics.rows(W)
    out = torch.empty(W2.shape[0], dtype=torch.float64, device=W.device)
    for a, b, B in float_blocks(W, block_rows(W2.shape[1])):
        out[a:b] = metrics.row_norm2(B)
    return out


def w_h_w(W: Tensor, H: Tensor) -> float:
    """``tr(W H Wᵀ)`` block by block (H (n, n)), or ``Σ_t c_t ‖W_t‖²`` for token counts H (m,)."""
    H = H.to(device=W.device, dtype=torch.float64)
    total = 0.0
    for a, b, B in float_blocks(W, block_rows(metrics.rows(W).shape[1])):
        total += quad_form(B, H, a, b)
    return total


def quad_form(E: Tensor, H: Tensor, a: int, b: int) -> float:
    """``tr(E H Eᵀ)`` of rows a:b (H (n, n)), or ``Σ c_t ‖E_t‖²`` with counts ``H[a:b]`` (H 1-D)."""
    if H.dim() == 1:
        return float((metrics.row_norm2(E) * H[a:b]).sum())
    e = E.to(torch.float64)
    return float(((e @ H) * e).sum())


class ErrorSums:
    """Per-row ``‖Ŵ_i‖²`` and ``‖W_i − Ŵ_i‖²`` gathered block by block, and ``tr(E H Eᵀ)`` when H is given."""

    def __init__(self, m: int, H: Tensor | None, device: torch.device | str = "cpu") -> None:
        self.h_row2 = torch.empty(m, dtype=torch.float64, device=device)
        self.e_row2 = torch.empty_like(self.h_row2)
        self.H = None if H is None else H.to(device=device, dtype=torch.float64)
        self.eHe = 0.0

    def add(self, a: int, b: int, W_block: Tensor, W_hat_block: Tensor) -> None:
        """Rows a:b: ``W_block`` float32, ``W_hat_block`` float32 (overwritten with Ŵ − W)."""
        self.h_row2[a:b] = metrics.row_norm2(W_hat_block)
        E = W_hat_block.sub_(W_block)
        self.e_row2[a:b] = metrics.row_norm2(E)
        if self.H is not None:
            self.eHe += quad_form(E, self.H, a, b)

    def numbers(self, method: str, W: Tensor, nbytes: int, w_row2: Tensor, wHw: float | None) -> dict:
        """:func:`registry.base_numbers` (and ``output_error`` when H was given)."""
        from sahc_core.methods.registry import base_numbers

        out = base_numbers(method, W, nbytes, *metrics.from_row_norms(w_row2.to(self.h_row2.device), self.h_row2,
                                                                     self.e_row2))
        if self.H is not None and wHw is not None:
            out["output_error"] = math.sqrt(max(self.eHe, 0.0) / wHw) if wHw > 0 else math.nan
        return out


def _eval_h(W: Tensor, ctx: Any) -> tuple[Tensor | None, float | None]:
    """The evaluation second moment of the context (``None`` without calibration) and ``tr(W H Wᵀ)``."""
    if ctx.calib is None or W.ndim != 2:
        return None, None
    return ctx.xtx(), ctx.wHw()


def row_block_measure(W: Tensor, cfg: Any, ctx: Any) -> dict:
    """Measure a ``row_separable`` method: compress and rebuild each block of rows, compare, add up.

    Bytes come from the exact formula (equal to the stored bytes by the registry's contract). The
    method's ``extras`` (computed on a whole W) are left out; ``measured_in_blocks`` says so.
    """
    from sahc_core.methods.registry import compress, projected_bytes, spec_of

    spec = spec_of(cfg)
    H, wHw = _eval_h(W, ctx)
    W2 = metrics.rows(W)
    sums = ErrorSums(W2.shape[0], H, W.device)
    for a, b, B in float_blocks(W, block_rows(W2.shape[1])):
        c = compress(B.to(ctx.device), cfg, ctx.calib)  # W is 2-D here (measure_tensor checks it)
        sums.add(a, b, B, c.reconstruct(torch.float32).to(B.device))
        del c
    out = sums.numbers(spec.name, W, projected_bytes(tuple(W.shape), cfg), ctx.w_row2, wHw)
    out["measured_in_blocks"] = True
    return out


def _compare_blocks(W: Tensor, hat_blocks, method: str, nbytes: int, w_row2: Tensor, H: Tensor | None,
                    wHw: float | None) -> dict:
    """The base numbers (and ``output_error`` with ``H``) of W against ``(start, stop, Ŵ rows)`` blocks."""
    W2 = metrics.rows(W)
    sums = ErrorSums(W2.shape[0], H, W.device)
    for a, b, B in hat_blocks:
        sums.add(a, b, W2[a:b].to(torch.float32), B.to(device=W.device, dtype=torch.float32))
    return sums.numbers(method, W, nbytes, w_row2, wHw)


def rebuilt_row_blocks(c: Any, rows: int) -> Iterator[tuple[int, int, Tensor]] | None:
    """``(start, stop, Ŵ2[start:stop] float32)`` of a LOADED compressed tensor, never Ŵ whole; ``None``
    when its type has no row access (the caller then rebuilds it whole).

    int-k codes decode row blocks alone (:meth:`QuantizedTensor.row_block`), a kept tensor is sliced,
    low-rank factors are dequantized once (r x m and r x n) and multiplied a block at a time, a
    Tensor-Train gives its row slabs (:func:`sahc_core.methods._tt_bounded.row_slabs`).
    """
    from sahc_core.methods.keep import KeptTensor
    from sahc_core.methods.lowrank import LowRankTensor
    from sahc_core.methods.quant import QuantizedTensor
    from sahc_core.methods.tt import TTMatrix

    inner = getattr(c, "inner", c)  # GPTQ / HQQ wrap their QuantizedTensor
    if isinstance(inner, TTMatrix):
        from sahc_core.methods._tt_bounded import row_slabs

        return ((a, b, S.to(torch.float32)) for a, b, S in row_slabs(inner))
    if isinstance(inner, QuantizedTensor):
        m = math.prod(inner.shape[:-1])
        return ((a, min(m, a + rows), inner.row_block(a, min(m, a + rows))) for a in range(0, m, rows))
    if isinstance(inner, KeptTensor):
        W2 = metrics.rows(inner.weight)
        return ((a, min(W2.shape[0], a + rows), W2[a:a + rows].to(torch.float32, copy=True))
                for a in range(0, W2.shape[0], rows))
    if isinstance(inner, LowRankTensor) and len(inner.shape) == 2:
        u, v = inner._factor(inner.u), inner._factor(inner.v)  # (r, m), (r, n) float32
        m = inner.shape[0]
        return ((a, min(m, a + rows), u[:, a:a + rows].T @ v) for a in range(0, m, rows))
    return None


def compare_rebuilt(W: Tensor, c: Any, method: str, H: Tensor | None = None) -> dict | None:
    """:func:`registry.measure`'s base numbers (and ``output_error`` with ``H``) of ``W`` (any dtype, e.g.
    stored bf16) against a loaded compressed tensor, a block of rows at a time; ``None`` when ``c`` has
    no row access. The gates stage of a run uses it for tensors above ``io.rows.BOUNDED_MIN_BYTES``."""
    blocks = rebuilt_row_blocks(c, block_rows(metrics.rows(W).shape[1]))
    if blocks is None:
        return None
    wHw = w_h_w(W, H) if H is not None else None
    return _compare_blocks(W, blocks, method, int(c.nbytes), row_norm2_blocked(W), H, wHw)
