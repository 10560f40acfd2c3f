"""Budget page: a method per component -> exact projected bytes, ratio, and the embedding wall."""
from __future__ import annotations

import pandas as pd
import streamlit as st

import app_budget
import app_optimize
import app_state
from sahc_core.errors import SahcError
from sahc_core.figures.budget import (FALLBACKS, bytes_breakdown_figure, fallback_sentence, overrides_frame, plan_dict,
                                      wall_figure, with_settings)
from sahc_core.io.components import component_shares, tensor_table
from sahc_core.plans.plan import CompressionPlan, embedding_wall, project, save_plan

st.title("Budget")
source = app_state.current_source()
if source is None:
    st.stop()
cache = app_state.current_cache()


@st.cache_data(show_spinner=False)
def _components(fingerprint: str, _source) -> list[str]:
    return component_shares(tensor_table(_source))["component"].tolist()


try:
    comps = _components(source.fingerprint, source)
except SahcError as exc:
    app_state.show_error(exc)
    st.stop()

with st.expander("Load a plan"):
    app_budget.load_ui(cache, comps)

st.subheader("Method per component")
try:
    choices = {comp: app_budget.component_ui(comp) for comp in comps}
except (SahcError, ValueError) as exc:
    app_state.show_error(exc)
    st.stop()
n1, n2 = st.columns(2)
name = n1.text_input("Plan name", "my-plan", key="budget_name")
fallback = n2.selectbox("Tensors a method cannot take", list(FALLBACKS), key="budget_fallback",
                        help="A tensor the chosen setting does not fit takes this config; 'none' lets the method "
                             "adapt itself (e.g. a group size falls back to a divisor of the width, or per row) "
                             "and refuses the plan where nothing fits. Every such tensor is counted.")
overrides = st.session_state.get("budget_overrides", [])
if overrides:
    st.caption("Per-tensor overrides from the loaded plan (first match wins):")
    app_state.show_table(overrides_frame(overrides))

try:
    plan = CompressionPlan.from_dict(plan_dict(name, choices, overrides, FALLBACKS[fallback]))
    result = project(plan, source)
except (SahcError, ValueError) as exc:
    app_state.show_error(exc)
    st.stop()

m = st.columns(4)
m[0].metric("Total ratio (projected)", f"{result['ratio_projected']:.2f}x")
m[1].metric("Compressed", f"{result['bytes_projected'] / 1e6:,.2f} MB")
m[2].metric("Original (16-bit)", f"{result['bytes_original'] / 1e6:,.2f} MB")
m[3].metric("1-D tensors kept / fallbacks", f"{result['n_forced_keep_1d']} / {result['n_fallback']}")
if fallback_note := fallback_sentence(result):
    st.warning(fallback_note)

left, right = st.columns(2)
left.subheader("Where the bytes go")
left.plotly_chart(bytes_breakdown_figure(result), width="stretch", key="budget_fig_bytes")
right.subheader("The embedding wall")
target = right.number_input("Target total ratio", 1.0, 1000.0, 5.0, step=0.5, key="budget_target")
if "embedding" in {c["component"] for c in result["components"]}:
    wall = embedding_wall(result, target)
    if wall["feasible"]:
        right.info(f"The embedding/LM head must reach **{wall['embedding_ratio_needed']:.1f}x** "
                   f"(it now gives {wall['embedding_ratio_now']:.1f}x).")
    else:
        right.warning(wall["message"])
    right.plotly_chart(wall_figure(result, target), width="stretch", key="budget_fig_wall")
else:
    right.info("This model has no embedding component.")

st.subheader("Per component")
app_state.show_table(pd.DataFrame(result["components"]),
                     ["component", "params", "n_tensors", "original_bytes", "bytes", "ratio", "share_of_compressed"])
with st.expander("Per tensor"):
    app_state.show_table(with_settings(result["tensors"]),
                         ["name", "component", "shape", "setting", "rule", "fallback_reason", "orig_bytes", "bytes"])

s1, s2 = st.columns(2)
if s1.button("Save plan to cache", disabled=cache is None, key="budget_save"):
    try:
        save_plan(cache, plan)
        s1.success(f"Saved plan '{plan.name}'.")
    except SahcError as exc:
        app_state.show_error(exc)
s2.download_button("Download plan JSON", plan.to_json(), f"{plan.name}.json", "application/json",
                   key="budget_download")

st.divider()
app_optimize.optimize_section(source, cache, comps)
