"""GPTQ: calibration-aware int-k quantization of one linear weight, stored in the RTN format of ``quant``.

GPTQ (Frantar et al. 2022, Algorithm 1) quantizes the columns of ``W`` (``(m, n)``: out × in features)
one after another; after each column it moves the not yet quantized columns to compensate the
column's rounding error on the calibration inputs ``X`` (``(tokens, n)``), through ``H = XᵀX``. The
result is a :class:`~sahc_core.methods.quant.QuantizedTensor` in exactly the storage format (codes,
fp16 scales and zeros, groups of consecutive input columns in the original order) and byte count of
round-to-nearest, so it is a drop-in alternative to ``quant.quantize``.

What this implementation does, and where it deliberately differs from the public reference code
(IST-DASLab ``gptq.py``, AutoGPTQ ``gptq.py``):

- **Hessian.** ``H`` is validated and factorized in float64: after the 1 % dampening its condition
  number can still reach ``100·n`` (``λ_max <= trace = n·mean``, ``λ_min >= 0.01·mean``), 1.5e5 at
  ``n = 1536``, and float32's 6e-8 rounding times that is a 1 % error in ``H⁻¹``. (The float64
  Cholesky and triangular inverse cost about 0.25 s of one core at ``n = 1536``.)
  ``damp · mean(diag H)`` is added to the diagonal, the mean taken over the given diagonal (the
  reference takes it after setting dead entries to 1), so scaling ``H`` by a constant does not change
  the result. If the Cholesky factorization fails, it is retried with 10x the dampening (up to
  ``_RETRIES`` times, and not beyond ``_MAX_DAMP = 1`` unless ``damp`` is larger: an ``H`` that needs
  more is not PSD and is rejected); the fraction used is ``damp_used``.
- **Upper Cholesky factor of H⁻¹** (section 3, "Cholesky reformulation"): ``U`` upper with
  ``H⁻¹ = UᵀU``. The reference codes factor ``H``, invert, and factor again; here one Cholesky of the
  reversed matrix gives it directly: ``J H J = L Lᵀ`` (``J`` the exchange matrix) implies
  ``H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)`` with ``J L⁻¹ J`` upper triangular, so ``U = J L⁻¹ J``.
- **Dead inputs** (``H_ii = 0``, an input that is zero on every calibration token): ``H_ii`` is set
  to 1, so the column is isolated in ``H`` and gets (and gives) no error feedback: it is simply
  rounded onto its group's grid. The reference code also zeroes those weights; we do not, because
  zeroing changes the layer on every other input.
- **Lazy batch updates** (section 3): the feedback of a column goes at once only to the columns of
  its block of ``block_size``; the rest of the matrix receives the whole block's feedback as one
  matrix product at the end of the block. The loop works on ``Wᵀ`` so each column is a contiguous
  vector, and runs in float32 like the reference.
- **Group grids without act_order** are those of Algorithm 1 run column by column: the scale (and
  zero) of a group come from its error-updated weights when the loop reaches the group's first
  column. (The reference codes read them from the matrix that has not yet received the updates of
  the earlier columns of the same block when a group starts inside a block.) Blocks are cut at
  group starts, so a group that starts inside a block ends inside it and the updated values are all
  at hand; the result does not depend on ``block_size`` beyond float rounding.
- **act_order** processes the columns in order of decreasing ``diag(H)`` (ties in index order). Every
  group's grid is then computed up front from the original ``W`` per consecutive group of the
  ORIGINAL column order ("static groups", AutoGPTQ ``static_groups=True``), exactly RTN's scales and
  zeros; the column at processing position ``j`` is original column ``perm[j]`` and rounds on the grid
  of group ``perm[j] // group_size``. The codes are put back in the original order before packing,
  so no ``g_idx`` is stored and the format is unchanged. With ``group_size=None`` it is the plain case.
- **Rounding arithmetic.** Each column is rounded and decoded with ``quant``'s own helpers
  (``_round_to_grid``, ``_decode_values``) on the group's fp16-rounded scale and zero, so
  ``quant.dequantize(result.quantized)`` equals the ``Ŵ`` that drove the error feedback bit for bit.

References
----------
.. [1] E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh, "GPTQ: Accurate Post-Training Quantization
   for Generative Pre-trained Transformers", ICLR 2023, arXiv:2210.17323 (Algorithm 1, section 3).
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from sahc_core.methods import quant
from sahc_core.methods.quant import QuantConfig, QuantizedTensor

_RETRIES = 3          # Cholesky retries, each with 10x the previous dampening ...
_MAX_DAMP = 1.0       # ... up to this fraction of mean(diag H): a PSD H in float64 factors with far less,
#                       so needing more means H is clearly indefinite
_SYM_RTOL = 1e-6      # |H - Hᵀ| allowed, relative to max diag(H) (float32-accumulated sums pass)
_MINOR_RTOL = 1e-4    # |H_ij| <= sqrt(H_ii H_jj) (1 + rtol): every 2x2 principal minor of a PSD H is >= 0


@dataclass(frozen=True)
class GPTQResult:
    """What :func:`gptq_quantize` returns.

    Attributes
    ----------
    quantized : QuantizedTensor
        The codes, fp16 scales and (asym) zeros, in RTN's format; ``nbytes == quant.quant_bytes``.
    w_hat : Tensor
        ``(m, n)`` float32, the ``Ŵ`` used for the error feedback (``== quant.dequantize(quantized)``).
    damp_used : float
        The dampening fraction of ``mean(diag H)`` that was added (``damp``, or 10x, 100x, ... after
        failed factorizations).
    dead_columns : int
        Inputs with ``H_ii = 0`` (rounded without feedback).
    seconds : float
        Wall time of the call.
    proxy_loss : float
        ``Σ (w_i − ŵ_i)² / [H_F⁻¹]_ii`` over the live columns, in the order processed (``w_i`` the
        updated column, ``H_F`` the dampened Hessian of the columns not yet quantized). For a quadratic
        these increments add up exactly to ``‖X (W − Ŵ)ᵀ‖²_F + λ ‖(W − Ŵ)[:, live]‖²_F`` with
        ``λ = damp_used · mean(diag H)``: the calibration output error in the units of ``H``, plus the
        dampening term.
    """

    quantized: QuantizedTensor
    w_hat: Tensor
    damp_used: float
    dead_columns: int
    seconds: float
    proxy_loss: float


def gptq_quantize(W: Tensor, H: Tensor, cfg: QuantConfig, *, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False) -> GPTQResult:
    """Quantize ``W`` with GPTQ on the calibration second moment ``H`` (see the module docstring).

    Parameters
    ----------
    W : Tensor
        ``(m, n)`` weight (out_features, in_features), any float dtype; computed in float32 on its device.
    H : Tensor
        ``(n, n)`` symmetric positive semi-definite ``XᵀX`` of the layer inputs (any float dtype,
        unnormalised or not: a constant factor does not matter); used in float64 on ``W``'s device.
    cfg : QuantConfig
        Bits, group size (``None`` = one group per row) and scheme, as for RTN.
    damp : float
        Fraction of ``mean(diag H)`` added to the diagonal of ``H`` (default 1 %).
    block_size : int
        Columns per lazy batch update (section 3); changes speed, not the result beyond float rounding.
    act_order : bool
        Process columns in order of decreasing ``diag(H)``, with static group grids.

    Returns
    -------
    GPTQResult

    Raises
    ------
    ValueError
        Shapes that do not match, NaN or Inf in ``W`` or ``H``, an ``H`` that is not symmetric positive
        semi-definite (also when the factorization fails after every retry), or bad parameters.
    """
    t0 = time.perf_counter()
    m, n, block_size = _check_args(W, H, cfg, damp, block_size)
    _, _, g = quant._layout((m, n), cfg)  # checks that the group size divides n
    dev = W.device
    H64, diag = _checked_hessian(H, n, dev)  # (n, n) float64 copy, (n,) its diagonal
    dead = diag == 0
    H64.diagonal()[dead] = 1.0
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    rev = (perm if perm is not None else torch.arange(n, device=dev)).flip(0)
    Hr = H64[rev[:, None], rev]  # J P H Pᵀ J: processing order, reversed (one copy)
    del H64
    L, damp_used = _damped_cholesky(Hr, float(diag.mean()), float(damp))  # J H_d J = L Lᵀ (Hr dampened)
    del Hr  # at most three (n, n) float64 matrices are alive at once from here on
    U = _reversed_inverse(L)       # (n, n) float64 upper, H_d⁻¹ = UᵀU
    del L
    u_diag = U.diagonal().clone()  # (n,) sqrt([H_F⁻¹]_ii)
    R = U.div_(u_diag[:, None]).to(torch.float32)  # row i: the feedback of column i per unit error, (n, n)
    del U

    # NaN / Inf in W are caught (ValueError) by quant._grid_params at the first column of their group.
    Wf = W.detach().to(torch.float32)
    Wt = Wf.T.index_select(0, perm) if perm is not None else Wf.T.clone(memory_format=torch.contiguous_format)
    grids = _GroupGrids(m, n // g, cfg, dev)
    if act_order:
        grids.set(slice(None), *quant._grid_params(Wf.reshape(m, n // g, g), cfg))  # static, original order
        group_of = (perm // g).tolist()
    else:
        group_of = [j // g for j in range(n)]
    Qt, Wh, D = _gptq_loop(Wt, R, grids, group_of, cfg, g, block_size, static=act_order)  # processing order
    per_col = torch.linalg.vector_norm(D, dim=1).double() ** 2 / u_diag ** 2  # (n,) loss of each column
    if not math.isfinite(float(per_col.sum())):  # the updates overflowed (a tiny damp on a singular H)
        raise ValueError(f"the GPTQ updates overflowed with damp={damp_used:g}; raise damp (e.g. to 0.01).")
    proxy = float(per_col[~(dead if perm is None else dead[perm])].sum())

    if cfg.scheme == "sym":
        Qt += 2 ** (cfg.bits - 1) - 1  # stored code in [0, 2Q]
    if perm is not None:  # back to the original column order
        inv = torch.argsort(perm)
        Qt, Wh = Qt[inv], Wh[inv]
    codes = quant.pack_codes(Qt.T.to(torch.uint8), cfg.bits)  # (m, n) row-major
    qt = QuantizedTensor((m, n), cfg, codes, grids.scales16.T.contiguous(),
                         None if grids.zeros16 is None else grids.zeros16.T.contiguous())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return GPTQResult(qt, Wh.T.contiguous(), damp_used, int(dead.sum()), time.perf_counter() - t0, proxy)


def _check_args(W: Tensor, H: Tensor, cfg: QuantConfig, damp: float, block_size: int) -> tuple[int, int, int]:
    """Validate the arguments of :func:`gptq_quantize`; return ``(m, n, block_size)``."""
    if not isinstance(W, Tensor) or W.ndim != 2 or not W.is_floating_point():
        raise ValueError(f"W must be a 2-D float tensor (out_features, in_features), got {_describe(W)}.")
    m, n = W.shape
    if not isinstance(H, Tensor) or tuple(H.shape) != (n, n) or not H.is_floating_point():
        raise ValueError(f"H must be the ({n}, {n}) float second moment XᵀX of the inputs of W {tuple(W.shape)}, "
                         f"got {_describe(H)}.")
    if not isinstance(cfg, QuantConfig):
        raise ValueError(f"cfg must be a QuantConfig, got {type(cfg).__name__}.")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not (math.isfinite(damp) and damp > 0):
        raise ValueError(f"damp must be a positive fraction of mean(diag H), e.g. 0.01, got {damp!r}.")
    if quant._as_int(block_size, "block_size") < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
    return m, n, quant._as_int(block_size, "block_size")


def _describe(x: object) -> str:
    return f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _checked_hessian(H: Tensor, n: int, dev: torch.device) -> tuple[Tensor, Tensor]:
    """A float64 copy of ``H`` on ``dev`` and its diagonal, after checks a PSD ``XᵀX`` always passes.

    Few passes over the ``(n, n)`` matrix (each costs milliseconds on busy cores): the comparisons
    are written so that NaN fails them (``NaN <= x`` is false), which also rejects NaN and Inf.
    """
    H64 = H.detach().to(dev, torch.float64, copy=True)
    diag = H64.diagonal().clone()  # (n,)
    if not bool(torch.isfinite(diag).all()):
        raise ValueError("H contains NaN or Inf values; recompute the calibration statistics.")
    if bool((diag < 0).any()):
        raise ValueError("H is not positive semi-definite (a negative diagonal entry); pass the second moment "
                         "XᵀX of the layer inputs.")
    if not bool(((H64 - H64.T).abs_() <= _SYM_RTOL * float(diag.max())).all()):
        raise ValueError("H is not symmetric or contains NaN or Inf values; pass the second moment XᵀX of the "
                         "layer inputs.")
    root = (diag * (1 + _MINOR_RTOL)).sqrt_()  # (n,), so that root_i root_j = sqrt(H_ii H_jj) (1 + rtol)
    if not bool((H64.abs() <= torch.outer(root, root)).all()):
        raise ValueError("H is not positive semi-definite (some |H_ij| > sqrt(H_ii H_jj)); pass the second "
                         "moment XᵀX of the layer inputs.")
    return H64, diag


def _damped_cholesky(Hr: Tensor, lam_unit: float, damp: float) -> tuple[Tensor, float]:
    """Lower ``L`` with ``Hr + damp·lam_unit·I = L Lᵀ`` (float64) and the ``damp`` used.

    ``Hr`` (``J H J``, see :func:`_reversed_inverse`) is dampened in place; on failure ``damp`` is
    multiplied by 10 and the factorization retried, until ``max(damp, _MAX_DAMP)`` would be passed.
    ``H`` must be finite (checked by :func:`_checked_hessian`), so a factorization that reports
    success is finite.
    """
    limit, added = max(damp, _MAX_DAMP), 0.0
    for attempt in range(_RETRIES + 1):
        Hr.diagonal().add_(damp * lam_unit - added)
        added = damp * lam_unit
        L, info = torch.linalg.cholesky_ex(Hr)
        if int(info) == 0:
            return L, damp
        if attempt == _RETRIES or damp * 10 > limit * (1 + 1e-9):
            break
        damp *= 10
    raise ValueError(f"H is not positive semi-definite (its Cholesky factorization failed even with "
                     f"{damp:g} x mean(diag H) dampening); pass the second moment XᵀX of the layer inputs.")


def _reversed_inverse(L: Tensor) -> Tensor:
    """``U = J L⁻¹ J``: for ``J H J = L Lᵀ`` (``J`` the exchange matrix), the upper factor of ``H⁻¹ = UᵀU``."""
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    inv = torch.linalg.solve_triangular(L, eye, upper=False)
    del eye
    return inv.flip(0, 1)


class _GroupGrids:
    """Per-group grids, ``(groups, m)`` (transposed like the loop): fp16 scales/zeros as stored, and the
    float32 divisor, scale and zero that ``quant._round_to_grid`` / ``quant._decode_values`` use."""

    def __init__(self, m: int, groups: int, cfg: QuantConfig, dev: torch.device) -> None:
        self.scales16 = torch.zeros(groups, m, dtype=torch.float16, device=dev)
        self.s_div = torch.ones(groups, m, dtype=torch.float32, device=dev)
        self.s_mul = torch.zeros(groups, m, dtype=torch.float32, device=dev)
        asym = cfg.scheme == "asym"
        self.zeros16 = torch.zeros(groups, m, dtype=torch.float16, device=dev) if asym else None
        self.z = torch.zeros(groups, m, dtype=torch.float32, device=dev) if asym else None

    def set(self, groups: slice, scales: Tensor, zeros: Tensor | None) -> None:
        """Store fp16 ``scales`` / ``zeros`` from ``quant._grid_params`` as groups ``groups``: ``(m, k)``
        for ``k`` groups, or ``(m,)`` for one."""
        if scales.ndim == 1:
            scales, zeros = scales[:, None], None if zeros is None else zeros[:, None]
        self.scales16[groups] = scales.T
        self.s_div[groups] = quant._safe_scale(scales).T
        self.s_mul[groups] = scales.T.float()
        if zeros is not None:
            self.zeros16[groups] = zeros.T
            self.z[groups] = zeros.T.float()


def _blocks(n: int, g: int, block_size: int, static: bool) -> list[tuple[int, int]]:
    """``[(i1, i2), ...]`` column blocks; with dynamic grids, cut so a group never starts inside a
    block and ends beyond it (its updated weights must all be at hand at its first column)."""
    if static or g <= block_size:
        step = block_size if static else (block_size // g) * g
        return [(a, min(a + step, n)) for a in range(0, n, step)]
    return [(b, min(b + block_size, a + g)) for a in range(0, n, g) for b in range(a, a + g, block_size)]


def _gptq_loop(Wt: Tensor, R: Tensor, grids: _GroupGrids, group_of: list[int], cfg: QuantConfig, g: int,
               block_size: int, static: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The column loop of Algorithm 1 with lazy batch updates, on ``Wt`` (``(n, m)``, updated in place).

    Returns ``(Qt, Wh, D)``, all ``(n, m)`` float32 in processing order: the grid values, ``Ŵᵀ`` and the
    rounding errors ``w − ŵ`` of the updated columns.
    """
    n = Wt.shape[0]
    Qt, Wh, D = torch.empty_like(Wt), torch.empty_like(Wt), torch.empty_like(Wt)
    w_r, q_r, h_r, d_r = Wt.unbind(0), Qt.unbind(0), Wh.unbind(0), D.unbind(0)  # row views, (m,) each
    s_div, s_mul = grids.s_div.unbind(0), grids.s_mul.unbind(0)
    z = grids.z.unbind(0) if grids.z is not None else [None] * len(s_div)
    for i1, i2 in _blocks(n, g, block_size, static):
        W1, R1 = Wt[i1:i2], R[i1:i2, i1:i2]  # the block's columns (b, m) and feedback rows (b, b)
        for j, i in enumerate(range(i1, i2)):
            if not static and i % g == 0:  # group start: its grid from the updated weights (g, m)
                # reduced along dim 0 of the contiguous block: aminmax over the strided transposed view
                # spreads tiny reductions over OpenMP threads (measured: 30 ms instead of 50 us on busy cores)
                grids.set(slice(i // g, i // g + 1), *quant._grid_params(Wt[i:i + g], cfg, dim=0))
            k = group_of[i]
            q = quant._round_to_grid(w_r[i], s_div[k], z[k], cfg, out=q_r[i])
            quant._decode_values(q, s_mul[k], z[k], out=h_r[i])
            torch.sub(w_r[i], h_r[i], out=d_r[i])
            # feedback inside the block, a rank-1 update as a k=1 GEMM (addr_ was 70x slower on 2
            # busy cores: it spreads a 127x576 update over OpenMP threads; MKL's GEMM keeps it on one)
            W1[j + 1:].addmm_(R1[j, j + 1:, None], D[i:i + 1], alpha=-1)  # (b-j-1, m) -= (b-j-1, 1) @ (1, m)
        if i2 < n:  # lazy batch update of the rest: (n-i2, m) -= (n-i2, b) @ (b, m)
            Wt[i2:].addmm_(R[i1:i2, i2:].T, D[i1:i2], alpha=-1)
    return Qt, Wh, D
