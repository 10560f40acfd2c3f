"""Memory-bounded Gram matrix and singular values of ONE stored tensor, read a row block at a time.

The tensor is never read whole: row blocks ``W[a:b]`` of the 2-D view ``(d0, d1*...)`` (the view
:func:`sahc_core.spectra.spectrum.as_matrix` uses) come from ``safe_open(...).get_slice(name)[a:b]`` through
:class:`sahc_core.io.rows.RowReader`, the shard being reopened once half a block has been read through
one mapping, so that the memory-mapped pages read so far are unmapped again (one long-lived mapping
keeps every page read in the process's RSS). Peak memory is
about the k x k float64 Gram (k = min(m, n); 134 MB for k = 4096) plus one block of
``block_bytes`` (default 256 MiB) in the product dtype, plus the block as stored.

Gram of the smaller side:

* m >= n (tall): G = WᵀW = Σ_b B_bᵀ B_b over row blocks B_b (n x n).
* m < n (wide): G = WWᵀ, block (a, b) of G is B_a B_bᵀ; each block pair is read once (b >= a), so
  a wide tensor of p blocks is read p(p+1)/2 times with two blocks held (each ``block_bytes / 2``).
  Wide weights of LLMs (down_proj, o_proj, mtp.fc) fit one block: one read.

Precision of the block products (the accuracy contract of :mod:`sahc_core.spectra.spectrum`: max |Δσ| /
σ_max <= 1e-5 against a float64 SVD):

* ``"float64"``: float64 products accumulated in float64, the ``gram64`` path of
  :mod:`sahc_core.spectra._gram`, with its a-posteriori estimate ``_gram_error_estimate``.
* ``"float32"``: float32 block products (exact inputs: bf16/f16/f32 are exact in float32) added
  into a float64 Gram; 2.4x less CPU time than float64 for the products (OpenBLAS ssyrk vs dsyrk,
  8192 x 4096, this machine). Its eigenvalue error is modelled as δλ ≈ C·ε₃₂·‖W‖_F²/√k: on bf16
  matrices of 1024-32768 x 512-4096 (iid, iid + mean, rotated power laws σ_i = i^-0.5 and i^-1.5,
  rank-deficient) the smallest δλ that bounds every |Δσ_i| was 0.04-0.84 x ε₃₂‖W‖_F²/√k, so
  ``C = 4`` over-estimates by >= 4.8x; accepted when max_i δλ/(σ_i + √δλ)/σ_max <= 1e-5. On the
  trained weights of SmolLM2-135M (43 matrices) float32 products MISS the contract for every q_proj
  and o_proj (σ_max/σ_min 3e3-5e4: errors 1.4e-5 to 1.2e-4, each flagged: estimate 8-31x the
  error) and meet it elsewhere (<= 4.5e-7; estimate 60-230x the error, so flagged too often).
* ``"auto"``: float32; if its estimate exceeds 1e-5 the float64 Gram is formed (a second pass);
  if that estimate exceeds ``spectrum._GRAM_TOL``, a float64 SVD of the whole tensor when its
  float64 copy is <= ``svd_max_bytes`` (not memory-bounded, hence the cap), else the float64 Gram
  result with ``within_contract=False``. Because the float32 estimate is pessimistic, ``auto``
  kept float32 for 2 of SmolLM2's 43 matrices and for neither the synthetic 9B embedding nor FFN
  (actual float32 errors 3.2e-7 and 4.6e-7 there): it then costs more than ``"float64"``, the
  default.

References
----------
.. [1] Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., SIAM 2002, ch. 3
       (rounding errors of inner products) and §20 (normal equations / Gram matrices).
.. [2] Demmel, "Applied Numerical Linear Algebra", SIAM 1997, §5.2 (Weyl: |Δλ_i| <= ‖ΔG‖₂).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.linalg.blas import dsyrk, ssyrk

from sahc_core.device import resolve_device
from sahc_core.errors import ModelError
from sahc_core.io.dtypes import not_analysed_reason
from sahc_core.io.rows import DEFAULT_BLOCK_BYTES, matrix_shape, row_reader, rows_per_block
from sahc_core.spectra._gram import _eigvalsh, _gram_error_estimate
from sahc_core.spectra.spectrum import _GRAM_TOL

if TYPE_CHECKING:
    from sahc_core.io.source import ModelSource

PRECISIONS = ("auto", "float32", "float64")
#: Largest float64 copy of a tensor that ``"auto"`` may SVD whole when both Gram paths miss the contract.
DEFAULT_SVD_MAX_BYTES = 2**30
#: Accuracy contract of every spectrum: max |Δσ| / σ_max.
CONTRACT = 1e-5
#: Calibration constant of the float32 estimate (see the module docstring: >= 4.8x the measured need).
_GRAM32_C = 4.0
_EPS32 = float(np.finfo(np.float32).eps)
#: Columns copied at a time when mirroring the upper triangle (bounds the temporary).
_SYMM_STRIP = 512
_PRODUCT_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class BlockedSpectrum:
    """Singular values of one tensor from :func:`spectrum_blocked`.

    Attributes
    ----------
    singular_values : np.ndarray
        All min(m, n) values, float64, descending.
    shape : (int, int)
        The 2-D view (m, n).
    method : str
        ``"gram32"``, ``"gram64"`` or ``"svd64"`` (what produced the values).
    error_estimate : float
        A-posteriori estimate of max |Δσ| / σ_max of that method (0 for ``svd64``).
    within_contract : bool
        The estimate is within the tolerance of the method (1e-5 for gram32, ``_GRAM_TOL`` for gram64).
    block_rows : int
        Rows per block read.
    mean : float
        Mean of the entries (summed in float64 while the blocks were read; for the MP reference).
    """

    singular_values: np.ndarray = field(repr=False)
    shape: tuple[int, int]
    method: str
    error_estimate: float
    within_contract: bool
    block_rows: int
    mean: float = 0.0


def _block_rows(shape: tuple[int, int], precision: str, block_bytes: int) -> int:
    """Rows per block for the 2-D view ``shape``: a wide view holds two blocks, each half the budget."""
    itemsize = torch.empty(0, dtype=_PRODUCT_DTYPES[precision]).element_size()
    return rows_per_block(shape[1], itemsize, block_bytes if shape[0] >= shape[1] else max(1, block_bytes // 2))


def _check(source: ModelSource, name: str, block_bytes: int, precision: str, allowed: tuple[str, ...]):
    info = source.info(name)
    if len(info.shape) < 2:
        raise ModelError(f"tensor {name!r} is {len(info.shape)}-D (a norm or bias) and has no spectrum; pick a 2-D weight.")
    if not info.analysed:  # slices are read past ModelSource.read, so its dtype rule is applied here too
        raise ModelError(f"{not_analysed_reason(name, info.dtype)}.")
    if not (isinstance(block_bytes, int) and block_bytes >= 1):
        raise ValueError(f"block_bytes must be a positive integer, got {block_bytes!r}.")
    if precision not in allowed:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(allowed)}.")
    return info


def _symmetrize_upper(G):
    """Copy the upper triangle of a square numpy array or torch tensor onto its lower one, in strips."""
    triu = np.triu if isinstance(G, np.ndarray) else torch.triu
    k = G.shape[0]
    for j in range(0, k, _SYMM_STRIP):
        e = min(k, j + _SYMM_STRIP)
        G[j:e, :j] = G[:j, j:e].T  # left of the diagonal block
        D = triu(G[j:e, j:e])
        G[j:e, j:e] = D + triu(D, 1).T  # the diagonal block itself
    return G


def _gram_cpu(read, m: int, n: int, rows: int, dtype: torch.dtype) -> np.ndarray:
    """Upper triangle of the Gram with OpenBLAS syrk (half the flops of a GEMM); float64, F order."""
    f32 = dtype == torch.float32
    if m >= n:  # tall: G = Σ BᵀB, (n, n)
        G = np.zeros((n, n), dtype=np.float64, order="F")
        C = np.zeros((n, n), dtype=np.float32, order="F") if f32 else None  # float32 block product
        for a in range(0, m, rows):
            B = read(a, min(m, a + rows)).to(dtype).numpy()  # (r, n), C order; B.T is F-ordered (n, r)
            if f32:
                C = ssyrk(1.0, B.T, beta=0.0, c=C, trans=0, lower=0, overwrite_c=1)  # C := BᵀB (upper)
                G += C
            else:
                G = dsyrk(1.0, B.T, beta=1.0, c=G, trans=0, lower=0, overwrite_c=1)  # G += BᵀB in place
        return G
    G = np.zeros((m, m), dtype=np.float64, order="F")  # wide: G = WWᵀ, (m, m)
    syrk = ssyrk if f32 else dsyrk
    for a in range(0, m, rows):
        a1 = min(m, a + rows)
        A = read(a, a1).to(dtype).numpy()  # (ra, n)
        G[a:a1, a:a1] += syrk(1.0, A.T, trans=1, lower=0)  # (A.T)ᵀ(A.T) = A Aᵀ, upper
        for b in range(a1, m, rows):
            G[a:a1, b:min(m, b + rows)] += A @ read(b, min(m, b + rows)).to(dtype).numpy().T  # (ra, rb)
    return G


def _gram_torch(read, m: int, n: int, rows: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The full Gram with torch on ``device`` (the GPU path; also runs on CPU), float64."""
    k = min(m, n)
    G = torch.zeros(k, k, dtype=torch.float64, device=device)
    for a in range(0, m, rows):
        a1 = min(m, a + rows)
        A = read(a, a1).to(device=device, dtype=dtype)  # (ra, n)
        if m >= n:
            G.add_((A.T @ A).to(torch.float64))  # (n, n)
            continue
        G[a:a1, a:a1].add_((A @ A.T).to(torch.float64))
        for b in range(a1, m, rows):
            Bb = read(b, min(m, b + rows)).to(device=device, dtype=dtype)
            G[a:a1, b:min(m, b + rows)].add_((A @ Bb.T).to(torch.float64))  # (ra, rb), upper blocks only
    return G


def _use_blas(device: str) -> bool:
    """Products through scipy's BLAS syrk on CPU, through torch elsewhere."""
    return device == "cpu"


class _Summed:
    """A row-range reader that also adds up (float64) every row range it reads for the first time."""

    def __init__(self, read) -> None:
        self._read, self._seen, self.total = read, set(), 0.0

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        B = self._read(start, stop)
        if start not in self._seen:  # a wide tensor reads a block several times: count it once
            self._seen.add(start)
            self.total += float(B.sum(dtype=torch.float64))
        return B


def _gram(source: ModelSource, name: str, block_bytes: int, device: str,
          precision: str) -> tuple[torch.Tensor, tuple[int, int], float]:
    """:func:`gram_blocked` plus the sum of all entries (float64, for the mean of the MP reference)."""
    info = _check(source, name, block_bytes, precision, ("float32", "float64"))
    m, n = matrix_shape(info.shape)
    dtype = _PRODUCT_DTYPES[precision]
    dev = resolve_device(device)
    if min(m, n) == 0:
        return torch.zeros(min(m, n), min(m, n), dtype=torch.float64, device=dev), (m, n), 0.0
    rows = _block_rows((m, n), precision, block_bytes)
    reader = row_reader(source, name, mapped_bytes=block_bytes // 2)
    read = _Summed(reader.read)
    try:
        if _use_blas(dev):
            G = torch.from_numpy(_symmetrize_upper(_gram_cpu(read, m, n, rows, dtype)))
        else:
            G = _symmetrize_upper(_gram_torch(read, m, n, rows, dtype, dev))
        return G, (m, n), read.total
    finally:
        reader.close()


def gram_blocked(source: ModelSource, name: str, *, block_bytes: int = DEFAULT_BLOCK_BYTES, device: str = "cpu",
                 precision: str = "float64") -> tuple[torch.Tensor, tuple[int, int]]:
    """Float64 Gram of the smaller side of one stored tensor, accumulated from row blocks.

    Parameters
    ----------
    source : ModelSource
        The model; only ``name`` is read, one block of rows at a time.
    name : str
        A tensor of >= 2 dims; N-D tensors use the view ``(d0, d1*...*dk)``.
    block_bytes : int
        Bytes of one block in the product dtype (at least one row; a wide tensor holds two halves).
    device : str
        ``"cpu"`` (BLAS syrk), ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
    precision : str
        ``"float64"`` or ``"float32"`` block products (always accumulated in float64).

    Returns
    -------
    (torch.Tensor, (int, int))
        G, symmetric float64 (k, k) with k = min(m, n) on ``device`` (WᵀW when m >= n, else WWᵀ),
        and the view's shape (m, n).
    """
    G, shape, _ = _gram(source, name, block_bytes, device, precision)
    return G, shape


def gram_of(W: torch.Tensor, *, precision: str = "float32", device: str = "cpu",
            block_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """The blocked float64 Gram (as :func:`gram_blocked`) of an IN-MEMORY matrix in any dtype.

    For a tensor held in its stored dtype (bf16): each block of rows is converted to the product
    dtype alone, so no float32/float64 copy of the whole matrix is made.
    """
    if W.ndim != 2:
        raise ValueError(f"gram_of takes a 2-D matrix, got shape {tuple(W.shape)}.")
    if precision not in _PRODUCT_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; use float32 or float64.")
    m, n = (int(d) for d in W.shape)
    dev = resolve_device(device)
    rows = _block_rows((m, n), precision, block_bytes)
    read = lambda a, b: W[a:b]  # noqa: E731 - a view; the Gram code converts it
    if _use_blas(dev):
        return torch.from_numpy(_symmetrize_upper(_gram_cpu(read, m, n, rows, _PRODUCT_DTYPES[precision])))
    return _symmetrize_upper(_gram_torch(read, m, n, rows, _PRODUCT_DTYPES[precision], dev))


def _gram32_error_estimate(s: np.ndarray, shape: tuple[int, int]) -> float:
    """Estimate of max_i |Δσ_i| / σ_max of the float32-product Gram (see the module docstring)."""
    if s.size == 0 or s[0] == 0.0:
        return 0.0
    k = min(shape)
    d_lambda = _GRAM32_C * _EPS32 * float(np.sum(s**2)) / math.sqrt(k)
    return float(np.max(d_lambda / (s + math.sqrt(d_lambda)))) / float(s[0]) + _gram_error_estimate(s, shape)


def _sigma(G: torch.Tensor) -> np.ndarray:
    """Descending σ = sqrt(max(λ, 0)) of a symmetric Gram, float64 numpy."""
    lam = _eigvalsh(G)  # ascending, float64
    return torch.sqrt(torch.clamp(lam, min=0.0)).flip(0).cpu().numpy()


def spectrum_blocked(source: ModelSource, name: str, *, block_bytes: int = DEFAULT_BLOCK_BYTES, device: str = "cpu",
                     precision: str = "float64", svd_max_bytes: int = DEFAULT_SVD_MAX_BYTES) -> BlockedSpectrum:
    """Singular values of one stored tensor from its blocked Gram, with the method and its error estimate.

    Parameters
    ----------
    source, name, block_bytes, device
        As :func:`gram_blocked`.
    precision : str
        ``"float64"`` or ``"float32"`` (no fallback; ``within_contract`` tells whether the estimate
        meets the contract), or ``"auto"`` (float32, falling back as the module docstring says).
    svd_max_bytes : int
        ``"auto"`` only: the largest float64 copy of the tensor its last-resort full SVD may make.

    Returns
    -------
    BlockedSpectrum
    """
    info = _check(source, name, block_bytes, precision, PRECISIONS)
    shape = matrix_shape(info.shape)
    first = precision
    if precision == "auto":
        first = "float64" if info.dtype == "F64" else "float32"  # float64 data is not exact in float32
    G, _, total = _gram(source, name, block_bytes, device, first)
    mean = total / max(1, shape[0] * shape[1])
    s = _sigma(G)
    del G
    if first == "float32":
        est = _gram32_error_estimate(s, shape)
        if precision == "float32" or est <= CONTRACT:
            return BlockedSpectrum(s, shape, "gram32", est, est <= CONTRACT, _block_rows(shape, first, block_bytes),
                                   mean)
        G, _ = gram_blocked(source, name, block_bytes=block_bytes, device=device, precision="float64")
        s = _sigma(G)
        del G
    rows = _block_rows(shape, "float64", block_bytes)
    est = _gram_error_estimate(s, shape)
    if precision != "auto" or est <= _GRAM_TOL or shape[0] * shape[1] * 8 > svd_max_bytes:
        return BlockedSpectrum(s, shape, "gram64", est, est <= _GRAM_TOL, rows, mean)
    W = source.read(name, device=resolve_device(device), dtype=torch.float64).reshape(shape)
    s = torch.linalg.svdvals(W).cpu().numpy()
    return BlockedSpectrum(s, shape, "svd64", 0.0, True, rows, mean)


def singular_values_blocked(source: ModelSource, name: str, *, block_bytes: int = DEFAULT_BLOCK_BYTES,
                            device: str = "cpu", precision: str = "float64") -> np.ndarray:
    """All min(m, n) singular values of one stored tensor, float64, descending (see :func:`spectrum_blocked`)."""
    return spectrum_blocked(source, name, block_bytes=block_bytes, device=device, precision=precision).singular_values
