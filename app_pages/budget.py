"""Budget page: a method per component -> exact projected bytes, ratio, and the embedding wall."""
from __future__ import annotations

import pandas as pd
import streamlit as st

import app_optimize
import app_state
import app_widgets
from sahc_core.errors import SahcError
from sahc_core.figures.budget import FALLBACKS, bytes_breakdown_figure, plan_dict, wall_figure
from sahc_core.io.components import component_shares, tensor_table
from sahc_core.methods import registry
from sahc_core.plans.plan import CompressionPlan, embedding_wall, load_plans, project, save_plan

#: First view: int4 with groups of 64 everywhere, norms and other 1-D tensors kept.
START = {"norm_other": {"method": "keep"}}
START_DEFAULT = {"method": "int", "bits": 4, "group_size": 64}

st.title("Budget")
source = app_state.current_source()
if source is None:
    st.stop()
cache = app_state.current_cache()


@st.cache_data(show_spinner=False)
def _components(fingerprint: str, _source) -> list[str]:
    return component_shares(tensor_table(_source))["component"].tolist()


def _set_widgets(plan: CompressionPlan, comps: list[str]) -> None:
    """Copy a plan into the widget state (runs in a callback, before the widgets are drawn)."""
    d = plan.to_dict()
    st.session_state["budget_name"] = plan.name
    st.session_state["budget_overrides"] = d["overrides"]
    st.session_state["budget_fallback"] = next((k for k, v in FALLBACKS.items() if v and d.get("fallback")
                                                and v.items() <= d["fallback"].items()), "none (adapt, else error)")
    for comp in comps:
        cfg = d["components"].get(comp) or d["default"] or {"method": "keep"}
        st.session_state[f"budget_{comp}_method"] = registry.get(cfg["method"]).title
        app_widgets.set_config_widgets(f"budget_{comp}", cfg)


def _load(source_kind: str, comps: list[str]) -> None:
    try:
        if source_kind == "cache":
            _set_widgets(load_plans(cache)[st.session_state["budget_pick"]], comps)
        elif st.session_state.get("budget_upload") is not None:
            _set_widgets(CompressionPlan.from_json_text(st.session_state["budget_upload"].getvalue()), comps)
    except (SahcError, ValueError, KeyError) as exc:
        st.session_state["budget_load_error"] = str(exc)


def component_ui(comp: str) -> dict:
    """The method and parameter widgets of one component; returns its plan-JSON config."""
    offered = app_widgets.offered_methods(comp, None, with_calibration=True)
    titles = {m.title: m for m in offered}
    start = START.get(comp, START_DEFAULT)
    if f"budget_{comp}_method" not in st.session_state:
        st.session_state[f"budget_{comp}_method"] = registry.get(start["method"]).title
        app_widgets.set_config_widgets(f"budget_{comp}", start)
    left, right = st.columns([1, 4])
    spec = titles[left.selectbox(comp, list(titles), key=f"budget_{comp}_method")]
    with right:
        cfg = app_widgets.config_ui(spec, f"budget_{comp}", None, scope="plan", compact=True, columns=5)
    return registry.config_to_dict(cfg)


try:
    comps = _components(source.fingerprint, source)
except SahcError as exc:
    app_state.show_error(exc)
    st.stop()

with st.expander("Load a plan"):
    try:
        saved = list(load_plans(cache)) if cache is not None else []
    except SahcError as exc:  # a saved plan that no longer parses: say which, keep the page usable
        app_state.show_error(exc)
        saved = []
    l1, l2 = st.columns(2)
    l1.selectbox("Saved plans", saved, key="budget_pick")
    l1.button("Load saved plan", on_click=_load, args=("cache", comps), disabled=not saved, key="budget_load")
    l2.file_uploader("Plan JSON", type="json", key="budget_upload", on_change=_load, args=("upload", comps))
    if err := st.session_state.pop("budget_load_error", None):
        st.error(err)

st.subheader("Method per component")
try:
    choices = {comp: component_ui(comp) for comp in comps}
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
    app_state.show_table(pd.DataFrame([{"pattern": o["pattern"], "setting": registry.label(registry.config_from_dict(
        {k: v for k, v in o.items() if k != "pattern"}))} for o in overrides]))

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
if result["n_fallback"]:
    fb = result["tensors"][result["tensors"]["fallback_reason"].notna()]
    st.warning(f"{len(fb)} tensor(s) took a fallback or an adapted setting, e.g. {fb.iloc[0]['name']}: "
               f"{fb.iloc[0]['fallback_reason']}.")

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
    tensors = result["tensors"]
    app_state.show_table(tensors.assign(setting=[registry.label(registry.config_from_dict(c)) if c else "tied"
                                                 for c in tensors["config"]]),
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
