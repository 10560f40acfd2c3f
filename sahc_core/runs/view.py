"""Runs as the Runs page shows them: the live table, one progress line per active run, each run's notes.

Plain functions of :func:`sahc_core.runs.jobs.list_runs` rows, :func:`~sahc_core.runs.jobs.run_status`
dicts, :func:`sahc_core.plans.export.export_run` results and the gate log of
:func:`sahc_core.runs.pipeline.compare_runs` (no Streamlit): the page draws what they return.
"""
from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from sahc_core.figures.format import display_table, fmt_duration
from sahc_core.runs.eta import STAGES, overall
from sahc_core.runs.jobs import ACTIVE, TERMINAL, progress_parts

#: Columns of the live runs table, in order, with the headers and kinds that differ from the defaults.
TABLE = ["run_id", "plan_name", "status", "duration_s", "ratio_actual", "ppl", "baseline_ppl", "delta_ppl",
         "delta_ppl_pct", "ppl_threshold", "protocol", "gates_failed", "checkpoint_mb", "error"]
HEADERS = {"duration_s": "Elapsed / duration", "status": "Status (stage)",
           "ppl_threshold": "Perplexity gate: max Δppl (%)"}
KINDS = {"ppl_threshold": "frac"}


def live_table(runs: pd.DataFrame, sizes: Mapping[str, float]) -> pd.DataFrame:
    """The runs table as a reader sees it: checkpoint sizes from ``sizes`` (run id -> MB), an active
    run's status with its stage (``running (assemble)``)."""
    live = runs.assign(checkpoint_mb=runs["run_id"].map(sizes),
                       status=[f"{s} ({g})" if s in ACTIVE else s
                               for s, g in zip(runs["status"], runs["stage"].fillna("queued"))])
    return display_table(live, TABLE, headers=HEADERS, kinds=KINDS)


def progress_line(run_id: str, status: Mapping[str, Any]) -> tuple[float, str]:
    """``(fraction, text)`` of one active run's progress bar: the overall fraction (the run ETA's, else
    the stage's) and ``**plan** (id) · status · stage S (i/4) · tensors … · run ETA … · elapsed …``."""
    prog = status.get("progress") or {}
    frac, _ = overall(prog)
    stage = status.get("stage") or "queued"
    n = f" ({STAGES.index(stage) + 1}/{len(STAGES)})" if stage in STAGES else ""
    text = (f"**{status['plan_name']}** ({run_id}) · {status['status']} · stage {stage}{n} · "
            + " · ".join([*progress_parts(prog), f"elapsed {fmt_duration(status.get('duration_s'))}"]))
    return float(frac if frac is not None else prog.get("fraction") or 0.0), text


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that ended (done, failed or cancelled)."""
    return runs[runs["status"].isin(TERMINAL)]


def on_disk(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished runs whose checkpoint files are still on disk."""
    return runs[runs["status"].isin(TERMINAL) & (runs["checkpoint_mb"] > 0)]


def exportable(runs: pd.DataFrame) -> list[str]:
    """Ids of the runs that finished ``done`` with their checkpoint files on disk."""
    return runs[(runs["status"] == "done") & (runs["checkpoint_mb"] > 0)]["run_id"].tolist()


def gate_warnings(runs: pd.DataFrame) -> list[str]:
    """One sentence per run with failed quality gates."""
    return [f"Run {rec.run_id} ({rec.plan_name}): {rec.gates_failed} quality gate(s) failed; see the gate log."
            for rec in runs[runs["gates_failed"].fillna(0) > 0].itertuples()]


def export_sentence(res: Mapping[str, Any]) -> str:
    """What :func:`~sahc_core.plans.export.export_run` wrote, in one sentence (its notes follow it)."""
    return (f"Wrote {res['out']}: {res['bytes'] / 1e6:,.1f} MB on disk (the run's checkpoint: "
            f"{(res.get('run_bytes_actual') or 0) / 1e6:,.1f} MB), {res['dtype']}.")


def evaluation_notes(run_id: str, result: Mapping[str, Any]) -> tuple[str | None, str | None, dict[str, list[str]]]:
    """How a run was evaluated and what it compressed but did not evaluate (vision tower, MTP head).

    Returns ``(how, note, not_evaluated)``: a sentence on in-memory vs layer-by-layer evaluation (``None``
    when the run did not record it), the run's not-evaluated note (``None`` without one) and, with the
    note, its tensors per part.
    """
    ev, off = result.get("evaluation") or {}, result.get("offload") or {}
    how = None
    if off:
        how = (f"Run {run_id}: evaluated {'one decoder layer at a time' if off.get('offload') else 'in memory'} "
               f"({off.get('reason')}), {(result.get('protocol') or {}).get('dtype_note', '')}")
    if not ev.get("note"):
        return how, None, {}
    return how, f"Run {run_id}: {ev['note']}", ev["not_evaluated_tensors"]


def failed_gates(gates: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The failed decisions of a gate log and its heading (``**Quality gates** (n decisions, k failed)``)."""
    failed = gates[~gates["passed"].astype(bool)] if len(gates) else gates
    return failed, f"**Quality gates** ({len(gates):,} decisions, {len(failed):,} failed)"


def failed_gates_sentence(failed: pd.DataFrame) -> str:
    """``k gate(s) failed in the selected runs: gate on tensor, ...`` (at most 400 characters of names)."""
    return (f"{len(failed)} gate(s) failed in the selected runs: "
            + ", ".join(sorted(set(failed["gate"] + " on " + failed["tensor"])))[:400])
