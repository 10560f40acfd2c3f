"""Runs page widget groups: the plan and protocol of a launch, one active run's progress, export, disk space.

Each ``*_ui`` returns plain values (a plan, the protocol keywords of ``start_run``) or acts through one
library call; the texts and tables come from :mod:`sahc_core.runs.view`.
"""
from __future__ import annotations

import streamlit as st

import app_state
from sahc_core.errors import SahcError
from sahc_core.gates import PPL_THRESHOLD
from sahc_core.plans.export import export_run
from sahc_core.plans.plan import CompressionPlan, example_plans, load_plans
from sahc_core.runs.jobs import cancel_run, delete_run_files, run_status
from sahc_core.runs.view import evaluation_notes, export_sentence, progress_line


def plan_ui(cache) -> CompressionPlan | None:
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


def progress_ui(cache, rid: str) -> None:
    """One active run: overall progress bar with the run ETA, stage details, a cancel button."""
    status = run_status(cache, rid)
    frac, text = progress_line(rid, status)
    c = st.columns([4, 1])
    c[0].progress(frac, text=text)
    if status.get("cancel_requested"):
        c[1].caption("cancelling…")
    elif c[1].button("Cancel", key=f"runs_cancel_{rid}"):
        cancel_run(cache, rid)


def export_ui(cache, finished: list[str]) -> None:
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
            st.success(export_sentence(res))
            for note in res.get("notes", []):
                st.caption(note)
        finally:
            bar.empty()


def free_space_ui(cache, sizes: dict[str, float]) -> None:
    """Pick a finished run (id -> checkpoint MB) and delete its checkpoint files (its results stay)."""
    if not sizes:
        st.caption("No finished run has checkpoint files on disk.")
        return
    victim = st.selectbox("Run", list(sizes), format_func=lambda r: f"{r} ({sizes[r]:,.1f} MB)", key="runs_free_pick")
    sure = st.checkbox("Delete its checkpoint files (its results, comparison and gate log stay)", key="runs_free_sure")
    if st.button("Delete files", disabled=not sure, key="runs_free"):
        try:
            freed = delete_run_files(cache, victim)
        except SahcError as exc:
            app_state.show_error(exc)
        else:
            st.success(f"Deleted the checkpoint of {victim}: {freed / 1e6:,.1f} MB freed.")


def evaluation_ui(cache, picked: list[str]) -> None:
    """What each picked run compressed but did not evaluate (vision tower, MTP head), and how it ran."""
    for rid in picked:
        how, note, tensors = evaluation_notes(rid, run_status(cache, rid).get("result") or {})
        if how:
            st.caption(how)
        if note:
            st.info(note)
            with st.expander(f"Tensors of run {rid} compressed but not evaluated"):
                for part, names in tensors.items():
                    st.markdown(f"**{part}** ({len(names)}): " + ", ".join(f"`{n}`" for n in names))
