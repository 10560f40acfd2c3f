"""Half-Quadratic Quantization (HQQ): calibration-free int-k whose zero points are optimised.

HQQ keeps the min-max scale of asym round-to-nearest and moves each group's zero point to minimise
an lp (``p < 1``) norm of the weight error, ``sum |w - ŵ(z)|^p``, by half-quadratic splitting: with
an auxiliary error ``W_e`` and a penalty ``β`` that grows by ``κ`` per iteration it alternates

    q     = clamp(round((w - z) / s), 0, 2^k - 1)              codes on the current grid
    W_e   = shrink_p(w - ŵ, β),  shrink_p(x) = sign(x) relu(|x| - |x|^(p-1) / β)
    z     = mean_group(w - W_e - q s)                           least squares given q and W_e

starting from RTN's grid. The update is [1]'s (``hqq``'s ``optimize_weights_proximal``); written
here rather than called from the ``hqq`` package (``tests/test_hqq.py`` compares the two), with one
deliberate change, to the stop rule:

- ``hqq`` stops the whole tensor at the first iteration whose mean ``|w - ŵ|`` does not decrease
  (its legacy default then returns the zero one update past that point, ``_v2`` the best one). Here
  each group keeps its best iterate by squared error and stops at its first update that does not
  lower it. Reason: at ``β = 10, p = 0.7`` the shrink is zero for errors below ``β^(-1/(2-p))
  ≈ 0.17``, i.e. for essentially every LLM weight, and the update is then the least-squares zero
  for the current codes, a descent on the squared error; the L1 test stops it on noise (int2 g32
  on SmolLM2 down_proj: after one step, at RTN's error). With the per-group rule no group, hence
  no tensor, ends with a larger Frobenius error than RTN, and the result does not depend on how
  the rows are blocked.
- Storage is OUR asym format (:class:`~sahc_core.methods.quant.QuantizedTensor`): ``ŵ = q s + z`` with fp16
  ``s`` and fp16 float ``z`` (HQQ's ``ŵ = (q - z_h) s_h`` is the same grid with ``z = -z_h s_h``).
  Every iterate's ``z`` is rounded to fp16 and its codes are computed from the fp16 ``s`` and ``z``,
  so the error that decides the early stop is the error of what is stored, iteration 0 is exactly
  :func:`sahc_core.methods.quant.quantize` (RTN), and :func:`~sahc_core.methods.quant.dequantize` of the result is
  bit for bit the ``ŵ`` whose error :class:`HQQResult` reports.
- Speed on CPU: a block of rows (2 MiB) stays in the cache through all its iterations (``hqq``
  sweeps the whole tensor per iteration), and the shrink's ``pow`` is evaluated only where the
  shrink is non-zero. Measured with one thread (``bench/hqq_speed.py --with-hqq --threads 1``, two
  runs on a busy 2-core machine): 49152x576 embedding int4 g64 1.7-5.7 s against 50-62 s for
  ``hqq``; 576x1536 int4 g128 0.04-0.07 s against 0.13-0.3 s; errors within 0.1% of each other.
- No runtime dependency on ``hqq`` (2 s import, its own packing formats).

The ``sym`` scheme has no zero point to optimise, so it is refused. Bytes are those of RTN asym
(:func:`sahc_core.methods.quant.quant_bytes`).

References
----------
.. [1] H. Badri, A. Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023,
   https://mobiusml.github.io/hqq_blog/ ; code: github.com/mobiusml/hqq, ``hqq/core/optimize.py``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from sahc_core.device import resolve_device
from sahc_core.methods.quant import QuantConfig, QuantizedTensor, _as_int, _decode, _grid, _layout, pack_codes

#: Weights per block of rows (2 MiB of float32): a block stays in the CPU cache through the dozen
#: elementwise passes of each of its iterations (measured on the embedding, 1 thread: 2^19 fastest of
#: 2^17..2^23).
_BLOCK_ELEMS = 1 << 19


@dataclass(frozen=True, eq=False)
class HQQResult:
    """What :func:`hqq_solve` returns.

    Attributes
    ----------
    quantized : QuantizedTensor
        The stored tensor (asym format; ``dequantize(quantized)`` is the ``ŵ`` measured below).
    rel_error : float
        ``||W - ŵ||_F / ||W||_F`` of the stored result (1.0 for a zero ``W``).
    rtn_rel_error : float
        The same for round-to-nearest on the same grid (iteration 0).
    iterations : int
        Zero-point updates of the group that ran longest (``<= iters``).
    seconds : float
        Wall time of the solve.
    """

    quantized: QuantizedTensor
    rel_error: float
    rtn_rel_error: float
    iterations: int
    seconds: float


def _check_params(cfg: QuantConfig, iters: int, lp_norm: float, beta: float, kappa: float) -> None:
    if cfg.scheme != "asym":
        raise ValueError("HQQ optimises the zero point, which the 'sym' scheme does not have; use scheme='asym'.")
    if _as_int(iters, "iters") < 0:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}.")
    if not (_is_number(lp_norm) and 0.1 <= lp_norm <= 1.0):
        raise ValueError(f"lp_norm must be a number in [0.1, 1] (HQQ's sparsity-promoting p <= 1), got {lp_norm!r}.")
    if not (_is_number(beta) and 0 < beta < math.inf):
        raise ValueError(f"beta must be a positive number, got {beta!r}.")
    if not (_is_number(kappa) and 1 < kappa < math.inf):
        raise ValueError(f"kappa must be a number above 1 (beta grows by kappa each iteration), got {kappa!r}.")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def shrink_lp(x: Tensor, beta: float, lp_norm: float) -> Tensor:
    """Generalised soft-thresholding ``sign(x) · relu(|x| - |x|^(p-1) / β)`` (the lp proximal step of [1]).

    Zero wherever ``|x|^(2-p) <= 1/β``; the power is evaluated only on the remaining entries.
    """
    a = x.abs()
    out = torch.zeros_like(x)
    big = a > _shrink_threshold(beta, lp_norm)
    if bool(big.any()):
        v = a[big]
        out[big] = (v - v.pow(lp_norm - 1.0) / beta).clamp_min_(0.0) * x[big].sign()
    return out


def _shrink_threshold(beta: float, lp_norm: float) -> float:
    """Slightly below ``β^(-1/(2-p))``, the ``|x|`` under which the shrink is exactly 0 (entries at the
    threshold go through the formula, which clamps them)."""
    return beta ** (-1.0 / (2.0 - lp_norm)) * (1.0 - 1e-6)


def _mean_minus_shrink(r: Tensor, beta: float, lp_norm: float) -> Tensor:
    """``mean(r - shrink_lp(r), -1)``: one pass when no ``|r|`` reaches the threshold (LLM weights)."""
    lo, hi = torch.aminmax(r)
    if max(-float(lo), float(hi)) <= _shrink_threshold(beta, lp_norm):
        return r.mean(-1)
    return (r - shrink_lp(r, beta, lp_norm)).mean(-1)


def _sq_norm(r: Tensor) -> Tensor:
    """Per-group squared error ``sum(r², -1)`` (one fused pass)."""
    return torch.linalg.vector_norm(r, dim=-1).square_()


def _sq_err64(x: Tensor, w_hat: Tensor) -> float:
    """``sum((x - ŵ)²)`` with the difference and the sum in float64 (the reported error)."""
    return float((x.double() - w_hat.double()).square_().sum())


def _codes(x: Tensor, z: Tensor, s_safe: Tensor, qmax: int) -> Tensor:
    """``clamp(round((x - z) / s), 0, qmax)`` as float32, the arithmetic of :func:`quant._grid` (asym)."""
    return torch.sub(x, z[..., None]).div_(s_safe).round_().clamp_(0, qmax)


@torch.no_grad()
def hqq_solve(W: Tensor, cfg: QuantConfig, *, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0,
              kappa: float = 1.01, early_stop: bool = True, device: str = "auto") -> HQQResult:
    """HQQ int-k quantization of ``W`` along its last dimension (see the module docstring).

    Parameters
    ----------
    W : Tensor
        Any shape with ``ndim >= 1``, groups of ``cfg.group_size`` along the last dimension.
    cfg : QuantConfig
        Bits, group size; ``scheme`` must be ``"asym"``.
    iters : int
        Most zero-point updates per group (HQQ's default 20); 0 gives RTN exactly.
    lp_norm : float
        ``p`` of the error norm, ``0.1 <= p <= 1`` (HQQ's default 0.7).
    beta, kappa : float
        Initial half-quadratic penalty and its growth factor per iteration (HQQ: 10 and 1.01).
    early_stop : bool
        A group stops at its first update that does not lower its squared error. Either way each
        group keeps its best iterate, so no group ends worse than RTN.
    device : str
        Where to compute ("auto": GPU when there is one); the result's tensors live there.

    Returns
    -------
    HQQResult
    """
    _check_params(cfg, iters, lp_norm, beta, kappa)
    t0 = time.perf_counter()
    shape = tuple(W.shape)
    rows, cols, g = _layout(shape, cfg)
    dev = resolve_device(device)
    qmax = 2 ** cfg.bits - 1
    x_all = W.detach().to(device=dev, dtype=torch.float32).reshape(rows, cols // g, g)  # (rows, groups, g)
    scales = torch.empty(rows, cols // g, dtype=torch.float16, device=dev)
    zeros = torch.empty(rows, cols // g, dtype=torch.float16, device=dev)
    codes = torch.empty(rows, cols // g, g, dtype=torch.uint8, device=dev)
    norm2 = rtn_sq = err_sq = 0.0
    n_iter = 0
    step = max(1, _BLOCK_ELEMS // cols)
    for a in range(0, rows, step):  # groups are independent, so blocks of rows are solved one by one
        b = slice(a, min(a + step, rows))
        x = x_all[b]                            # (rows_b, groups, g)
        _, sc, z16 = _grid(x, cfg)              # RTN's fp16 grid; refuses NaN/Inf and fp16 overflow
        s_safe = torch.where(sc > 0, sc.float(), torch.ones_like(sc, dtype=torch.float32))[..., None]
        z = z16.float()                         # (rows_b, groups), always fp16 values
        w_hat = _decode(_codes(x, z, s_safe, qmax), sc, z)
        r = x - w_hat                           # w - ŵ
        best_z, best_e = z, _sq_norm(r)         # iteration 0 = RTN
        rtn_sq += _sq_err64(x, w_hat)
        norm2 += float(x.double().square_().sum())
        active = sc > 0  # a zero-range group is exact at z = min (= max) and stays there
        for it in range(iters):
            if not bool(active.any()):
                break
            # z <- mean(w - W_e - q s) = z + mean(r - W_e), rounded to fp16 (the stored precision).
            upd = (z + _mean_minus_shrink(r, beta * kappa ** it, lp_norm)).half().float()
            z = torch.where(active, upd, z)
            r = x - _decode(_codes(x, z, s_safe, qmax), sc, z)
            e = _sq_norm(r)
            better = e < best_e
            best_z, best_e = torch.where(better, z, best_z), torch.where(better, e, best_e)
            if early_stop:
                active &= better
            n_iter = max(n_iter, it + 1)
        q = _codes(x, best_z, s_safe, qmax)
        codes[b], scales[b], zeros[b] = q.to(torch.uint8), sc, best_z.to(torch.float16)
        err_sq += _sq_err64(x, _decode(q, sc, zeros[b]))  # = dequantize(result)[b], bit for bit
    qt = QuantizedTensor(shape, cfg, pack_codes(codes, cfg.bits), scales, zeros)
    rel = math.sqrt(err_sq / norm2) if norm2 > 0 else 1.0
    rtn_rel = math.sqrt(rtn_sq / norm2) if norm2 > 0 else 1.0
    return HQQResult(qt, rel, rtn_rel, n_iter, time.perf_counter() - t0)


def hqq_quantize(W: Tensor, cfg: QuantConfig, *, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0,
                 kappa: float = 1.01, early_stop: bool = True, device: str = "auto") -> QuantizedTensor:
    """The stored tensor of :func:`hqq_solve` (same parameters)."""
    return hqq_solve(W, cfg, iters=iters, lp_norm=lp_norm, beta=beta, kappa=kappa, early_stop=early_stop,
                     device=device).quantized
