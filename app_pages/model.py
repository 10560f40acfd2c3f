"""Model page: architecture summary, where the parameters live, searchable tensor table."""
from __future__ import annotations

import streamlit as st

import app_state
from sahc_core.io.prequant import model_grids, summary as prequant_summary
from sahc_core.errors import SahcError
from sahc_core.figures.format import MISSING, component_label, fmt_params, fmt_pct, is_missing
from sahc_core.figures.model import shares_bar, shares_treemap
from sahc_core.io.components import component_shares, is_known_architecture, tensor_table
from sahc_core.io.dtypes import is_analysed

st.title("Model")
source = app_state.current_source()
if source is None:
    st.stop()


@st.cache_data(show_spinner="Reading the tensor headers…")
def _table(fingerprint: str, _source):
    return tensor_table(_source)


try:
    table = _table(source.fingerprint, source)
except SahcError as exc:
    app_state.show_error(exc)
    st.stop()
shares = component_shares(table)


@st.cache_data(show_spinner="Checking for pre-quantized grids (a sample of rows per tensor, once)…")
def _grids(fingerprint: str, _source) -> dict:
    return model_grids(_source, cache=app_state.current_cache())



if app_state.is_default_model():
    from sahc_core.io.default_model import DEFAULT_MODEL_NOTE

    st.info(DEFAULT_MODEL_NOTE)
if not is_known_architecture(source.architecture):
    st.warning(f"Unknown architecture `{source.architecture}`: components are guessed from tensor names.")
if non_float := sorted({d for d in table["dtype"] if not is_analysed(d)}):
    st.warning(f"Some tensors are stored as {', '.join(non_float)}, not as floats: they are listed but never "
               "analysed or compressed (a plan on this model is refused).")

grids = _grids(source.fingerprint, source)
if pre := prequant_summary(grids):
    st.warning(f"{pre['n_prequantized']:,} of {pre['n_total']:,} tensors already lie on a low-bit grid (most: "
               f"{pre['bits']}-bit in blocks of {pre['block']}): this model was dequantized from a low-bit format. "
               "Low-bit errors measured on it understate those of the original weights, and a setting that "
               "reproduces the grid shows an error of about 0 (the What-if page flags it).",
               icon=":material/grid_on:")

total = int(table["params"].sum())
emb = shares.set_index("component")["share"].get("embedding", 0.0)
c1, c2, c3, c4 = st.columns(4)
c1.metric("Architecture", source.architecture)
c2.metric("Parameters", fmt_params(total), help=f"{total:,} parameters; tied weights are counted once.")
c3.metric("Tensors", f"{len(table):,}")
c4.metric("Embedding / LM head share", f"{emb:.1%}", help="Tied weights are counted once.")
st.caption(f"`{source.path}` · fingerprint `{source.fingerprint[:16]}` · "
           f"tied embeddings: {'yes' if source.tied_embeddings else 'no'}")
if emb > 0.15:
    st.warning(f"The embedding / LM head holds {fmt_pct(emb)} of the parameters: whatever the rest achieves, "
               "this share bounds the total ratio (the 'embedding wall', see the Budget page).")

left, right = st.columns([2, 1])
left.subheader("Where the parameters live")
left.plotly_chart(shares_treemap(table), width="stretch", key="model_treemap")
right.subheader("Component shares")
right.plotly_chart(shares_bar(shares), width="stretch", key="model_shares")
with right:
    app_state.show_table(shares, ["component", "params", "share", "n_tensors"])

st.subheader("Tensors")
query = st.text_input("Filter by name (substring)", key="model_filter")
comps = st.multiselect("Components", sorted(table["component"].unique()), key="model_components",
                       format_func=component_label)
view = table
if query:
    view = view[view["name"].str.contains(query, case=False, regex=False)]
if comps:
    view = view[view["component"].isin(comps)]
if view.empty:
    st.info("No tensor matches this filter: clear the name filter or the component choice.")
else:
    shown = view.assign(shape=view["shape"].map(lambda s: " × ".join(map(str, s))),
                        component=view["component"].map(component_label),
                        layer=view["layer"].map(lambda v: MISSING if is_missing(v) else str(int(v))),
                        grid=view["name"].map(lambda n: f"{grids[n]['bits']}-bit / {grids[n]['block']}"
                                              if grids.get(n) else MISSING))
    st.dataframe(shown[["name", "shape", "dtype", "component", "kind", "layer", "params", "grid"]], hide_index=True,
                 width="stretch", height=420, column_config={  # numbers stay numbers here: the table sorts
                     "name": "Tensor", "shape": "Shape", "dtype": "Dtype", "component": "Component", "kind": "Kind",
                     "layer": "Layer", "params": st.column_config.NumberColumn("Parameters", format="localized"),
                     "grid": st.column_config.TextColumn("Pre-quantized grid", help="bits / block size of a low-bit "
                                                         "grid the values already lie on")})
st.download_button("Download tensor table (CSV)", view.to_csv(index=False), "tensors.csv", "text/csv",
                   key="model_download")
