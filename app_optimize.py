"""Budget page section "Optimise for a ratio": the optimizer's plan, its per-tensor map, save and run buttons.

Widgets return plain values that go straight into :mod:`sahc_core.plans.optimize`; the result is kept
in the session so that the save / run buttons (a rerun) act on the plan shown.
"""
from __future__ import annotations

import math

import streamlit as st

import app_state
from sahc_core.errors import SahcError
from sahc_core.figures.frontier import choice_heatmap
from sahc_core.methods import registry
from sahc_core.plans.candidates import CandidateGrid
from sahc_core.plans.optimize import Constraints, optimize_plan, prepare

_NO_LIMIT = "no limit"


def constraints_ui(components: list[str]) -> tuple[float, Constraints, tuple[str, ...], bool]:
    """Target ratio, constraints, methods to measure and whether to use calibration statistics."""
    c = st.columns([1, 2, 1, 1])
    target = c[0].number_input("Target ratio", 1.0, 100.0, 4.5, step=0.5, key="opt_target")
    keep = c[1].multiselect("Keep in 16 bits", components, key="opt_keep")
    emb_bits = c[2].selectbox("Embedding: max bits", [_NO_LIMIT, 8, 6, 5, 4, 3], key="opt_emb_bits")
    one_group = c[3].checkbox("One group size", key="opt_one_group",
                             help="hardware-friendly: every int tensor uses the same group size")
    names = [m.name for m in registry.methods()]
    d1, d2 = st.columns([3, 1])
    methods = d1.multiselect("Methods to measure and choose from", names, default=names, key="opt_methods",
                             help="Every option is measured once per model (cached); later optimisations are seconds.")
    use_calib = d2.checkbox("Calibration statistics", value=True, key="opt_calib",
                            help="Held-out output errors and calibration-aware methods; off: the weight error "
                                 "stands in and those methods are left out.")
    cons = Constraints(keep_components=frozenset(keep), one_group_size=one_group,
                       max_bits={} if emb_bits == _NO_LIMIT else {"embedding": float(emb_bits)})
    return float(target), cons, tuple(methods), use_calib


def _run_optimizer(source, cache, target: float, cons: Constraints, methods: tuple[str, ...], use_calib: bool) -> None:
    bar = st.progress(0.0, text="preparing…")

    def progress(stage: str, done: int, total: int) -> None:
        bar.progress(min(1.0, done / total) if total else 1.0, text=f"{stage}: {done}/{total}")

    prep = prepare(source, cache, calibration=use_calib, grid=CandidateGrid(methods=methods), progress=progress)
    bar.empty()
    res = optimize_plan(prep, target, cons)
    st.session_state["opt_result"] = (source.fingerprint, res, prep.notes)


def show_result(res, notes: list[str], cache) -> None:
    """Metrics, the layer x projection map, the per-tensor table, save and run buttons."""
    s, prov = res.solution, res.plan.provenance
    m = st.columns(4)
    m[0].metric("Ratio (projected)", f"{s.ratio:.2f}x")
    m[1].metric("Predicted Δloss", f"{s.damage:.4f} nats/token")
    m[2].metric("Predicted perplexity factor", f"{math.exp(s.damage):.3f}x")
    m[3].metric("Solver", s.status)
    for note in notes:
        st.warning(note)
    st.caption(f"{prov['candidates']['n_candidates']} options measured for {prov['candidates']['n_tensors']} tensors "
               f"({prov['candidates']['n_feasible']} pass every gate); damage model: {prov['damage_model']['formula']}.")
    st.plotly_chart(choice_heatmap(s.choice), key="opt_heatmap")
    with st.expander("Per-tensor choice"):
        cols = ["tensor", "component", "label", "bytes", "rel_error", "output_error", "output_cosine", "damage"]
        st.dataframe(s.choice[cols], hide_index=True, width="stretch")
    b = st.columns(3)
    b[0].download_button("Download plan JSON", res.plan.to_json(), f"{res.plan.name}.json", "application/json",
                         key="opt_download")
    if b[1].button("Save plan to cache", key="opt_save", disabled=cache is None):
        from sahc_core.plans.plan import save_plan

        save_plan(cache, res.plan)
        b[1].success(f"Saved '{res.plan.name}'.")
    if b[2].button("Launch a run of this plan", key="opt_launch", type="primary", disabled=cache is None):
        from sahc_core.runs.jobs import start_run

        run_id = start_run(cache, res.plan, app_state.model_dir())
        b[2].success(f"Run {run_id} started; follow it on the Runs page.")


def optimize_section(source, cache, components: list[str]) -> None:
    """The whole "Optimise for a ratio" section of the Budget page."""
    st.subheader("Optimise for a ratio")
    st.caption("The plan of least predicted damage (Fisher-weighted held-out output error) over every registered "
               "method and setting per tensor, with the quality gates as hard constraints, solved exactly.")
    try:
        target, cons, methods, use_calib = constraints_ui(components)
        if st.button("Optimise", key="opt_run", disabled=cache is None or not methods):
            _run_optimizer(source, cache, target, cons, methods, use_calib)
        stored = st.session_state.get("opt_result")
        if stored and stored[0] == source.fingerprint:
            show_result(stored[1], stored[2], cache)
    except (SahcError, ValueError) as exc:
        app_state.show_error(exc)
