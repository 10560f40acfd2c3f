"""The ``gram64`` path of a spectrum: the float64 Gram matrix, its eigenvalues, the a-posteriori error.

:func:`_gram64` forms the Gram matrix of the smaller side (BLAS ``dsyrk`` on CPU, chunked ``addmm_``
on GPU), :func:`_eigvalsh` diagonalises it with a CPU thread count fit for a shared machine, and
:func:`_gram_error_estimate` bounds the error of σ = sqrt(λ) relative to σ_max. The accuracy argument
is in :mod:`sahc_core.spectra.spectrum`'s docstring; :mod:`sahc_core.spectra._blocked` and
:mod:`sahc_core.spectra.batched` use the same pieces.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from scipy.linalg.blas import dsyrk as _dsyrk

#: Rows converted to float64 at a time while forming the Gram matrix (bounds the extra memory).
_GRAM_CHUNK = 4096
#: CPU ``eigvalsh`` of an n x n Gram with n <= this runs on ONE thread unless the machine is idle (see
#: ``_EIGH_PARALLEL_MIN_N``). Its tridiagonal reduction is memory-bound BLAS-2 with a parallel region
#: per column: measured on 2 shared cores, 1 thread was 5x faster at n = 4096 (2.2 s vs 11 s) and up
#: to 40x at n = 576, because every OpenMP barrier waits for a descheduled thread when the machine is
#: oversubscribed.
_EIGH_SERIAL_MAX_N = 4096
#: ... but when no other task is runnable (``_machine_idle``), n >= this uses every thread: on 2 idle
#: cores, 2 threads took 1.57 s against 2.1 s at n = 4096 and 0.29 s against 0.34 s at n = 2048.
#: Below it the gain is a few ms and one descheduled thread costs more (0.7 s once at n = 1536).
_EIGH_PARALLEL_MIN_N = 2048
_EPS64 = float(np.finfo(np.float64).eps)


def _gram64(M: torch.Tensor) -> torch.Tensor:
    """Float64 Gram matrix of the smaller side of ``M``: (n, n) with n = min(m, n).

    Only the UPPER triangle is guaranteed (the CPU path fills nothing else); read it with
    ``eigvalsh(G, UPLO="U")``. Rows are converted to float64 ``_GRAM_CHUNK`` at a time.
    """
    if M.shape[0] < M.shape[1]:
        M = M.T  # (n, m) -> (m, n), tall
    return _gram64_syrk(M) if M.device.type == "cpu" else _gram64_torch(M)


def _gram64_torch(M: torch.Tensor) -> torch.Tensor:
    """Full Gram MᵀM of a tall ``M`` in float64 on M's device (the GPU path), chunked ``addmm_``."""
    m, n = M.shape
    G = torch.zeros(n, n, dtype=torch.float64, device=M.device)
    for start in range(0, m, _GRAM_CHUNK):
        block = M[start:start + _GRAM_CHUNK].to(torch.float64)  # (<=chunk, n)
        G.addmm_(block.T, block)
    return G


def _gram64_syrk(M: torch.Tensor) -> torch.Tensor:
    """CPU Gram via BLAS ``dsyrk`` (scipy), which computes one triangle: half the flops of a GEMM.

    torch exposes no SYRK; measured on 12288 x 4096: 1.7 s against 2.5 s for ``addmm_``.
    """
    m, n = M.shape
    G = np.zeros((n, n), dtype=np.float64, order="F")
    for start in range(0, m, _GRAM_CHUNK):
        block = M[start:start + _GRAM_CHUNK].to(torch.float64).contiguous().numpy()  # (k, n), C order
        # block.T is an F-ordered (n, k) view: C := block.T @ block + C (upper triangle), in place
        G = _dsyrk(1.0, block.T, beta=1.0, c=G, trans=0, lower=0, overwrite_c=1)
    return torch.from_numpy(G)


@contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (no change for ``None``), restoring the old value."""
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def _machine_idle() -> bool:
    """True when no task of another process is runnable right now; False when that cannot be read.

    Linux only: the runnable count of ``/proc/loadavg`` (field 4, ``running/total``) minus this
    process's own runnable threads (``/proc/self/task/*/stat`` state ``R``), because a BLAS worker
    of ours may still be spinning after the Gram product.
    """
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            running = int(f.read().split()[3].split("/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat", encoding="ascii", errors="replace") as f:
                    stat = f.read()
            except OSError:  # the thread ended meanwhile
                continue
            own += stat.rpartition(")")[2].split()[0] == "R"  # the state follows "(comm)"
    except (OSError, ValueError, IndexError):
        return False
    return running - own <= 0


def _eigvalsh(G: torch.Tensor, adaptive_threads: bool = False) -> torch.Tensor:
    """Ascending eigenvalues of a symmetric matrix.

    With ``adaptive_threads`` (only an entry point that owns the process sets it: the CLI; torch's
    thread count is process-wide, so a page thread never does): serial on CPU for
    n <= ``_EIGH_SERIAL_MAX_N`` unless the machine is idle and n >= ``_EIGH_PARALLEL_MIN_N``.
    """
    n = G.shape[0]
    serial = (adaptive_threads and G.device.type == "cpu" and n <= _EIGH_SERIAL_MAX_N
              and not (n >= _EIGH_PARALLEL_MIN_N and _machine_idle()))
    with _cpu_threads(1 if serial else None):
        return torch.linalg.eigvalsh(G, UPLO="U")


def _gram_error_estimate(s: np.ndarray, shape: tuple[int, int]) -> float:
    """A-posteriori estimate of max_i |Δσ_i| / σ_max of the Gram path (see module docstring)."""
    if s.size == 0 or s[0] == 0.0:
        return 0.0
    m, n = max(shape), min(shape)
    d_lambda = _EPS64 * (math.sqrt(m) * float(np.sum(s**2)) + math.sqrt(n) * float(s[0]) ** 2)
    return float(np.max(d_lambda / (s + math.sqrt(d_lambda)))) / float(s[0])
