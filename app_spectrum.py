"""Spectrum page widget groups: spectra with a progress bar, the whole-model scan, the output-rank section.

Each group calls one library entry point (:func:`~sahc_core.spectra.spectrum.tensor_spectrum`,
:func:`~sahc_core.spectra.scan.scan`, :func:`~sahc_core.spectra.whitened.output_rank_curve`) and draws
what it returns; texts and tables come from :mod:`sahc_core.figures.spectrum` and :mod:`sahc_core.spectra.scan`.
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

import app_state
from sahc_core.errors import NumericalError, SahcError
from sahc_core.figures.format import short_name
from sahc_core.figures.spectrum import output_rank_figure, output_rank_table
from sahc_core.spectra import scan as scan_mod
from sahc_core.spectra.spectrum import tensor_spectrum


def compute_ui(source, cache, names: list[str], device: str) -> list:
    """Spectra of the selected tensors (cached in DuckDB), with a progress bar for several; a tensor
    without a spectrum (NaN / Inf / no elements) gets its own st.error and the others are still shown."""
    bar = st.progress(0.0, text="Computing spectra…") if len(names) > 1 else None
    results = []
    with st.spinner(f"Singular values of {len(names)} tensor(s)…"):
        for i, n in enumerate(names):
            try:
                results.append(tensor_spectrum(source, n, cache=cache, device=device))
            except NumericalError as exc:
                app_state.show_error(exc)
            if bar is not None:
                bar.progress((i + 1) / len(names), text=f"{i + 1}/{len(names)} tensors")
    if bar is not None:
        bar.empty()
    return results


def scan_status_ui(source, cache, component: str | None, device: str) -> None:
    """Which tensors the (cached) scan has done, and the ETA of the rest from the measured time per shape."""
    status = scan_mod.scan_status(source, cache, component, device)
    st.caption(scan_mod.scan_status_line(status))
    if status["todo"] and status["done"]:
        with st.expander("Scan progress by shape"):
            st.dataframe(pd.DataFrame(status["shapes"]), hide_index=True, width="stretch")


def scan_ui(source, cache, component: str, device: str) -> pd.DataFrame:
    """Scan button (component or whole model) with progress; returns the scanned rows so far."""
    scope = st.radio("Scope", ("This component", "Whole model"), horizontal=True, key="sp_scope")
    comp_arg = component if scope == "This component" else None
    scan_status_ui(source, cache, comp_arg, device)
    if st.button(f"Scan {'component' if comp_arg else 'model'}", key="sp_scan"):
        bar = st.progress(0.0, text="Scanning…")

        def tick(done: int, total: int, name: str, eta: float | None) -> None:
            eta_txt = f" · ETA {eta:.0f} s" if eta is not None else ""
            bar.progress(done / total, text=f"{done}/{total} tensors · {short_name(name)}{eta_txt}")

        # looked up on the module at call time (a test replaces scan_mod.scan with the cached rows)
        df = scan_mod.scan(source, component=comp_arg, cache=cache, device=device, progress=tick)
        st.session_state["sp_scan_df"] = df
        bar.empty()
    if cache is not None:
        return scan_mod.cached_scan(source, cache, comp_arg)
    df = st.session_state.get("sp_scan_df", pd.DataFrame())
    return df[df["component"] == comp_arg] if comp_arg and not df.empty else df


def output_rank_ui(source, cache, results: list) -> None:
    """With calibration statistics: each tensor's rank-vs-weight-error beside its rank-vs-OUTPUT-error curve."""
    calib = app_state.calibration_ui(source, cache, key="sp_calib")
    if calib is None:
        st.caption("Tick the box to compare each tensor's weight spectrum with its spectrum on real activations.")
        return
    from sahc_core.spectra.whitened import output_rank_curve

    try:
        curves = [output_rank_curve(source, r.tensor, calib, cache=cache) for r in results
                  if calib.for_weight(r.tensor) is not None]
    except (SahcError, ValueError) as exc:
        app_state.show_error(exc)
        curves = []
    if curves:
        st.plotly_chart(output_rank_figure(curves), width="stretch", key="sp_fig_output")
        st.dataframe(output_rank_table(curves), hide_index=True, width="stretch")
        st.caption(f"Output error on {curves[0]['n_tokens']:,} calibration tokens: the best rank-r output error "
                   "is the EYM curve of W·S with S Sᵀ = XᵀX (SVD-LLM's whitening).")
    else:
        st.info("None of the selected tensors is a linear layer the model runs on calibration text.")
