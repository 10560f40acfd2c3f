"""Runs page: launch assembly + perplexity as a background job, watch it live, cancel it, compare runs."""
from __future__ import annotations

import streamlit as st

import app_frontier
import app_runs
import app_state
from sahc_core.errors import SahcError
from sahc_core.figures.report import runs_scatter
from sahc_core.gates import summary_line
from sahc_core.runs import view
from sahc_core.runs.eta import estimate_sentence, prelaunch_estimate
from sahc_core.runs.jobs import ACTIVE, list_runs, start_run
from sahc_core.runs.pipeline import compare_runs

#: Above this, the pre-launch estimate is a warning rather than a note.
LONG_RUN_S = 600

st.title("Runs")
st.caption("A run assembles the compressed checkpoint of a plan, checks every quality gate and measures perplexity "
           "against the uncompressed baseline of the same protocol, in a background process that survives page "
           "reloads.")
cache = app_state.current_cache()
if cache is None:
    st.stop()


@st.cache_data(ttl=30, show_spinner="Estimating the run time…")
def _estimate(fp: str, corpus: str | None, window: int | None, max_tokens: int | None, _source) -> dict:
    return prelaunch_estimate(cache, _source, corpus, window, max_tokens)


with st.expander("Launch a run", expanded=True):
    try:
        plan = app_runs.plan_ui(cache)
        protocol = app_runs.protocol_ui()
        source = app_state.current_source()
        if source is not None:
            # A corpus the estimate cannot read is named here; the button still shows, and starting
            # repeats the same validation (one message, never a run on a bad corpus).
            try:
                est = _estimate(source.fingerprint, protocol["corpus"], protocol["window"], protocol["max_tokens"],
                                source)
                (st.warning if est["seconds"] > LONG_RUN_S else st.info)(estimate_sentence(est))
            except (SahcError, ValueError) as exc:
                app_state.show_error(exc)
        if st.button("Start run", type="primary", disabled=plan is None, key="runs_start"):
            run_id = start_run(cache, plan, app_state.model_dir(), **protocol)
            st.success(f"Run {run_id} started; its progress shows below.")
    except (SahcError, ValueError) as exc:
        app_state.show_error(exc)


@st.fragment(run_every=2)
def live_runs(sizes: dict) -> None:
    """Polls the cache every 2 s: progress of active runs and the runs table (status, elapsed time)."""
    try:
        runs = list_runs(cache, disk=False)
    except SahcError as exc:
        app_state.show_error(exc)
        return
    active = runs[runs["status"].isin(ACTIVE)]
    was = st.session_state.get("runs_active", set())
    st.session_state["runs_active"] = set(active["run_id"])
    if was - st.session_state["runs_active"]:  # a run just ended: refresh the comparison and disk sizes too
        st.rerun(scope="app")
    st.subheader("In progress")
    if active.empty:
        st.caption("No run in progress.")
    for rid in active["run_id"]:
        app_runs.progress_ui(cache, rid)
    st.subheader("All runs")
    if runs.empty:
        st.info("No runs yet: launch one above (or `python -m sahc_core run --plan PLAN.json`).")
        return
    st.dataframe(view.live_table(runs, sizes), hide_index=True, width="stretch")


try:
    runs = list_runs(cache)
except SahcError as exc:
    app_state.show_error(exc)
    st.stop()
live_runs(dict(zip(runs["run_id"], runs["checkpoint_mb"])))
if runs.empty:
    st.stop()
for warning in view.gate_warnings(runs):
    st.warning(warning)

_src = app_state.current_source()  # the frontier of this model's runs (another model's are not comparable)
app_frontier.frontier_section(cache, _src.fingerprint if _src is not None else None, "runs")

on_disk = view.on_disk(runs)
with st.expander(f"Disk space: {on_disk['checkpoint_mb'].sum():,.0f} MB of checkpoints from {len(on_disk)} finished run(s)"):
    app_runs.free_space_ui(cache, dict(zip(on_disk["run_id"], on_disk["checkpoint_mb"])))

with st.expander("Export a run: compressed-tensors (vLLM, transformers), a dense Hugging Face model, GGUF"):
    app_runs.export_ui(cache, view.exportable(runs))

st.subheader("Compare runs")
done = view.finished(runs)["run_id"].tolist()
picked = st.multiselect("Compare runs (pick two or more)", done, default=done[:2], key="runs_compare")
if not picked:
    st.info("Pick finished runs above to compare them." if done else "No finished run yet to compare.")
    st.stop()
try:
    cmp = compare_runs(cache, picked)
except SahcError as exc:
    app_state.show_error(exc)
    st.stop()
if cmp["protocol_warning"]:
    st.warning(cmp["protocol_warning"])
if cmp["baselines"].empty:
    st.info("None of the picked runs finished with a perplexity yet: nothing to plot; their gate decisions follow.")
else:
    st.plotly_chart(runs_scatter(cmp["runs"]), width="stretch", key="runs_scatter")
    st.markdown("**Baselines, one per perplexity protocol** (each run's Δppl is against its own)")
    app_state.show_table(cmp["baselines"], ["protocol", "tokens", "baseline_ppl", "n_runs", "run_ids"])
app_runs.evaluation_ui(cache, picked)
if not cmp["components"].empty:
    st.markdown("**Per component**")
    app_state.show_table(cmp["components"])
gates = cmp["gates"]
failed, heading = view.failed_gates(gates)
st.markdown(heading)
if len(failed):
    st.error(view.failed_gates_sentence(failed))
st.caption(summary_line(gates))  # the count per gate, weak ones marked, in one line
app_state.gate_badges(gates)
with st.expander("Gate log (failed first)"):
    app_state.show_table(gates, ["run_id", "tensor", "gate", "value", "threshold", "passed", "evidence"])
