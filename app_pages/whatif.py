"""What-if page: slide bits, group size, rank or TT ranks on one real tensor; ratio, error, cosine, gates."""
from __future__ import annotations

import math

import pandas as pd
import streamlit as st

import app_state
from sahc_core.whatif import sweeps
from sahc_core.whatif import measure as whatif
from sahc_core.io.components import tensor_table
from sahc_core.errors import SahcError
from sahc_core.figures.whatif import pareto_figure, tt_sweep_figure
from sahc_core.methods.lowrank import SVDConfig
from sahc_core.methods.quant import QuantConfig
from sahc_core.methods.tt import TTConfig

METHODS = {"int-k": "int", "SVD + int-k factors": "svd", "Tensor-Train": "tt"}

st.title("What-if")
source = app_state.current_source()
cache = app_state.current_cache()
if source is None:
    st.stop()


@st.cache_data(show_spinner=False)
def _matrices(fingerprint: str, _source) -> pd.DataFrame:
    t = tensor_table(_source)
    return t[t["shape"].map(len) == 2].reset_index(drop=True)


def _groups(n: int) -> list:
    """Group sizes that divide ``n`` (multiples of 16 up to 256), then per row."""
    return [g for g in range(16, 257, 16) if n % g == 0] + ["per row"]


def tensor_ui(table: pd.DataFrame) -> tuple[str, tuple[int, int], str]:
    c1, c2 = st.columns([1, 3])
    comp = c1.selectbox("Component", sorted(table["component"].unique()), key="wi_component")
    rows = table[table["component"] == comp]
    name = c2.selectbox("Tensor", rows["name"].tolist(), key="wi_tensor")
    return name, tuple(rows.set_index("name").at[name, "shape"]), comp


def method_ui(shape: tuple[int, int], comp: str):
    """Method radio and its sliders; returns the config dataclass."""
    offered = [k for k, v in METHODS.items() if v != "tt" or comp == "embedding"]
    method = METHODS[st.radio("Method", offered, horizontal=True, key="wi_method",
                              help="Tensor-Train is offered for the embedding / LM head only.")]
    m, n = shape
    c1, c2, c3 = st.columns(3)
    if method == "int":
        bits = c1.slider("Bits", 2, 8, 4, key="wi_bits")
        opts = _groups(n)
        g = c2.select_slider("Group size", opts, value=max((x for x in opts[:-1] if x <= 128), default="per row"),
                             key=f"wi_group_{n}")
        scheme = c3.radio("Scheme", ["asym", "sym"], horizontal=True, key="wi_scheme")
        return QuantConfig(bits, None if g == "per row" else g, scheme)
    if method == "svd":
        k = min(m, n)
        rank = c1.slider("Rank", 1, k, max(1, k // 4), key=f"wi_rank_{k}")
        fbits = c2.select_slider("Factor bits", [2, 3, 4, 5, 6, 8, "fp16"], value=4, key="wi_fbits")
        opts = _groups(math.gcd(m, n))
        g = c3.select_slider("Factor group size", opts, value=max((x for x in opts[:-1] if x <= 128), default="per row"),
                             key=f"wi_fgroup_{math.gcd(m, n)}")
        return SVDConfig(rank=rank, bits=None if fbits == "fp16" else fbits, group_size=None if g == "per row" else g)
    opts1 = sweeps.tt_rank_options(shape)
    r1 = c1.select_slider("TT rank r1", opts1, value=min(64, opts1[-1]), key=f"wi_r1_{m}_{n}")
    opts2 = sweeps.tt_rank_options(shape, r1)
    r2 = c2.select_slider("TT rank r2", opts2, value=min(r1, opts2[-1]), key=f"wi_r2_{m}_{n}_{r1}")
    tbits = c3.select_slider("Core bits", [4, 6, 8, "fp16"], value="fp16", key="wi_tbits")
    return TTConfig(ranks=(1, r1, r2, 1), bits=None if tbits == "fp16" else tbits)


def badges(gates: list[dict]) -> None:
    for g in gates:
        thr = "" if g["threshold"] is None else f" (threshold {g['threshold']:g})"
        value = "n/a" if g["value"] is None else f"{g['value']:.4g}"
        st.badge(f"{g['gate']}: {value}{thr}", icon=":material/check:" if g["passed"] else ":material/close:",
                 color="green" if g["passed"] else "red")


try:
    name, shape, comp = tensor_ui(_matrices(source.fingerprint, source))
    cfg = method_ui(shape, comp)
    proj = whatif.projected(shape, cfg)
except (SahcError, ValueError) as exc:
    app_state.show_error(exc)
    st.stop()

p1, p2, p3 = st.columns(3)
p1.metric("Projected ratio vs 16-bit", f"{proj['ratio']:.2f}x")
p2.metric("Bits per weight", f"{proj['bits_per_weight']:.3f}")
p3.metric("Stored bytes", f"{proj['bytes']:,}", help=f"16-bit original: {proj['original_bytes']:,} bytes")

try:
    with st.spinner("Measuring on the real weights (the SVD of a tensor runs once)…"):
        meas = whatif.measure_tensor(source, name, cfg, cache=cache)
except (SahcError, ValueError) as exc:
    app_state.show_error(exc)
    st.stop()
m1, m2, m3 = st.columns(3)
m1.metric("Relative error ‖W−Ŵ‖/‖W‖", f"{meas['rel_error']:.4f}")
m2.metric("Weight cosine (mean per row)", f"{meas['weight_cosine']:.4f}")
extra = {k: meas[k] for k in ("eym_error", "trunc_error", "quant_error", "predicted_error") if k in meas}
when = "from the cache" if meas["cached"] else f"measured in {meas['seconds']:.2f} s"
m3.caption(" · ".join(f"{k} {v:.4f}" for k, v in extra.items()) + f"  \n{when}")
badges(meas["gates"])

if st.checkbox("Output cosine on real calibration activations (runs the model)", key="wi_outcos"):
    try:
        with st.spinner("Running the model on calibration text…"):
            oc = whatif.output_cosine_for(source, name, cfg, cache=cache)
        keys = [k for k in ("output_cosine", "block_output_cosine", "lm_head_output_cosine") if k in oc]
        for col, k in zip(st.columns(len(keys)), keys):
            col.metric(k.replace("_", " "), f"{oc[k]:.4f}")
        st.caption(f"{oc['n_tokens']} calibration tokens" + (f" · block `{oc['block']}`" if "block" in oc else ""))
        badges(oc["gates"])
    except (SahcError, ValueError) as exc:
        app_state.show_error(exc)

st.subheader("Which method wins at equal bytes?")
pkey = f"wi_pareto::{source.fingerprint}::{name}"
if st.button("Compute Pareto chart for this tensor", key="wi_pareto_btn"):
    bar = st.progress(0.0, text="Measuring the grid…")
    try:
        st.session_state[pkey] = sweeps.pareto(source, name, cache=cache,
                                               progress=lambda i, n: bar.progress(i / n, text=f"{i}/{n} settings"))
    except (SahcError, ValueError) as exc:
        app_state.show_error(exc)
    bar.empty()
if pkey in st.session_state:
    df = st.session_state[pkey]
    metric = st.radio("Y axis", ["rel_error", "weight_cosine"], horizontal=True, key="wi_pareto_metric")
    st.plotly_chart(pareto_figure(df, current=meas, metric=metric), width="stretch", key="wi_pareto_fig")
    st.dataframe(df[df["frontier"]].drop(columns=["config"]), hide_index=True, width="stretch")

if comp == "embedding":
    st.subheader("Tensor-Train sweep (the study's table)")
    thr = st.number_input("Cosine gate", 0.5, 1.0, 0.95, 0.01, key="wi_tt_thr")
    tkey = f"wi_tt::{source.fingerprint}::{name}::{thr}"
    if st.button("Run TT sweep", key="wi_tt_btn"):
        bar = st.progress(0.0, text="TT sweep…")
        try:
            st.session_state[tkey] = sweeps.tt_sweep(source, name, cos_threshold=thr, cache=cache,
                                                     progress=lambda i, n: bar.progress(i / n, text=f"{i}/{n} configs"))
        except (SahcError, ValueError) as exc:
            app_state.show_error(exc)
        bar.empty()
    if tkey in st.session_state:
        tdf = st.session_state[tkey]
        st.plotly_chart(tt_sweep_figure(tdf, thr), width="stretch", key="wi_tt_fig")
        st.dataframe(tdf, hide_index=True, width="stretch")
