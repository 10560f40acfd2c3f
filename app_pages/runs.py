"""Runs page: launch assembly + perplexity as a background job, watch it, cancel it, compare runs."""
from __future__ import annotations

import streamlit as st

import app_frontier
import app_state
from sahc_core.errors import SahcError
from sahc_core.figures.report import runs_scatter
from sahc_core.runs.jobs import cancel_run, delete_run_files, list_runs, progress_parts, run_status, start_run
from sahc_core.runs.pipeline import compare_runs
from sahc_core.plans.plan import CompressionPlan, example_plans, load_plans

st.title("Runs")
st.caption("A run assembles the compressed checkpoint of a plan, checks every quality gate and measures perplexity "
           "against the uncompressed baseline, in a background process that survives page reloads.")
cache = app_state.current_cache()
if cache is None:
    st.stop()


def plan_ui() -> CompressionPlan | None:
    """A plan saved in the cache, one of the shipped examples (plans/), or an uploaded plan JSON file."""
    saved, examples = load_plans(cache), example_plans()
    kind = st.radio("Plan", ["saved plan", "example plan", "upload JSON"], horizontal=True, key="runs_plan_kind",
                    index=0 if saved else 1)
    if kind == "upload JSON":
        upload = st.file_uploader("Plan JSON", type=["json"], key="runs_plan_upload")
        return CompressionPlan.from_json_text(upload.getvalue()) if upload is not None else None
    plans = saved if kind == "saved plan" else examples
    if not plans:
        st.info("No saved plan yet: build one on the Budget page, pick an example, or upload a plan JSON file.")
        return None
    return plans[st.selectbox("Plan name", list(plans), key="runs_plan_pick")]


def protocol_ui() -> dict:
    """Perplexity protocol: corpus path (blank = Shakespeare test split), window, token cap (0 = default)."""
    c = st.columns(3)
    corpus = c[0].text_input("Corpus (text file or folder; blank = embedded Shakespeare test split)",
                             key="runs_corpus").strip()
    window = c[1].number_input("Window (0 = min(2048, model max))", 0, 1 << 17, 0, step=256, key="runs_window")
    max_tokens = c[2].number_input("Max tokens (0 = whole text)", 0, 1 << 30, 0, step=1024, key="runs_max_tokens")
    return {"corpus": corpus or None, "window": int(window) or None, "max_tokens": int(max_tokens) or None}


with st.expander("Launch a run", expanded=True):
    try:
        plan = plan_ui()
        protocol = protocol_ui()
        if st.button("Start run", type="primary", disabled=plan is None, key="runs_start"):
            run_id = start_run(cache, plan, app_state.model_dir(), **protocol)
            st.success(f"Run {run_id} started; its progress shows below.")
    except (SahcError, ValueError) as exc:
        app_state.show_error(exc)


@st.fragment(run_every=2)
def live_runs() -> None:
    """Polls the cache every 2 s: one progress bar and a cancel button per active run."""
    try:
        runs = list_runs(cache, disk=False)
    except SahcError as exc:
        app_state.show_error(exc)
        return
    active = runs[runs["status"].isin(["queued", "running"])]
    was = st.session_state.get("runs_active", set())
    st.session_state["runs_active"] = set(active["run_id"])
    if was - st.session_state["runs_active"]:  # a run just ended: refresh the table and comparison too
        st.rerun(scope="app")
    if active.empty:
        st.caption("No run in progress.")
        return
    for rid in active["run_id"]:
        status = run_status(cache, rid)
        prog = status.get("progress") or {}
        c = st.columns([4, 1])
        c[0].progress(float(prog.get("fraction") or 0.0),
                      text=f"**{status['plan_name']}** ({rid}) · {status['status']} · stage "
                           f"{status.get('stage') or 'queued'} · {' · '.join(progress_parts(prog))}")
        if status.get("cancel_requested"):
            c[1].caption("cancelling…")
        elif c[1].button("Cancel", key=f"runs_cancel_{rid}"):
            cancel_run(cache, rid)


st.subheader("In progress")
live_runs()

st.subheader("All runs")
try:
    runs = list_runs(cache)
except SahcError as exc:
    app_state.show_error(exc)
    st.stop()
if runs.empty:
    st.info("No runs yet: launch one above (or `python -m sahc_core run --plan PLAN.json`).")
    st.stop()
table = runs[["run_id", "plan_name", "status", "ratio_projected", "ratio_actual", "ppl", "baseline_ppl", "delta_ppl",
              "gates_passed", "gates_failed", "duration_s", "checkpoint_mb", "error"]]
st.dataframe(table, hide_index=True, width="stretch", column_config={
    "ratio_projected": st.column_config.NumberColumn("ratio proj.", format="%.2fx"),
    "ratio_actual": st.column_config.NumberColumn("ratio actual", format="%.2fx"),
    "delta_ppl": st.column_config.NumberColumn("Δppl vs baseline", format="%+.3f"),
    "duration_s": st.column_config.NumberColumn("duration", format="%.0f s"),
    "checkpoint_mb": st.column_config.NumberColumn("on disk", format="%.1f MB")})
for rec in runs[runs["gates_failed"].fillna(0) > 0].itertuples():
    st.warning(f"Run {rec.run_id} ({rec.plan_name}): {rec.gates_failed} quality gate(s) failed; see the gate log.")

app_frontier.frontier_section(cache, None, "runs")

on_disk = runs[runs["status"].isin(["done", "failed", "cancelled"]) & (runs["checkpoint_mb"] > 0)]
with st.expander(f"Disk space: {on_disk['checkpoint_mb'].sum():,.0f} MB of checkpoints from {len(on_disk)} finished run(s)"):
    if on_disk.empty:
        st.caption("No finished run has checkpoint files on disk.")
    else:
        sizes = dict(zip(on_disk["run_id"], on_disk["checkpoint_mb"]))
        victim = st.selectbox("Run", list(sizes), format_func=lambda r: f"{r} ({sizes[r]:,.1f} MB)", key="runs_free_pick")
        sure = st.checkbox("Delete its checkpoint files (its results, comparison and gate log stay)",
                           key="runs_free_sure")
        if st.button("Delete files", disabled=not sure, key="runs_free"):
            try:
                freed = delete_run_files(cache, victim)
            except SahcError as exc:
                app_state.show_error(exc)
            else:
                st.success(f"Deleted the checkpoint of {victim}: {freed / 1e6:,.1f} MB freed.")

done = runs[runs["status"].isin(["done", "failed", "cancelled"])]["run_id"].tolist()
picked = st.multiselect("Compare runs (pick two or more)", done, default=done[:2], key="runs_compare")
if picked:
    try:
        cmp = compare_runs(cache, picked)
    except SahcError as exc:
        app_state.show_error(exc)
        st.stop()
    st.plotly_chart(runs_scatter(cmp["runs"]), key="runs_scatter")
    st.markdown("**Per component**")
    st.dataframe(cmp["components"], hide_index=True, width="stretch")
    gates = cmp["gates"]
    failed = gates[~gates["passed"].astype(bool)] if len(gates) else gates
    st.markdown(f"**Gate log** ({len(gates)} decisions, {len(failed)} failed; failed first)")
    if len(failed):
        st.error(f"{len(failed)} gate(s) failed in the selected runs: "
                 + ", ".join(sorted(set(failed["gate"] + " on " + failed["tensor"])))[:400])
    st.dataframe(gates[["run_id", "tensor", "gate", "value", "threshold", "passed", "evidence"]], hide_index=True,
                 width="stretch")
