"""Shared Streamlit state for every page: the selected model, the cache, error display.

Pages import from here; `sahc_core` never imports Streamlit. Heavy objects are cached with
``st.cache_resource`` keyed by the resolved path, so switching pages costs nothing.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from sahc_core.errors import SahcError

DEFAULT_LABEL = "(embedded default: SmolLM2-135M-Instruct)"


@st.cache_resource(show_spinner="Converting the embedded default model once (about a minute)…")
def _default_model_dir() -> str:
    from sahc_core.io.default_model import default_model_dir

    return str(default_model_dir())


@st.cache_resource(show_spinner=False, max_entries=4)
def _open_source(path: str, mtime_key: float):
    from sahc_core.io.source import ModelSource

    return ModelSource.open(path)


def _dir_mtime(path: str) -> float:
    p = Path(path)
    try:
        return max((f.stat().st_mtime for f in p.iterdir()), default=p.stat().st_mtime)
    except OSError:
        return 0.0


def model_dir() -> str:
    """The selected model directory (the embedded default unless the user typed a path)."""
    chosen = st.session_state.get("model_path", "").strip()
    return str(Path(chosen).expanduser().resolve()) if chosen else _default_model_dir()


def is_default_model() -> bool:
    return not st.session_state.get("model_path", "").strip()


def current_source():
    """The open ``ModelSource``, or ``None`` after showing a clear ``st.error``."""
    try:
        path = model_dir()
        return _open_source(path, _dir_mtime(path))
    except SahcError as exc:
        st.error(str(exc))
        return None


@st.cache_resource(show_spinner=False)
def _cache(path: str | None):
    from sahc_core.cache import Cache

    return Cache(path)


def current_cache():
    """The DuckDB cache, or ``None`` after a clear ``st.error`` (corrupt or read-only file)."""
    from sahc_core.cache import default_cache_path

    try:
        return _cache(str(default_cache_path()))
    except SahcError as exc:
        st.error(str(exc))
        return None


def show_error(exc: Exception) -> None:
    """One-line message for a user-facing failure; never a traceback."""
    st.error(str(exc))


@st.cache_resource(show_spinner=False)
def _workspace():
    from sahc_core.workspace import Workspace

    return Workspace()  # one per server: its caches are bounded in bytes and guarded by locks


def current_workspace():
    """The app's workspace (in-process caches, the loaded model), shared by every session."""
    return _workspace()


def calibration_ui(source, cache, key: str):
    """A checkbox for calibration statistics; returns them (captured once, then read from disk) or None.

    The statistics (each linear layer's XᵀX on the calibration text, a fitting and a held-out split)
    are what GPTQ and whitened SVD need, and they give every method an output error on held-out tokens.
    """
    if cache is None:
        return None
    on = st.checkbox("Use calibration statistics (XᵀX of every layer's inputs; captured once, about a minute "
                     "on the default model, then read from the cache)", key=key)
    if not on:
        return None
    from sahc_core.calib.store import calibration_stats

    bar = st.progress(0.0, text="Calibration statistics…")
    try:
        stats = current_workspace().calibration(
            (source.fingerprint, str(cache.path)),
            lambda: calibration_stats(source, cache, progress=lambda d, t: bar.progress(d / t, text=f"layer {d}/{t}")))
    except SahcError as exc:
        st.error(str(exc))
        return None
    finally:
        bar.empty()
    st.caption(f"Calibration: {stats.meta['tokens']:,} fitting + {stats.meta['heldout_tokens']:,} held-out tokens.")
    return stats


def gate_badges(gates: list[dict]) -> None:
    """One badge per gate decision: value against threshold, green pass / red fail."""
    for g in gates:
        thr = "" if g["threshold"] is None else f" (threshold {g['threshold']:g})"
        value = "n/a" if g["value"] is None else f"{g['value']:.4g}"
        st.badge(f"{g['gate']}: {value}{thr}", icon=":material/check:" if g["passed"] else ":material/close:",
                 color="green" if g["passed"] else "red")


def prequantized_note(source, name: str, measured: dict) -> None:
    """Say so when the tensor's values already lie on a low-bit grid (the error may be an artifact)."""
    note = measured.get("prequantized_note")
    if note:
        (st.warning if measured.get("prequantized_artifact") else st.info)(note[0].upper() + note[1:] + ".",
                                                                          icon=":material/grid_on:")
