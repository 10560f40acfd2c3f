"""Budget page widget groups: one component's method and parameters, loading a saved or uploaded plan.

:func:`component_ui` returns the component's plan-JSON config; :func:`load_ui` copies a plan into the
widget state (in a callback, before the widgets are drawn), so the page then shows the loaded plan.
"""
from __future__ import annotations

import streamlit as st

import app_state
import app_widgets
from sahc_core.errors import SahcError
from sahc_core.figures.budget import fallback_name
from sahc_core.methods import registry
from sahc_core.plans.plan import CompressionPlan, load_plans

#: First view: int4 with groups of 64 everywhere, norms and other 1-D tensors kept.
START = {"norm_other": {"method": "keep"}}
START_DEFAULT = {"method": "int", "bits": 4, "group_size": 64}


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


def _set_widgets(plan: CompressionPlan, comps: list[str]) -> None:
    """Copy a plan into the widget state (runs in a callback, before the widgets are drawn)."""
    d = plan.to_dict()
    st.session_state["budget_name"] = plan.name
    st.session_state["budget_overrides"] = d["overrides"]
    st.session_state["budget_fallback"] = fallback_name(d)
    for comp in comps:
        cfg = d["components"].get(comp) or d["default"] or {"method": "keep"}
        st.session_state[f"budget_{comp}_method"] = registry.get(cfg["method"]).title
        app_widgets.set_config_widgets(f"budget_{comp}", cfg)


def _load(source_kind: str, comps: list[str], cache) -> None:
    try:
        if source_kind == "cache":
            _set_widgets(load_plans(cache)[st.session_state["budget_pick"]], comps)
        elif st.session_state.get("budget_upload") is not None:
            _set_widgets(CompressionPlan.from_json_text(st.session_state["budget_upload"].getvalue()), comps)
    except (SahcError, ValueError, KeyError) as exc:
        st.session_state["budget_load_error"] = str(exc)


def load_ui(cache, comps: list[str]) -> None:
    """A saved plan (button) or an uploaded plan JSON, copied into the widgets of ``comps``."""
    try:
        saved = list(load_plans(cache)) if cache is not None else []
    except SahcError as exc:  # a saved plan that no longer parses: say which, keep the page usable
        app_state.show_error(exc)
        saved = []
    l1, l2 = st.columns(2)
    l1.selectbox("Saved plans", saved, key="budget_pick")
    l1.button("Load saved plan", on_click=_load, args=("cache", comps, cache), disabled=not saved, key="budget_load")
    l2.file_uploader("Plan JSON", type="json", key="budget_upload", on_change=_load, args=("upload", comps, cache))
    if err := st.session_state.pop("budget_load_error", None):
        st.error(err)
