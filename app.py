"""SAHC Explorer: a router. Shared sidebar (model picker, device, cache), then st.navigation."""
from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="SAHC Explorer", page_icon=":material/ssid_chart:", layout="wide")

import app_state  # noqa: E402  (after set_page_config)

app_state.busy_indicator()

# Re-assigning a widget's key keeps its value when the widget is not drawn on a run (a page switch
# that interrupts a rerun would otherwise drop the typed model path).
if "model_path" in st.session_state:
    st.session_state["model_path"] = st.session_state["model_path"]

with st.sidebar:
    st.markdown("### Model")
    st.text_input(
        "Local HuggingFace model directory",
        key="model_path",
        placeholder=app_state.DEFAULT_LABEL,
        help="A directory with config.json and *.safetensors. Leave empty for the embedded default model.",
    )
    if not st.session_state.get("model_path", "").strip():
        st.caption("Embedded default: SmolLM2-135M-Instruct (weights from a 4-bit GGUF).")
    else:
        st.caption(f"Path: `{app_state.model_dir()}`")
    from sahc_core.device import resolve_device

    st.caption(f"Compute device: **{resolve_device('auto')}**")
    from sahc_core.cache import default_cache_path

    st.caption(f"Cache: `{default_cache_path()}`")

# The page files live in app_pages/, not pages/: Streamlit serves a pages/ folder as a legacy
# multipage app when a page URL (e.g. /runs) is opened directly, bypassing this router.
pages = {
    "Explore": [
        st.Page("app_pages/model.py", title="Model", icon=":material/account_tree:", default=True),
        st.Page("app_pages/spectrum.py", title="Spectrum", icon=":material/show_chart:"),
    ],
    "Budget": [
        st.Page("app_pages/whatif.py", title="What-if", icon=":material/tune:"),
        st.Page("app_pages/budget.py", title="Budget", icon=":material/savings:"),
    ],
    "Present": [
        st.Page("app_pages/runs.py", title="Runs", icon=":material/play_circle:"),
        st.Page("app_pages/report.py", title="Report", icon=":material/summarize:"),
    ],
}
st.navigation(pages).run()
