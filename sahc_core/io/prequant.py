"""Detect weights that already lie on a low-bit grid (a model dequantized from GGUF, GPTQ, AWQ, ...).

A block-wise k-bit quantizer stores, per block of ``b`` consecutive weights of a row, a step ``d`` and
an offset ``m``; dequantized, every weight of the block is ``m + d·q`` with an integer ``q`` in
``[0, 2^k)``. So the block's distinct values sit on an affine grid: with ``v₀`` the smallest value
and ``δ`` the smallest gap between distinct values, ``(v − v₀)/δ`` is an integer for every value
(δ may be a multiple of ``d`` when some levels are unused; the grid is still one of ≤ 2^k levels).
Real 16-bit weights fail this at once: their values span binades whose ulps differ, so the smallest
gap is tiny against the block's range and the indices run far past 2^8.

:func:`detect_grid` tests block sizes 128, 64, 32, 16 (those dividing the row length) on a sample of
blocks and reports the LARGEST block size whose blocks (≥ 99 % of the sample) lie on a grid of at most
``max_bits`` bits, with the smallest such k: the embedded SmolLM2 (from Q4_1 GGUF) gives
``{bits: 4, block: 32}``. A block of 64 made of two 32-blocks with different grids fails the affine
test, so the block size is the quantizer's own.

Measurements on such a tensor understate the error on the original weights: an int-k setting with
``bits ≥ k`` whose groups tile the pre-existing blocks reproduces the grid with error ~0
(:func:`artifact_note`).

Only a sample of rows is read (``safe_open(...).get_slice``), never the whole tensor.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from safetensors import safe_open

from sahc_core.io.dtypes import is_analysed

#: Block sizes tried, largest first (the quantizer's block is the largest that passes).
BLOCKS = (128, 64, 32, 16)
#: Blocks sampled per tensor (from evenly spaced rows).
SAMPLE_BLOCKS = 1024
#: Share of sampled blocks that must lie on the grid.
MIN_FRACTION = 0.99
#: |index − round(index)| allowed (float32 rounding of m + d·q moves an index by ~1e-6).
_INDEX_TOL = 1e-3


def _block_bits(x: torch.Tensor, max_bits: int) -> torch.Tensor:
    """Per block (rows of ``x``, float64): the grid width in bits, or ``max_bits + 1`` when off-grid.

    The grid step is the smallest gap between distinct values divided by k = 1..8: a few values drawn
    from a fine grid can have a smallest gap of several steps (gaps 2Δ and 3Δ: the step is their gcd,
    Δ), and the first k that puts every value on the grid within ``2^max_bits`` levels wins.
    """
    v, _ = torch.sort(x, dim=1)
    gaps = v[:, 1:] - v[:, :-1]
    scale = v.abs().amax(dim=1).clamp_min(1e-30)
    distinct = gaps > scale[:, None] * 1e-7          # gaps between distinct values (ties are not gaps)
    big = torch.where(distinct, gaps, torch.full_like(gaps, math.inf))
    step = big.amin(dim=1)                            # smallest gap between distinct values
    flat = torch.isinf(step)                          # a constant block: any grid holds it
    step = torch.where(flat, torch.ones_like(step), step)
    bits = torch.full_like(step, max_bits + 1)
    for k in range(8, 0, -1):  # the smallest k that works ends up in bits (written last)
        idx = (v - v[:, :1]) * (k / step)[:, None]
        on_grid = ((idx - idx.round()).abs() <= _INDEX_TOL).all(dim=1)
        levels = idx[:, -1].round() + 1
        b_k = torch.ceil(torch.log2(levels.clamp_min(1)))
        bits = torch.where(on_grid & (b_k <= max_bits), b_k, bits)
    return torch.where(flat, torch.zeros_like(bits), bits)


def detect_grid(W: torch.Tensor, max_bits: int = 8, blocks: tuple[int, ...] = BLOCKS) -> dict | None:
    """``{"bits": k, "block": b, "fraction": f}`` when the weights lie on a k-bit grid per block of b.

    Parameters
    ----------
    W : Tensor
        A weight (rows along the last dimension; any float dtype), or a sample of its rows.
    max_bits : int
        Widest grid reported (a "grid" of 2^9 levels per 16 weights is no grid).
    blocks : tuple of int
        Block sizes to try, largest first.

    Returns
    -------
    dict or None
        ``None`` when no block size passes (an ordinary floating-point tensor).
    """
    if W.ndim == 0 or W.numel() == 0 or not W.dtype.is_floating_point:
        return None
    n = int(W.shape[-1])
    x = W.detach().reshape(-1, n).to(torch.float64)
    if not torch.isfinite(x).all():
        return None
    # Quick refusal: a grid per block of b is also a grid on every sub-block, so if a small sample of
    # the smallest blocks is off-grid, no block size can pass (an ordinary tensor costs one tiny sort).
    smallest = min((b for b in blocks if n % b == 0 and b <= n), default=None)
    if smallest is None:
        return None
    quick = x.reshape(-1, smallest)
    quick = quick[torch.linspace(0, quick.shape[0] - 1, min(64, quick.shape[0])).long()]
    if float((_block_bits(quick, max_bits) <= max_bits).double().mean()) < 0.9:
        return None
    for b in blocks:
        if n % b or b > n:
            continue
        xb = x.reshape(-1, b)
        if xb.shape[0] > SAMPLE_BLOCKS:
            xb = xb[torch.linspace(0, xb.shape[0] - 1, SAMPLE_BLOCKS).long()]
        bits = _block_bits(xb, max_bits)
        ok = bits <= max_bits
        fraction = float(ok.double().mean())
        if fraction >= MIN_FRACTION:
            k = int(torch.quantile(bits[ok].double(), MIN_FRACTION).item()) if ok.any() else 0
            return {"bits": max(k, 1), "block": b, "fraction": fraction}
    return None


def sample_rows(path: str, name: str, shape: tuple[int, ...], max_values: int, chunks: int = 8) -> torch.Tensor:
    """About ``max_values`` values of tensor ``name``: ``chunks`` runs of consecutive rows spread over
    the tensor, each read with one ``get_slice`` (a few contiguous reads, never the whole tensor)."""
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    n = int(shape[-1]) if shape else 1
    with safe_open(path, framework="pt") as fh:
        if len(shape) <= 1:
            return fh.get_slice(name)[:].reshape(1, -1)
        if len(shape) > 2:  # N-D weights (conv kernels) are small: read whole
            return fh.get_tensor(name).reshape(-1, n)[: max(1, max_values // n)]
        per = max(1, max_values // (n * chunks))
        starts = sorted({int(s) for s in torch.linspace(0, max(rows - per, 0), chunks).tolist()})
        sl = fh.get_slice(name)
        return torch.cat([sl[s:min(s + per, rows)] for s in starts])


def tensor_grid(source: Any, name: str, max_values: int = SAMPLE_BLOCKS * BLOCKS[0]) -> dict | None:
    """:func:`detect_grid` of tensor ``name`` of a ``ModelSource``, from a sample of its rows."""
    info = source.info(name)
    if len(info.shape) < 2 or not is_analysed(info.dtype):
        return None  # 1-D tensors (norms, biases) are kept in 16-bit by every plan
    return detect_grid(sample_rows(str(source.path / info.file), name, tuple(info.shape), max_values))


#: Bump when detection would answer differently for the same tensor (invalidates cached rows).
PREQUANT_VERSION = 1


def model_grids(source: Any, cache: Any = None, progress: Any = None) -> dict[str, dict | None]:
    """:func:`tensor_grid` of every tensor of a model, cached in DuckDB per fingerprint (one row)."""
    if cache is not None:
        hit = cache.get("prequant", source.fingerprint, "all", PREQUANT_VERSION)
        if hit is not None:
            return hit
    infos = source.tensors()
    out = {}
    for i, info in enumerate(infos):
        out[info.name] = tensor_grid(source, info.name)
        if progress is not None:
            progress(i + 1, len(infos))
    if cache is not None:
        cache.put("prequant", source.fingerprint, "all", PREQUANT_VERSION, out)
    return out


def summary(grids: dict[str, dict | None]) -> dict | None:
    """The most common grid over the tensors that have one, with counts (``None`` when none has)."""
    found = [(g["bits"], g["block"]) for g in grids.values() if g]
    if not found:
        return None
    (bits, block), n = max(((k, found.count(k)) for k in set(found)), key=lambda t: t[1])
    return {"bits": bits, "block": block, "n_tensors": n, "n_prequantized": len(found), "n_total": len(grids)}


def artifact_note(grid: dict | None, cfg: Any) -> dict:
    """Keys flagging a measurement on a pre-quantized tensor (empty when the tensor is not).

    ``prequantized_artifact`` is True when the setting can reproduce the existing grid (int-like:
    at least ``bits`` bits and groups that tile the grid's blocks): its error of ~0 says nothing about
    the original weights.
    """
    if not grid:
        return {}
    bits, g = getattr(cfg, "bits", None), getattr(cfg, "group_size", None)
    exact = bits is not None and g is not None and bits >= grid["bits"] and grid["block"] % g == 0
    note = (f"the tensor already lies on a {grid['bits']}-bit grid in blocks of {grid['block']} (a model dequantized "
            f"from a low-bit format): " + ("this setting reproduces that grid, so its error of about 0 is an artifact"
                                           if exact else "errors measured here understate those of the original weights"))
    return {"prequantized": {"bits": grid["bits"], "block": grid["block"]}, "prequantized_artifact": exact,
            "prequantized_note": note}
