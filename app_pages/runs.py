"""Runs page: launch assembly + perplexity as a background job, watch it live, cancel it, compare runs."""
from __future__ import annotations

import streamlit as st

import app_frontier
import app_state
from sahc_core.errors import SahcError
from sahc_core.figures.format import display_table, fmt_duration
from sahc_core.figures.report import runs_scatter
from sahc_core.plans.export import export_run
from sahc_core.plans.plan import CompressionPlan, example_plans, load_plans
from sahc_core.runs.eta import STAGES, estimate_sentence, overall, prelaunch_estimate
from sahc_core.gates import PPL_THRESHOLD, summary_line
from sahc_core.runs.jobs import cancel_run, delete_run_files, list_runs, progress_parts, run_status, start_run
from sahc_core.runs.pipeline import compare_runs

#: Above this, the pre-launch estimate is a warning rather than a note.
LONG_RUN_S = 600
TABLE = ["run_id", "plan_name", "status", "duration_s", "ratio_actual", "ppl", "baseline_ppl", "delta_ppl",
         "delta_ppl_pct", "ppl_threshold", "protocol", "gates_failed", "checkpoint_mb", "error"]
HEADERS = {"duration_s": "Elapsed / duration", "status": "Status (stage)",
           "ppl_threshold": "Perplexity gate: max Δppl (%)"}
KINDS = {"ppl_threshold": "frac"}

st.title("Runs")
st.caption("A run assembles the compressed checkpoint of a plan, checks every quality gate and measures perplexity "
           "against the uncompressed baseline of the same protocol, in a background process that survives page "
           "reloads.")
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
    """Perplexity protocol: corpus path (blank = Shakespeare test split), window, token cap (0 = default),
    and the largest perplexity increase the ``ppl_increase`` gate passes."""
    c = st.columns(4)
    corpus = c[0].text_input("Corpus (text file or folder; blank = embedded Shakespeare test split)",
                             key="runs_corpus").strip()
    window = c[1].number_input("Window (0 = min(2048, model max))", 0, 1 << 17, 0, step=256, key="runs_window")
    max_tokens = c[2].number_input("Max tokens (0 = whole text)", 0, 1 << 30, 0, step=1024, key="runs_max_tokens")
    pct = c[3].number_input("Max perplexity increase (%)", 0.0, 10_000.0, 100 * PPL_THRESHOLD, step=1.0,
                            key="runs_ppl_threshold", help="the ppl_increase gate: (ppl − baseline) / baseline")
    d = st.columns(2)
    dtype = d[0].radio("Evaluation dtype", ["float32", "bfloat16"], horizontal=True, key="runs_dtype",
                       help="dtype of the smoke test and both perplexities (bfloat16 halves the model's memory; "
                            "the run states whether this CPU computes it natively)")
    offload = d[1].radio("Layer by layer", ["auto", "never", "always"], horizontal=True, key="runs_offload",
                         help="auto: one decoder layer in memory at a time when the model would not fit")
    return {"corpus": corpus or None, "window": int(window) or None, "max_tokens": int(max_tokens) or None,
            "ppl_threshold": float(pct) / 100, "dtype": dtype, "offload": offload}


@st.cache_data(ttl=30, show_spinner="Estimating the run time…")
def _estimate(fp: str, corpus: str | None, window: int | None, max_tokens: int | None, _source) -> dict:
    return prelaunch_estimate(cache, _source, corpus, window, max_tokens)


with st.expander("Launch a run", expanded=True):
    try:
        plan = plan_ui()
        protocol = protocol_ui()
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


def export_ui(finished: list[str]) -> None:
    """Pick a finished run and a format; the export is written next to the cache (or where you say)."""
    if not finished:
        st.caption("No finished run with its checkpoint files on disk to export.")
        return
    c = st.columns([2, 2, 1])
    rid = c[0].selectbox("Run", finished, key="runs_export_pick")
    fmt = c[1].radio("Format", ["compressed-tensors", "dense", "gguf"], horizontal=True, key="runs_export_format")
    dtype = c[2].selectbox("dtype", ["auto", "bfloat16", "float16", "float32"], key="runs_export_dtype",
                           help="auto: the dtype the run's perplexity was measured in (so the export's equals it)")
    out = st.text_input("Output folder", str(cache.path.parent / "exports" / f"{rid}-{fmt}"), key="runs_export_out")
    force = st.checkbox("Replace an earlier export in that folder", key="runs_export_force")
    if st.button("Export", key="runs_export"):
        bar = st.progress(0.0, text="Exporting…")
        try:
            res = export_run(cache, rid, out, fmt, dtype=dtype, force=force,
                             progress=lambda d, t, name: bar.progress(d / t, text=f"{d}/{t} tensors"))
        except SahcError as exc:
            app_state.show_error(exc)
        else:
            st.success(f"Wrote {res['out']}: {res['bytes'] / 1e6:,.1f} MB on disk (the run's checkpoint: "
                       f"{(res.get('run_bytes_actual') or 0) / 1e6:,.1f} MB), {res['dtype']}.")
            for note in res.get("notes", []):
                st.caption(note)
        finally:
            bar.empty()


def progress_ui(rid: str) -> None:
    """One active run: overall progress bar with the run ETA, stage details, a cancel button."""
    status = run_status(cache, rid)
    prog = status.get("progress") or {}
    frac, _ = overall(prog)
    stage = status.get("stage") or "queued"
    n = f" ({STAGES.index(stage) + 1}/{len(STAGES)})" if stage in STAGES else ""
    c = st.columns([4, 1])
    c[0].progress(float(frac if frac is not None else prog.get("fraction") or 0.0),
                  text=f"**{status['plan_name']}** ({rid}) · {status['status']} · stage {stage}{n} · "
                       + " · ".join([*progress_parts(prog), f"elapsed {fmt_duration(status.get('duration_s'))}"]))
    if status.get("cancel_requested"):
        c[1].caption("cancelling…")
    elif c[1].button("Cancel", key=f"runs_cancel_{rid}"):
        cancel_run(cache, rid)


@st.fragment(run_every=2)
def live_runs(sizes: dict) -> None:
    """Polls the cache every 2 s: progress of active runs and the runs table (status, elapsed time)."""
    try:
        runs = list_runs(cache, disk=False)
    except SahcError as exc:
        app_state.show_error(exc)
        return
    active = runs[runs["status"].isin(["queued", "running"])]
    was = st.session_state.get("runs_active", set())
    st.session_state["runs_active"] = set(active["run_id"])
    if was - st.session_state["runs_active"]:  # a run just ended: refresh the comparison and disk sizes too
        st.rerun(scope="app")
    st.subheader("In progress")
    if active.empty:
        st.caption("No run in progress.")
    for rid in active["run_id"]:
        progress_ui(rid)
    st.subheader("All runs")
    if runs.empty:
        st.info("No runs yet: launch one above (or `python -m sahc_core run --plan PLAN.json`).")
        return
    live = runs.assign(checkpoint_mb=runs["run_id"].map(sizes),
                       status=[f"{s} ({g})" if s in ("queued", "running") else s
                               for s, g in zip(runs["status"], runs["stage"].fillna("queued"))])
    st.dataframe(display_table(live, TABLE, headers=HEADERS, kinds=KINDS), hide_index=True, width="stretch")


try:
    runs = list_runs(cache)
except SahcError as exc:
    app_state.show_error(exc)
    st.stop()
live_runs(dict(zip(runs["run_id"], runs["checkpoint_mb"])))
if runs.empty:
    st.stop()
for rec in runs[runs["gates_failed"].fillna(0) > 0].itertuples():
    st.warning(f"Run {rec.run_id} ({rec.plan_name}): {rec.gates_failed} quality gate(s) failed; see the gate log.")

_src = app_state.current_source()  # the frontier of this model's runs (another model's are not comparable)
app_frontier.frontier_section(cache, _src.fingerprint if _src is not None else None, "runs")

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

with st.expander("Export a run: compressed-tensors (vLLM, transformers), a dense Hugging Face model, GGUF"):
    export_ui(runs[(runs["status"] == "done") & (runs["checkpoint_mb"] > 0)]["run_id"].tolist())

st.subheader("Compare runs")
done = runs[runs["status"].isin(["done", "failed", "cancelled"])]["run_id"].tolist()
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
for rid in picked:  # what each run compressed but did not evaluate (vision tower, MTP head), and how it ran
    res = run_status(cache, rid).get("result") or {}
    ev, off = res.get("evaluation") or {}, res.get("offload") or {}
    if off:
        st.caption(f"Run {rid}: evaluated {'one decoder layer at a time' if off.get('offload') else 'in memory'} "
                   f"({off.get('reason')}), {(res.get('protocol') or {}).get('dtype_note', '')}")
    if ev.get("note"):
        st.info(f"Run {rid}: {ev['note']}")
        with st.expander(f"Tensors of run {rid} compressed but not evaluated"):
            for part, names in ev["not_evaluated_tensors"].items():
                st.markdown(f"**{part}** ({len(names)}): " + ", ".join(f"`{n}`" for n in names))
if not cmp["components"].empty:
    st.markdown("**Per component**")
    app_state.show_table(cmp["components"])
gates = cmp["gates"]
failed = gates[~gates["passed"].astype(bool)] if len(gates) else gates
st.markdown(f"**Quality gates** ({len(gates):,} decisions, {len(failed):,} failed)")
if len(failed):
    st.error(f"{len(failed)} gate(s) failed in the selected runs: "
             + ", ".join(sorted(set(failed["gate"] + " on " + failed["tensor"])))[:400])
st.caption(summary_line(gates))  # the count per gate, weak ones marked, in one line
app_state.gate_badges(gates)
with st.expander("Gate log (failed first)"):
    app_state.show_table(gates, ["run_id", "tensor", "gate", "value", "threshold", "passed", "evidence"])
