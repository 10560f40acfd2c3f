"""Bounded-memory reads of ONE stored tensor (row blocks, or the whole tensor in its stored dtype) and the bound.

``safe_open`` memory-maps a shard, and every page a read touches stays in the process's resident set
while the mapping lives: ``ModelSource.read`` of a 2 GB bf16 embedding holds the 2 GB copy AND the
2 GB of mapped pages until the file is closed, and a float32 cast adds 4 GB more. The readers here
copy row ranges ``W[a:b]`` of the 2-D view ``(d0, d1*...)`` through ``get_slice`` and reopen the
shard whenever the bytes read through one mapping would pass ``mapped_bytes``, so the mapped
residency stays below that window.

The memory bound (issue 15, every command and page): peak RSS <= ``2.5 x`` the largest tensor's
bf16 bytes + 1.5 GB (:func:`memory_bound`). A tensor whose float32 copy is larger than
``BOUNDED_MIN_BYTES`` (512 MiB, 134M elements: Qwen3.5-9B's 248,320 x 4,096 embedding and LM head,
none of its 12,288 x 4,096 FFN matrices) takes the bounded paths of the spectra and What-if code:
the in-memory paths hold about 12-14 bytes per element (float32 W, Ŵ, their difference, the mapped
stored copy), which fits ``5 bytes x the largest tensor + 1.5 GB`` only below ~160M elements.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from sahc_core.errors import ModelError

if TYPE_CHECKING:
    from sahc_core.io.source import ModelSource, TensorInfo

#: Float32 bytes of a tensor above which the spectra / What-if / assembly code takes its bounded path.
BOUNDED_MIN_BYTES = 512 * 2**20
#: The fixed part of the memory bound (interpreter, torch, libraries, caches): 1.5 GB.
BOUND_OVERHEAD_BYTES = 1_500_000_000
#: The per-tensor part of the memory bound: this many times the largest tensor's bf16 bytes.
BOUND_FACTOR = 2.5
#: Floor of the bytes read through one mapping before the shard is remapped (small blocks share one).
MIN_MAPPED_BYTES = 16 * 2**20
#: Default bytes of one row block (and of the mapped window of :func:`read_stored`).
DEFAULT_BLOCK_BYTES = 256 * 2**20
#: Bytes per element of the safetensors dtypes (others count as 8, an upper bound).
STORED_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8}


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (rows, cols) of the 2-D view ``(d0, d1*...*dk)`` of an N-D shape (a 1-D shape is ``(d0, 1)``)."""
    return (int(shape[0]), int(math.prod(shape[1:]))) if shape else (1, 1)


def memory_bound(source: ModelSource) -> int:
    """Bytes of the memory bound of ``source``: 2.5 x its largest tensor's bf16 bytes + 1.5 GB."""
    largest = max((t.numel for t in source.tensors()), default=0)
    return int(BOUND_FACTOR * 2 * largest + BOUND_OVERHEAD_BYTES)


def is_bounded(info: TensorInfo) -> bool:
    """True when the tensor's float32 copy exceeds ``BOUNDED_MIN_BYTES`` (it takes the bounded paths)."""
    return 4 * info.numel > BOUNDED_MIN_BYTES


def rows_per_block(n_cols: int, itemsize: int, block_bytes: int) -> int:
    """Rows of ``n_cols`` elements of ``itemsize`` bytes in one block (at least 1 row)."""
    return max(1, int(block_bytes) // max(1, n_cols * itemsize))


def _read_rows(fh, name: str, start: int, stop: int, n_cols: int) -> torch.Tensor:
    """Rows ``start:stop`` of tensor ``name`` from an open shard, as a (stop - start, n_cols) copy."""
    return fh.get_slice(name)[start:stop].reshape(stop - start, n_cols)


class RowReader:
    """Row ranges of the 2-D view of one stored tensor, with bounded memory-mapped residency.

    The shard is reopened (the old mapping dropped) whenever the bytes read through the current
    mapping would pass ``mapped_bytes``; small blocks share one mapping.
    """

    def __init__(self, path: Path, name: str, n_cols: int, row_bytes: int, mapped_bytes: int) -> None:
        self._path, self._name, self._n_cols = str(path), name, n_cols
        self._row_bytes, self._mapped_bytes = row_bytes, mapped_bytes
        self._fh = None
        self._touched = 0

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` in the stored dtype, (stop - start, n_cols)."""
        nbytes = (stop - start) * self._row_bytes
        if self._fh is None or self._touched + nbytes > self._mapped_bytes:
            self._fh = None  # drop the old mapping (and its resident pages) first
            self._fh = safe_open(self._path, framework="pt")
            self._touched = 0
        self._touched += nbytes
        try:
            return _read_rows(self._fh, self._name, start, stop, self._n_cols)
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"cannot read rows {start}:{stop} of {self._name} ({exc}); reopen the model or "
                             "re-download it.") from exc

    def close(self) -> None:
        self._fh = None


def row_reader(source: ModelSource, name: str, mapped_bytes: int = DEFAULT_BLOCK_BYTES) -> RowReader:
    """A :class:`RowReader` of tensor ``name`` of ``source`` (its 2-D view), remapping every ``mapped_bytes``."""
    info = source.info(name)
    _, n = matrix_shape(info.shape)
    row_bytes = n * STORED_ITEMSIZE.get(info.dtype, 8)
    return RowReader(source.path / info.file, name, n, row_bytes, max(int(mapped_bytes), row_bytes, MIN_MAPPED_BYTES))


def iter_row_blocks(source: ModelSource, name: str, block_bytes: int = DEFAULT_BLOCK_BYTES,
                    itemsize: int = 4) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, rows)`` blocks of the 2-D view of ``name`` in the stored dtype, read in order.

    ``block_bytes`` bounds one block counted at ``itemsize`` bytes per element (the dtype the caller
    converts the block to: 4 for float32).
    """
    info = source.info(name)
    m, n = matrix_shape(info.shape)
    rows = rows_per_block(n, itemsize, block_bytes)
    reader = row_reader(source, name, block_bytes)
    try:
        for a in range(0, m, rows):
            b = min(m, a + rows)
            yield a, b, reader.read(a, b)
    finally:
        reader.close()


def read_stored(source: ModelSource, name: str, window_bytes: int = DEFAULT_BLOCK_BYTES,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole tensor in its STORED dtype (or ``dtype``) and shape, read block by block into one
    preallocated tensor, each block converted on the way.

    Peak memory is the tensor plus one mapped window (``window_bytes``), not twice the tensor as
    ``ModelSource.read`` (whose mapping keeps every page resident until the shard is closed), nor the
    stored copy beside the converted one.
    """
    info = source.info(name)
    m, n = matrix_shape(info.shape)
    itemsize = STORED_ITEMSIZE.get(info.dtype, 8) if dtype is None else torch.empty((), dtype=dtype).element_size()
    out: torch.Tensor | None = None
    for a, b, block in iter_row_blocks(source, name, window_bytes, itemsize):
        if out is None:
            out = torch.empty(m, n, dtype=block.dtype if dtype is None else dtype)
        out[a:b] = block
        del block
    if out is None:  # an empty tensor
        return source.read(name, dtype=dtype)
    return out.reshape(info.shape)
