"""Spectrum page: singular values, rank-vs-error curves and layer heatmaps of one model's weights."""
from __future__ import annotations

import pandas as pd
import streamlit as st
import torch

import app_state
from sahc_core.errors import NumericalError, SahcError
from sahc_core.figures.spectrum import (STABLE_RANK, energy_figure, layer_heatmap, output_rank_figure,
                                        rank_error_figure, sigma_figure)
from sahc_core.spectra.scan import cached_scan, failed, matrix_table, results_frame, scan, scan_status
from sahc_core.spectra.spectrum import tensor_spectrum

MODES = ("This tensor", "All projections of this layer", "This projection across layers")
STAT_COLUMNS = ["name", "shape", "sigma_max", "sigma_min", "condition_number", "stable_rank", "effective_rank",
                "min_rank_0.1", "min_rank_frac_0.1", "min_rank_0.05", "min_rank_0.01", "n_outside_mp", "cached",
                "seconds"]
NO_LAYER = "—"

st.title("Spectrum")
source = app_state.current_source()
cache = app_state.current_cache()
if source is None:
    st.stop()


def _short(name: str) -> str:
    return name.removeprefix("model.").removesuffix(".weight")


def selection_ui(table: pd.DataFrame) -> tuple[str, list[str], str, list[int] | None]:
    """Component -> layer -> tensor, a mode (tensor / layer / kind across layers), extra overlays.

    Returns the component, the tensors to show, the device, and their layer indices in the
    across-layers mode (the figures then colour by depth), else None.
    """
    c1, c2, c3, c4 = st.columns([2, 1, 3, 1])
    component = c1.selectbox("Component", sorted(table["component"].unique()), key="sp_component")
    comp = table[table["component"] == component]
    layers = sorted(int(v) for v in comp["layer"].dropna().unique()) + ([NO_LAYER] if comp["layer"].isna().any() else [])
    layer = c2.selectbox("Layer", layers, key="sp_layer")
    here = comp[comp["layer"].isna()] if layer == NO_LAYER else comp[comp["layer"] == layer]
    name = c3.selectbox("Tensor", here["name"].tolist(), format_func=_short, key="sp_tensor")
    devices = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    device = c4.selectbox("Device", devices, key="sp_device")
    mode = st.radio("Show", MODES, horizontal=True, key="sp_mode")
    kind = comp.set_index("name")["kind"].get(name)
    if mode == MODES[1]:
        names = here["name"].tolist()
    elif mode == MODES[2]:
        names = comp[comp["kind"] == kind].sort_values("layer")["name"].tolist()
    else:
        names = [name]
    extra = st.multiselect("Overlay more tensors", [n for n in table["name"] if n not in names],
                           format_func=_short, key="sp_extra")
    depth = table.set_index("name")["layer"].reindex(names + extra)
    layers = [int(v) for v in depth] if mode == MODES[2] and depth.notna().all() else None
    return component, names + extra, device, layers


def compute(names: list[str], device: str) -> list:
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


def scan_status_ui(component: str | None, device: str) -> None:
    """Which tensors the (cached) scan has done, and the ETA of the rest from the measured time per shape."""
    status = scan_status(source, cache, component, device)
    eta = status["eta_seconds"]
    eta_txt = "" if not status["todo"] else (" · ETA unknown until a tensor is timed on this device" if eta is None
                                             else f" · ETA {eta / 60:.1f} min")
    st.caption(f"Scan: {status['done']}/{status['total']} tensors done{eta_txt}")
    if status["todo"] and status["done"]:
        with st.expander("Scan progress by shape"):
            st.dataframe(pd.DataFrame(status["shapes"]), hide_index=True, width="stretch")


def scan_ui(component: str, device: str) -> pd.DataFrame:
    """Scan button (component or whole model) with progress; returns the scanned rows so far."""
    scope = st.radio("Scope", ("This component", "Whole model"), horizontal=True, key="sp_scope")
    comp_arg = component if scope == "This component" else None
    scan_status_ui(comp_arg, device)
    if st.button(f"Scan {'component' if comp_arg else 'model'}", key="sp_scan"):
        bar = st.progress(0.0, text="Scanning…")

        def tick(done: int, total: int, name: str, eta: float | None) -> None:
            eta_txt = f" · ETA {eta:.0f} s" if eta is not None else ""
            bar.progress(done / total, text=f"{done}/{total} tensors · {_short(name)}{eta_txt}")

        df = scan(source, component=comp_arg, cache=cache, device=device, progress=tick)
        st.session_state["sp_scan_df"] = df
        bar.empty()
    if cache is not None:
        return cached_scan(source, cache, comp_arg)
    df = st.session_state.get("sp_scan_df", pd.DataFrame())
    return df[df["component"] == comp_arg] if comp_arg and not df.empty else df


try:
    table = matrix_table(source)
    component, names, device, layers = selection_ui(table)
    results = compute(names, device)
except (SahcError, ValueError) as exc:
    app_state.show_error(exc)
    st.stop()
if not results:
    st.stop()

n_cached = sum(r.cached for r in results)
devices = sorted({r.device for r in results})
st.caption(f"Device: **{', '.join(devices)}** · {len(results)} tensor(s) in {sum(r.seconds for r in results):.3f} s "
           f"({n_cached} from cache; computing took {sum(r.compute_seconds for r in results):.2f} s)")
for r in results:
    if r.note:
        st.caption(f"`{_short(r.tensor)}`: {r.note}")

left, right = st.columns(2)
left.plotly_chart(sigma_figure(results, layers=layers), width="stretch", key="sp_fig_sigma")
right.plotly_chart(sigma_figure(results, normalized=True, layers=layers), width="stretch", key="sp_fig_norm")
left.plotly_chart(rank_error_figure(results, layers=layers), width="stretch", key="sp_fig_err")
right.plotly_chart(energy_figure(results, layers=layers), width="stretch", key="sp_fig_energy")

st.subheader("Low-rank where the data lives?")
calib = app_state.calibration_ui(source, cache, key="sp_calib")
if calib is not None:
    from sahc_core.spectra.whitened import output_rank_curve

    try:
        curves = [output_rank_curve(source, r.tensor, calib, cache=cache) for r in results
                  if calib.for_weight(r.tensor) is not None]
    except (SahcError, ValueError) as exc:
        app_state.show_error(exc)
        curves = []
    if curves:
        st.plotly_chart(output_rank_figure(curves), width="stretch", key="sp_fig_output")
        st.dataframe(pd.DataFrame([{"tensor": _short(c["tensor"]), **{f"weight r@{e}": c["min_rank"][e]
                                                                      for e in c["min_rank"]},
                                    **{f"output r@{e}": c["min_rank_output"][e] for e in c["min_rank_output"]}}
                                   for c in curves]), hide_index=True, width="stretch")
        st.caption(f"Output error on {curves[0]['n_tokens']:,} calibration tokens: the best rank-r output error "
                   "is the EYM curve of W·S with S Sᵀ = XᵀX (SVD-LLM's whitening).")
    else:
        st.info("None of the selected tensors is a linear layer the model runs on calibration text.")
else:
    st.caption("Tick the box to compare each tensor's weight spectrum with its spectrum on real activations.")

st.subheader("Statistics")
stats = results_frame(results)
app_state.show_table(stats, STAT_COLUMNS)
st.download_button("Download all statistics (CSV)", stats.to_csv(index=False), "spectrum_stats.csv", "text/csv",
                   key="sp_download_stats")

st.subheader("Layer heatmaps")
try:
    scanned = scan_ui(component, device)
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
