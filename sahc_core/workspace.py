"""A per-session workspace: the in-process caches, the loaded model and its lock, calibration statistics.

What-if measurements must answer a slider move in well under a second, so the expensive parts are
computed once per tensor and kept here: the float32 weight and its row norms, its thin SVD, derived
per-tensor constants (``W Vhᵀ``), recently compressed tensors (a TT decomposition takes seconds),
captured activations, the loaded model. A :class:`Workspace` owns all of them, bounded in **bytes**
(not entries: one 248,320 x 4,096 float32 embedding is 4 GB), with a lock so two browser sessions
sharing one workspace never see each other's half-done state.

Who owns one: the Streamlit app (``st.cache_resource``, one per server), the CLI (one per process).
Library functions take ``workspace=None`` and then use a fresh, private one (nothing is remembered
between calls). Nothing here is module-global.

The model is shared read-only: computations that hook it (activation capture) or run it hold
:meth:`Workspace.model_lock`; no computation writes its weights (a block with Ŵ runs through
``torch.func.functional_call``).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

#: Default byte budget of a workspace's caches (``SAHC_WORKSPACE_BYTES`` overrides it).
DEFAULT_BUDGET_BYTES = 2 * 2**30
ENV_BUDGET = "SAHC_WORKSPACE_BYTES"


def nbytes_of(value: Any) -> int:
    """Bytes held by a cached value: tensors (also inside tuples, lists, dicts and dataclass-like
    objects with ``state()`` or ``__dict__``) count their storage; anything else counts 0."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes_of(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes_of(v) for v in value.values())
    if hasattr(value, "__dict__") or hasattr(value, "__dataclass_fields__"):
        try:
            return sum(nbytes_of(v) for v in vars(value).values())
        except TypeError:
            return 0
    return 0


class ByteLRU:
    """A thread-safe least-recently-used map bounded by the bytes of its values.

    A value larger than the whole budget is not kept (the caller recomputes it next time rather
    than holding more memory than the user allowed).
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}.")
        self.budget = int(budget_bytes)
        self._d: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.used = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            hit = self._d.get(key)
            if hit is None:
                return None
            self._d.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = nbytes_of(value)
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.used -= old[1]
            if size > self.budget:
                return
            self._d[key] = (value, size)
            self.used += size
            while self.used > self.budget and self._d:
                _, (_, s) = self._d.popitem(last=False)
                self.used -= s

    def get_or_make(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The cached value, or ``make()`` (computed outside the lock) stored and returned."""
        hit = self.get(key)
        if hit is None:
            hit = make()
            self.put(key, hit)
        return hit

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.used = 0


class Workspace:
    """Caches, the loaded model and calibration statistics of one app server or CLI process.

    Parameters
    ----------
    budget_bytes : int, optional
        Bytes the tensor caches may hold together (default ``SAHC_WORKSPACE_BYTES`` or 2 GiB); the
        loaded model is not counted (it is one, and needed whole).
    adaptive_threads : bool
        Whether computations may change torch's CPU thread count for their own duration (only an
        entry point that owns the process, the CLI, sets this; a page thread never does, since the
        count is process-wide).
    """

    def __init__(self, budget_bytes: int | None = None, adaptive_threads: bool = False) -> None:
        if budget_bytes is None:
            budget_bytes = int(os.environ.get(ENV_BUDGET, DEFAULT_BUDGET_BYTES))
        self.budget_bytes = int(budget_bytes)
        self.adaptive_threads = bool(adaptive_threads)
        # one byte budget split between the kinds of value (weights and factors are the big ones)
        self.weights = ByteLRU(self.budget_bytes // 4)
        self.factors = ByteLRU(self.budget_bytes // 4)
        self.derived = ByteLRU(self.budget_bytes // 4)
        self.compressed = ByteLRU(self.budget_bytes // 8)
        self.activations = ByteLRU(self.budget_bytes // 8)
        self.model_lock = threading.RLock()
        self._models: dict[Hashable, Any] = {}
        self._calib: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        """Bytes held by the tensor caches now."""
        return sum(c.used for c in (self.weights, self.factors, self.derived, self.compressed, self.activations))

    def model(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The model stored under ``key`` (one at a time: loading another frees the previous one)."""
        with self.model_lock:
            if key not in self._models:
                self._models.clear()
                self._models[key] = load()
            return self._models[key]

    def calibration(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """Calibration statistics stored under ``key`` (lazy objects that read tensors from disk)."""
        with self._lock:
            hit = self._calib.get(key)
        if hit is None:
            hit = load()
            with self._lock:
                self._calib[key] = hit
        return hit

    def clear(self) -> None:
        """Drop every cached value, the model and the statistics."""
        for c in (self.weights, self.factors, self.derived, self.compressed, self.activations):
            c.clear()
        with self.model_lock:
            self._models.clear()
        with self._lock:
            self._calib.clear()
