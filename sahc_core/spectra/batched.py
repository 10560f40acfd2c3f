"""Same-shape spectra in batches (the GPU path of a scan): stacked float64 Grams, one batched ``eigvalsh``.

A 32-layer model has ~10 distinct weight shapes among ~300 matrices, so on a GPU the scan stacks
tensors of one shape (and stored dtype) into ``(b, m, n)`` batches: the Grams ``MᵀM`` of the smaller
side are formed with ``baddbmm`` in float64 (float32/bf16 inputs are exact in float64, as in the
``gram64`` path of :mod:`sahc_core.spectra.spectrum`), diagonalised by one batched
``torch.linalg.eigvalsh``, and each matrix's a-posteriori estimate decides, as for one tensor,
whether its values are kept or recomputed by a float64 ``svdvals`` (the contract: max |Δσ| / σ_max
<= 1e-5). While a batch is on the device, a reader thread already reads the next batch from disk
(:func:`iter_batches`), so transfers overlap reads.

Device memory is bounded like host memory: a batch holds at most ``batch_bytes`` (default 2 GiB,
or half the free device memory when less) counting the stored stack, its float64 row chunks and the
Grams with ``eigvalsh``'s workspace (:func:`matrices_per_batch`). Everything runs on CPU too (the
tests' fallback); a scan batches only on CUDA unless asked.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from sahc_core.device import resolve_device
from sahc_core.io.rows import STORED_ITEMSIZE, matrix_shape
from sahc_core.spectra._gram import _gram_error_estimate
from sahc_core.spectra.spectrum import _GRAM_TOL, as_matrix, make_value

if TYPE_CHECKING:
    from sahc_core.io.source import ModelSource, TensorInfo

#: Device bytes one batch may hold (stack + float64 chunk + Grams); halved free memory caps it on CUDA.
DEFAULT_BATCH_BYTES = 2 * 2**30
#: Rows of every matrix of a batch turned into float64 at a time while the Grams are accumulated.
_CHUNK_ROWS = 2048


def matrices_per_batch(shape: tuple[int, int], itemsize: int, batch_bytes: int) -> int:
    """How many ``shape`` matrices stored with ``itemsize`` bytes fit one batch of ``batch_bytes`` (>= 1)."""
    m, n = max(shape), min(shape)
    per = m * n * itemsize + min(m, _CHUNK_ROWS) * n * 8 + 3 * n * n * 8  # stack, f64 chunk, G + eigvalsh work
    return max(1, int(batch_bytes) // per)


def batched_singular_values(stack: torch.Tensor, device: str = "auto") -> tuple[np.ndarray, list[str]]:
    """All singular values of each matrix of a ``(b, m, n)`` stack: ``(b, min(m, n))`` float64, descending.

    Returns the values and, per matrix, the method used: ``"gram64"`` or ``"svd64"`` (the fallback
    when the Gram's a-posteriori estimate exceeds ``spectrum._GRAM_TOL``).
    """
    s, methods, _ = _batched(stack, device)
    return s, methods


def _batched(stack: torch.Tensor, device: str) -> tuple[np.ndarray, list[str], list[float]]:
    """:func:`batched_singular_values` plus each matrix's entry sum (float64, for the MP reference's mean)."""
    if stack.ndim != 3:
        raise ValueError(f"a batch is a (b, m, n) stack, got shape {tuple(stack.shape)}.")
    dev = resolve_device(device)
    M = stack.to(dev, non_blocking=True)
    if M.shape[1] < M.shape[2]:
        M = M.transpose(1, 2)  # the Gram of the smaller side: (b, n, m) -> tall
    b, m, n = M.shape
    G = torch.zeros(b, n, n, dtype=torch.float64, device=dev)
    sums = torch.zeros(b, dtype=torch.float64, device=dev)
    for start in range(0, m, _CHUNK_ROWS):
        blk = M[:, start:start + _CHUNK_ROWS].to(torch.float64)  # (b, rows, n)
        G.baddbmm_(blk.transpose(1, 2), blk)
        sums += blk.sum(dim=(1, 2))
    lam = torch.linalg.eigvalsh(G)  # (b, n) ascending
    del G
    s = torch.sqrt(torch.clamp(lam, min=0.0)).flip(-1).cpu().numpy()
    methods = []
    for i in range(b):
        if _gram_error_estimate(s[i], (m, n)) <= _GRAM_TOL:
            methods.append("gram64")
            continue
        s[i] = torch.linalg.svdvals(M[i].to(torch.float64)).cpu().numpy()
        methods.append("svd64")
    return s, methods, sums.tolist()


def _read(source: ModelSource, names: Sequence[str], pin: bool) -> torch.Tensor:
    """The stacked 2-D views of ``names`` (one shape and dtype) in their stored dtype, on CPU (pinned for CUDA)."""
    first = as_matrix(source.read(names[0]))[0]
    stack = torch.empty(len(names), *first.shape, dtype=first.dtype, pin_memory=pin)
    stack[0] = first
    del first
    for i, n in enumerate(names[1:], start=1):
        stack[i] = as_matrix(source.read(n))[0]
    return stack


def iter_batches(source: ModelSource, infos: Sequence[TensorInfo], device: str = "auto",
                 batch_bytes: int = DEFAULT_BATCH_BYTES) -> Iterator[tuple[TensorInfo, dict]]:
    """``(info, cache value)`` of each tensor of ``infos``, computed batch by batch (same shape and dtype).

    The next batch is read by a background thread while the current one is computed. Each value is
    what :func:`sahc_core.spectra.spectrum.spectrum_value` would give (``compute_seconds`` = the
    batch's time divided by its size); the caller commits each as it arrives.
    """
    dev = resolve_device(device)
    if dev.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(dev))
        batch_bytes = min(batch_bytes, free // 2)
    groups: dict[tuple, list] = {}
    for info in infos:
        groups.setdefault((matrix_shape(info.shape), info.dtype), []).append(info)
    batches = []
    for (shape, dtype), members in groups.items():
        k = matrices_per_batch(shape, STORED_ITEMSIZE.get(dtype, 8), batch_bytes)
        batches += [members[i:i + k] for i in range(0, len(members), k)]
    if not batches:
        return
    pin = dev.startswith("cuda")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sahc-batch-read") as pool:
        pending = pool.submit(_read, source, [i.name for i in batches[0]], pin)
        for j, batch in enumerate(batches):
            stack = pending.result()
            if j + 1 < len(batches):  # read the next batch while this one is computed
                pending = pool.submit(_read, source, [i.name for i in batches[j + 1]], pin)
            t0 = time.perf_counter()
            s, methods, sums = _batched(stack, dev)
            each = (time.perf_counter() - t0) / len(batch)
            del stack
            for info, sv, used, total in zip(batch, s, methods, sums):
                note = as_matrix(torch.empty(info.shape, device="meta"))[1]
                mean = total / max(1, info.numel)
                yield info, make_value(info, sv, used, mean, note, dev, each, {"batched": len(batch)})
