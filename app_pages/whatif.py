"""What-if page: any registered method's parameters on one real tensor; ratio, error, cosine, gates."""
from __future__ import annotations

import pandas as pd
import streamlit as st

import app_state
import app_widgets
from sahc_core.errors import SahcError
from sahc_core.figures.whatif import METRICS, pareto_figure, tt_sweep_figure
from sahc_core.io.components import tensor_table
from sahc_core.whatif import measure as whatif
from sahc_core.whatif import sweeps

st.title("What-if")
source = app_state.current_source()
cache = app_state.current_cache()
if source is None:
    st.stop()
workspace = app_state.current_workspace()


@st.cache_data(show_spinner=False)
def _matrices(fingerprint: str, _source) -> pd.DataFrame:
    t = tensor_table(_source)
    return t[t["shape"].map(len) >= 2].reset_index(drop=True)


def tensor_ui(table: pd.DataFrame) -> tuple[str, tuple[int, ...], str]:
    c1, c2 = st.columns([1, 3])
    comp = c1.selectbox("Component", sorted(table["component"].unique()), key="wi_component")
    rows = table[table["component"] == comp]
    name = c2.selectbox("Tensor", rows["name"].tolist(), key="wi_tensor")
    return name, tuple(rows.set_index("name").at[name, "shape"]), comp


def method_ui(shape: tuple[int, ...], comp: str, calib) -> object:
    """Method radio (every registered method that may take this tensor) and its widgets."""
    offered = app_widgets.offered_methods(comp, shape, with_calibration=calib is not None)
    titles = {m.title: m for m in offered}
    spec = titles[st.radio("Method", list(titles), horizontal=True, key="wi_method",
                           help="Every registered method that may take this tensor (component and shape).")]
    return app_widgets.config_ui(spec, "wi", shape, scope="tensor")


try:
    name, shape, comp = tensor_ui(_matrices(source.fingerprint, source))
    calib = app_state.calibration_ui(source, cache, key="wi_calib")
    cfg = method_ui(shape, comp, calib)
    fitted, fit_note = whatif.fit(source, name, cfg)
    proj = whatif.projected(shape, fitted)
except (SahcError, ValueError) as exc:
    app_state.show_error(exc)
    st.stop()

p1, p2, p3 = st.columns(3)
p1.metric("Projected ratio vs 16-bit", f"{proj['ratio']:.2f}x")
p2.metric("Bits per weight", f"{proj['bits_per_weight']:.3f}")
p3.metric("Stored bytes", f"{proj['bytes']:,}", help=f"16-bit original: {proj['original_bytes']:,} bytes")
if fit_note:
    st.info(f"Adapted to this tensor: {fit_note['note']}.")

try:
    with st.spinner("Measuring on the real weights (the SVD of a tensor runs once)…"):
        meas = whatif.measure_tensor(source, name, cfg, cache=cache, workspace=workspace, calib=calib)
except (SahcError, ValueError) as exc:
    app_state.show_error(exc)
    st.stop()
m1, m2, m3, m4 = st.columns(4)
m1.metric("Relative error ‖W−Ŵ‖/‖W‖", f"{meas['rel_error']:.4f}")
m2.metric("Weight cosine (mean per row)", f"{meas['weight_cosine']:.4f}")
if "output_error" in meas:
    m3.metric("Output error ‖X(W−Ŵ)ᵀ‖/‖XWᵀ‖", f"{meas['output_error']:.4f}",
              help=f"on {meas.get('output_error_tokens', 0):,} held-out calibration tokens (trace form from XᵀX)")
else:
    m3.caption("Output error: tick 'use calibration statistics' above.")
extra = {k: meas[k] for k in ("eym_error", "trunc_error", "quant_error", "predicted_error") if k in meas}
when = "from the cache" if meas["cached"] else f"measured in {meas['seconds']:.2f} s"
m4.caption(" · ".join(f"{k} {v:.4f}" for k, v in extra.items()) + f"  \n{when}")
app_state.gate_badges(meas["gates"])
app_state.prequantized_note(source, name, meas)

if st.checkbox("Output cosine on real calibration activations (runs the model)", key="wi_outcos"):
    try:
        with st.spinner("Running the model on calibration text…"):
            oc = whatif.output_cosine_for(source, name, cfg, cache=cache, workspace=workspace, calib=calib)
        keys = [k for k in ("output_cosine", "block_output_cosine", "lm_head_output_cosine") if k in oc]
        for col, k in zip(st.columns(len(keys)), keys):
            col.metric(k.replace("_", " "), f"{oc[k]:.4f}")
        st.caption(f"{oc['n_tokens']} calibration tokens" + (f" · block `{oc['block']}`" if "block" in oc else ""))
        app_state.gate_badges(oc["gates"])
    except (SahcError, ValueError) as exc:
        app_state.show_error(exc)

st.subheader("Which method wins at equal bytes?")
pkey = f"wi_pareto::{source.fingerprint}::{name}::{getattr(calib, 'key', None)}"
if st.button("Compute Pareto chart for this tensor", key="wi_pareto_btn"):
    bar = st.progress(0.0, text="Measuring the grid…")
    try:
        st.session_state[pkey] = sweeps.pareto(source, name, cache=cache, workspace=workspace, calib=calib,
                                               progress=lambda i, n: bar.progress(i / n, text=f"{i}/{n} settings"))
    except (SahcError, ValueError) as exc:
        app_state.show_error(exc)
    bar.empty()
if pkey in st.session_state:
    df = st.session_state[pkey]
    shown = [k for k in METRICS if k != "output_error" or df["output_error"].notna().any()]
    metric = st.radio("Y axis", shown, horizontal=True, key="wi_pareto_metric", format_func=METRICS.get)
    st.plotly_chart(pareto_figure(df, current=meas, metric=metric), width="stretch", key="wi_pareto_fig")
    front = df[df["frontier"]].assign(gates=lambda d: d["failed_gates"].map(lambda f: f"fails {f}" if f else "all pass"))
    app_state.show_table(front, ["label", "bytes", "ratio", "bits_per_weight", "rel_error", "output_error",
                                 "weight_cosine", "gates"])

if comp == "embedding":
    st.subheader("Tensor-Train sweep (the study's table)")
    thr = st.number_input("Cosine gate", 0.5, 1.0, 0.95, 0.01, key="wi_tt_thr")
    tkey = f"wi_tt::{source.fingerprint}::{name}::{thr}"
    if st.button("Run TT sweep", key="wi_tt_btn"):
        bar = st.progress(0.0, text="TT sweep…")
        try:
            st.session_state[tkey] = sweeps.tt_sweep(source, name, cos_threshold=thr, cache=cache, workspace=workspace,
                                                     progress=lambda i, n: bar.progress(i / n, text=f"{i}/{n} configs"))
        except (SahcError, ValueError) as exc:
            app_state.show_error(exc)
        bar.empty()
    if tkey in st.session_state:
        tdf = st.session_state[tkey]
        st.plotly_chart(tt_sweep_figure(tdf, thr), width="stretch", key="wi_tt_fig")
        app_state.show_table(tdf, ["tt_ranks", "bytes", "ratio", "bits_per_weight", "cosine", "rel_error", "passed"])
