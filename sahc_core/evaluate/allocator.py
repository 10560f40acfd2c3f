"""Opt-in allocator tuning for long evaluation loops (CLI and background-job entry points only).

The library never calls this on its own: importing or calling ``sahc_core`` leaves the process's
allocator as it is. ``python -m sahc_core ppl`` and ``run`` wrap their work in
:func:`retain_freed_memory`.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: glibc ``mallopt`` parameters (``<malloc.h>``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX), where its dynamic
#: adjustment ends up after large blocks are freed; the trim threshold then follows at twice it.
_MMAP_MAX = 32 * 2**20


def _glibc() -> Any | None:
    """The C library through ctypes when it is glibc (``mallopt`` / ``malloc_trim``), else None."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def retain_freed_memory() -> Iterator[None]:
    """While the block runs, glibc keeps freed memory in the process instead of returning it.

    Why: every window allocates and frees the same ~1 GB of activations (blocks of 4-13 MB for
    SmolLM2 at 2048 tokens); by default glibc gives them back to the OS (``mmap`` above a threshold,
    heap trimming below) and the next window faults them in again: 180k-480k minor page faults per
    window, 5-10 % of its time on 2 cores, 0 with these settings. PyTorch's CPU performance guide
    suggests preloading jemalloc/tcmalloc for the same reason; this is the in-process equivalent,
    scoped to one call. Afterwards the retained memory is released (``malloc_trim``) and the
    thresholds are left where glibc's own dynamic adjustment takes them once a process has freed
    blocks this large (mmap 32 MiB, trim 64 MiB): an explicit ``mallopt`` turns that adjustment off
    for good, and its 128 KiB start values would make every later allocation above 128 KiB an mmap
    (measured: the transformers-guide loop then ran 30 % slower in the same process).
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    try:
        yield
    finally:
        libc.malloc_trim(0)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_MAX)
