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


def prequantized_note(source, name: str, measured: dict) -> None:
    """Say so when the tensor's values already lie on a low-bit grid (the error may be an artifact)."""
    note = measured.get("prequantized_note")
    if note:
        (st.warning if measured.get("prequantized_artifact") else st.info)(note[0].upper() + note[1:] + ".",
                                                                          icon=":material/grid_on:")


# -- shared presentation: tables, gate badges, the busy indicator ----------------------------------------
#: A fixed "Working…" pill while any script run (page or fragment) takes longer than 0.6 s: Streamlit's own
#: status widget is not shown in this layout, and presentation mode hides the header. Keyed on the run
#: state attribute the Streamlit frontend keeps on its root element.
BUSY_CSS = """<style>
[data-testid="stApp"][data-test-script-state="running"]::before {
  content: "Working…"; position: fixed; top: 10px; right: 18px; z-index: 1000000; pointer-events: none;
  width: 124px; box-sizing: border-box; text-align: right; padding: 4px 14px 4px 30px; border-radius: 999px;
  background: #ff4b4b; color: #fff;
  font: 600 15px/1.6 "Source Sans Pro", sans-serif; box-shadow: 0 1px 4px rgba(0,0,0,.25);
  opacity: 0; animation: sahc-busy-in .2s ease-in .6s forwards;
}
[data-testid="stApp"][data-test-script-state="running"]::after {
  content: ""; position: fixed; top: 17px; right: 116px; z-index: 1000001; pointer-events: none;
  width: 10px; height: 10px; border: 2px solid rgba(255,255,255,.45); border-top-color: #fff;
  border-radius: 50%; opacity: 0; transform-origin: center;
  animation: sahc-busy-in .2s ease-in .6s forwards, sahc-spin .8s linear infinite;
}
@keyframes sahc-busy-in { to { opacity: 1; } }
@keyframes sahc-spin { to { transform: rotate(360deg); } }
</style>"""

#: Badge colour per verdict (``sahc_core.gates.gate_verdict``): a weak pass is grey, never green.
GATE_COLORS = {"pass": "green", "weak pass": "gray", "fail": "red"}
_GATE_ICONS = {"pass": ":material/check:", "weak pass": ":material/remove:", "fail": ":material/close:"}


def busy_indicator() -> None:
    """Inject :data:`BUSY_CSS` (the router calls this once per run, so every page has it)."""
    st.markdown(BUSY_CSS, unsafe_allow_html=True)


def show_table(df, columns=None, **kwargs) -> None:
    """A result table as a reader sees it (``sahc_core.figures.format.display_table``)."""
    from sahc_core.figures.format import display_table

    st.dataframe(display_table(df, columns), hide_index=True, width="stretch", **kwargs)


def _gate_value(v, op: str) -> str:
    from sahc_core.figures.format import is_missing

    if is_missing(v):
        return "n/a"
    v = float(v)
    if v != v or abs(v) == float("inf"):
        return "∞" if v > 0 else ("−∞" if v < 0 else "NaN")
    return f"{v:.0%}" if op == "= all" else f"{v:.4g}"


def gate_line(row) -> str:
    """One gate (a ``gates.gate_summary`` row) as badge markdown: label, kind, value vs threshold, why."""
    n, failed = int(row["n"]), int(row["n_failed"])
    value = _gate_value(row["worst"], row["op"])
    if row["op"] == "finite":
        test = f"{value} is finite" if failed == 0 else f"{value} is not finite"
    elif row["op"] == "= all":
        test = f"{value} of tensors"
    elif row["op"] == "within":  # two-sided: measured / predicted in [1/f, f]
        f = _gate_value(row["threshold"], row["op"])
        test = f"{'worst ' if n > 1 else ''}{value} {'in' if failed == 0 else 'outside'} [1/{f}, {f}]"
    else:
        test = f"{'worst ' if n > 1 else ''}{value} {row['op'] if failed == 0 else 'vs ' + row['op']} " \
               f"{_gate_value(row['threshold'], row['op'])}"
    count = "" if n == 1 else (f"{failed:,} of {n:,} fail · " if failed else f"{n:,} pass · ")
    verdict = row["verdict"]
    badge = f":{GATE_COLORS[verdict]}-badge[{_GATE_ICONS[verdict]} {row['label']} · {row['kind']}]"
    tail = " (a pass only rules out a broken result)" if verdict == "weak pass" else ""
    return f"{badge} {count}{test}{tail} — {row['why']}"


def gate_badges(gates) -> None:
    """Every gate of ``gates`` (decisions: dicts or an audit-log frame) as one badge line per gate name.

    Colours: red = failed, green = a meaningful pass, grey = a pass of a gate that only rules out
    a broken result (``sahc_core.gates.GATE_INFO``). Used by every page that shows gates.
    """
    from sahc_core.gates import gate_summary

    summary = gate_summary(gates)
    for _, row in summary.iterrows():
        st.markdown(gate_line(row))
