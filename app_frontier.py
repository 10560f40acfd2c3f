"""Runs / Report page section: the measured ratio-vs-perplexity frontier and the predicted-vs-measured check."""
from __future__ import annotations

import math

import streamlit as st

import app_state
from sahc_core.errors import SahcError
from sahc_core.figures.frontier import frontier_figure, prediction_figure
from sahc_core.runs.frontier import measured_frontier, prediction_check, run_points


def frontier_section(cache, model_fp: str | None, key: str) -> None:
    """Every finished run of one perplexity protocol as a point (uniform int-k, optimised, hand plans),
    the measured frontier as a line, and Spearman's ρ of predicted Δloss vs measured Δ log ppl."""
    st.subheader("Ratio vs perplexity frontier")
    try:
        pts = run_points(cache, model_fp)
    except SahcError as exc:
        app_state.show_error(exc)
        return
    if pts.empty:
        st.info("No finished run yet: the frontier appears once runs have finished.")
        return
    protocols = list(dict.fromkeys(pts["protocol"][::-1]))  # newest protocol first
    proto = st.selectbox("Perplexity protocol", protocols, key=f"{key}_frontier_protocol") if len(protocols) > 1 \
        else protocols[0]
    pts = pts[pts["protocol"] == proto]
    st.plotly_chart(frontier_figure(pts, measured_frontier(pts)), key=f"{key}_frontier")
    st.caption(f"{len(pts)} run(s) on {proto}; an open symbol is a run with a failed quality gate; the dotted line "
               "joins the runs no other run beats (higher ratio, no worse perplexity).")
    chk = prediction_check(pts)
    rho = "n/a" if not math.isfinite(chk["spearman"]) else f"{chk['spearman']:.2f}"
    with st.expander(f"Predicted Δloss vs measured Δ log ppl: Spearman ρ = {rho} over {chk['n']} run(s)"):
        if chk["n"]:
            st.plotly_chart(prediction_figure(chk["points"], chk["spearman"]), key=f"{key}_prediction")
        st.caption("The optimizer predicts Δloss = Σ_t Σ_u s_u·e_u² (s_u: Monte-Carlo Fisher sensitivity of module u, "
                   "e_u: its held-out relative output error); a run whose plan carries a prediction in its provenance "
                   "is a point. Both axes are nats per token.")
