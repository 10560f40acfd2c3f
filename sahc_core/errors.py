"""User-facing error types: every message is one clear sentence (what is wrong, what to do)."""
from __future__ import annotations


class SahcError(Exception):
    """Base of all errors shown to a user as one line (CLI stderr, ``st.error`` in the UI)."""


class ModelError(SahcError):
    """A model directory, checkpoint file or tensor name that cannot be used."""


class CacheError(SahcError):
    """The DuckDB cache file is corrupt, read-only or locked for too long."""


class PlanError(SahcError):
    """A compression plan that is malformed or leaves tensors uncovered."""


class CorpusError(SahcError):
    """A text corpus that is missing, empty or not text."""


class JobError(SahcError):
    """A background job that cannot be started, found or cancelled."""


class NumericalError(SahcError):
    """A tensor or a result holding NaN / Inf values or no elements, so the number asked for is undefined.

    ``value`` is the offending number when there is one (a perplexity of ``inf`` or ``nan``), so a
    caller can still log it (the audit log keeps non-finite values as measured).
    """

    def __init__(self, message: str, value: float = float("nan")) -> None:
        super().__init__(message)
        self.value = value
