"""Spectrum page: singular values, rank-vs-error curves and layer heatmaps of one model's weights."""
from __future__ import annotations

import pandas as pd
import streamlit as st

import app_spectrum
import app_state
from sahc_core.device import device_choices
from sahc_core.errors import SahcError
from sahc_core.figures.format import short_name
from sahc_core.figures.spectrum import (STABLE_RANK, energy_figure, layer_heatmap, note_captions, rank_error_figure,
                                        results_caption, sigma_figure)
from sahc_core.spectra.scan import failed, matrix_table, results_frame
from sahc_core.spectra.selection import VIEWS, depths, layer_choices, layer_tensors, shown_tensors

MODES = ("This tensor", "All projections of this layer", "This projection across layers")
STAT_COLUMNS = ["name", "shape", "sigma_max", "sigma_min", "condition_number", "stable_rank", "effective_rank",
                "min_rank_0.1", "min_rank_frac_0.1", "min_rank_0.05", "min_rank_0.01", "n_outside_mp", "cached",
                "seconds"]

st.title("Spectrum")
source = app_state.current_source()
cache = app_state.current_cache()
if source is None:
    st.stop()


def selection_ui(table: pd.DataFrame) -> tuple[str, list[str], str, list[int] | None]:
    """Component -> layer -> tensor, a mode (tensor / layer / kind across layers), extra overlays.

    Returns the component, the tensors to show, the device, and their layer indices in the
    across-layers mode (the figures then colour by depth), else None.
    """
    c1, c2, c3, c4 = st.columns([2, 1, 3, 1])
    component = c1.selectbox("Component", sorted(table["component"].unique()), key="sp_component")
    layer = c2.selectbox("Layer", layer_choices(table, component), key="sp_layer")
    name = c3.selectbox("Tensor", layer_tensors(table, component, layer), format_func=short_name, key="sp_tensor")
    device = c4.selectbox("Device", device_choices(), key="sp_device")
    view = VIEWS[MODES.index(st.radio("Show", MODES, horizontal=True, key="sp_mode"))]
    names = shown_tensors(table, component, layer, name, view)
    extra = st.multiselect("Overlay more tensors", [n for n in table["name"] if n not in names],
                           format_func=short_name, key="sp_extra")
    return component, names + extra, device, depths(table, names + extra) if view == "across" else None


try:
    table = matrix_table(source)
    component, names, device, layers = selection_ui(table)
    results = app_spectrum.compute_ui(source, cache, names, device)
except (SahcError, ValueError) as exc:
    app_state.show_error(exc)
    st.stop()
if not results:
    st.stop()

st.caption(results_caption(results))
for note in note_captions(results):
    st.caption(note)

left, right = st.columns(2)
left.plotly_chart(sigma_figure(results, layers=layers), width="stretch", key="sp_fig_sigma")
right.plotly_chart(sigma_figure(results, normalized=True, layers=layers), width="stretch", key="sp_fig_norm")
left.plotly_chart(rank_error_figure(results, layers=layers), width="stretch", key="sp_fig_err")
right.plotly_chart(energy_figure(results, layers=layers), width="stretch", key="sp_fig_energy")

st.subheader("Low-rank where the data lives?")
app_spectrum.output_rank_ui(source, cache, results)

st.subheader("Statistics")
stats = results_frame(results)
app_state.show_table(stats, STAT_COLUMNS)
st.download_button("Download all statistics (CSV)", stats.to_csv(index=False), "spectrum_stats.csv", "text/csv",
                   key="sp_download_stats")

st.subheader("Layer heatmaps")
try:
    scanned = app_spectrum.scan_ui(source, cache, component, device)
except (SahcError, ValueError) as exc:
    app_state.show_error(exc)
    st.stop()
for rec in failed(scanned).itertuples():
    st.error(f"Not in the heatmaps: {rec.error}")
scanned = scanned[scanned["error"].isna()] if "error" in scanned else scanned
if scanned.empty:
    st.info("No scan yet: press **Scan** above to fill the layer heatmaps (each tensor is cached as it finishes, "
            "so a scan resumes where it stopped).")
else:
    st.caption(f"{len(scanned)} tensor(s) scanned, heatmaps over layer index × projection kind.")
    h1, h2 = st.columns(2)
    h1.plotly_chart(layer_heatmap(scanned, "min_rank_frac_0.1", "Min rank for error 0.10 (% of full rank)",
                                  percent=True), width="stretch", key="sp_heat_rank")
    h2.plotly_chart(layer_heatmap(scanned, "stable_rank", f"Stable rank {STABLE_RANK}"), width="stretch",
                    key="sp_heat_stable")
    st.download_button("Download scan (CSV)", scanned.to_csv(index=False), "spectrum_scan.csv", "text/csv",
                       key="sp_download_scan")
