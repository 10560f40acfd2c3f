"""Builders of the report's sections (one function each), called by :func:`sahc_core.report.build.build_report`.

A section whose data cannot be computed (a user-facing ``SahcError`` or ``ValueError``, e.g. a model
without an embedding for the wall) is kept in the report with that one-sentence reason as its
caption, so a gap is visible and never silent.
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import replace

import pandas as pd

from sahc_core.figures import report as fr
from sahc_core.io.components import embedding_tensor
from sahc_core.report import build as rp
from sahc_core.errors import SahcError


def _shares(source, table: pd.DataFrame) -> rp.ReportSection:
    from sahc_core.io.components import component_shares
    from sahc_core.figures.model import shares_bar

    shares = component_shares(table)
    tbl = shares.assign(component=shares["component"].map(fr.label), share_pct=100 * shares["share"]).drop(
        columns="share")
    return rp.ReportSection("shares", "1. Where the parameters live", rp.caption_shares(shares),
                            (shares_bar(shares),), tbl)


def _spectrum(source, table, cache, device, progress) -> rp.ReportSection:
    from sahc_core.figures.spectrum import layer_heatmap
    from sahc_core.spectra.scan import scan

    def prog(done, total, *_):
        if progress:
            progress(done, total, "spectrum scan")
    from sahc_core.spectra.scan import failed

    df = scan(source, cache=cache, device=device, progress=prog)
    df = df.drop(columns=[c for c in ("shape", "component", "kind", "layer") if c in df]).merge(
        table[["name", "shape", "component", "kind", "layer"]], on="name", how="left")
    bad = failed(df)
    warnings = tuple(f"Left out of the verdict: {r.error}" for r in bad.itertuples())
    per_tensor, per_comp = rp.spectrum_verdict(df)
    sentences = [rp.component_sentence(r) for _, r in per_comp.iterrows()]
    tbl = per_comp.assign(component=per_comp["component"].map(fr.label))
    for c in ("rank_fraction_median", "rank_fraction_min", "rank_fraction_max", "break_even_median"):
        tbl[c] = (100 * tbl[c]).round(1)
    tbl = tbl.rename(columns={c: c.replace("rank_fraction", "min_rank_pct").replace("break_even", "break_even_pct")
                              for c in tbl.columns})
    return rp.ReportSection("spectrum", f"2. Spectrum verdict: min rank for {rp.ERROR_TARGET:g} error",
                            sentences[0], (layer_heatmap(
                                per_tensor, "rank_fraction", f"min rank for {rp.ERROR_TARGET:g} error, % of full rank",
                                percent=True),), tbl, tuple(sentences[1:]), warnings=warnings)


def _pareto(source, name: str, cache, device, progress, idx: int) -> rp.ReportSection:
    from sahc_core.figures.whatif import pareto_figure

    points = rp.pareto_points(source, name, cache=cache, device=device, progress=progress)
    notes = (f"{len(points)} settings measured on the real weights; {int(points['pareto'].sum())} on the Pareto "
             "front (outlined).",)
    if points.empty:
        raise ValueError(f"no method could be measured on {name}.")
    gates = [f"fails {f}" if f else ("weak checks only" if w else "all pass")
             for f, w in zip(points["failed_gates"], points["weak_only"])]
    tbl = points.assign(gates=gates)[["label", "method", "bits", "bytes", "ratio", "bits_per_weight", "rel_error",
                                      "weight_cosine", "gates", "pareto"]]
    return rp.ReportSection(f"pareto-{idx}", f"3.{idx} Per-tensor Pareto: int-k vs SVD vs TT ({name})",
                            rp.caption_pareto(points, name), (pareto_figure(points),), tbl.round(5), notes)


def _budget(source, cache, runs, target_ratio) -> rp.ReportSection:
    from sahc_core.figures.budget import bytes_breakdown_figure, wall_figure
    from sahc_core.plans.plan import embedding_wall, project

    plan = rp.report_plan(cache, runs)
    proj = project(plan, source)
    wall = embedding_wall(proj, target_ratio)
    tbl = pd.DataFrame([{"component": fr.label(c["component"]), "original_mb": c["original_bytes"] / 1e6,
                         "compressed_mb": c["bytes"] / 1e6, "ratio": c["ratio"],
                         "share_of_compressed_pct": 100 * c["share_of_compressed"]} for c in proj["components"]])
    total = pd.DataFrame([{"component": "Total", "original_mb": proj["bytes_original"] / 1e6,
                           "compressed_mb": proj["bytes_projected"] / 1e6, "ratio": proj["ratio_projected"],
                           "share_of_compressed_pct": 100.0}])
    notes = (f"Highest total ratio reachable with a 0-byte embedding under this plan: {wall['max_total_ratio']:.2f}x.",)
    return rp.ReportSection("budget", f"4. Byte budget and the embedding wall (plan {plan.name!r})",
                            rp.caption_budget(proj, wall),
                            (bytes_breakdown_figure(proj), wall_figure(proj, target_ratio)),
                            pd.concat([tbl, total], ignore_index=True).round(3), notes)


def _runs(runs: pd.DataFrame, cache) -> rp.ReportSection:
    from sahc_core.gates import audit_log, summary_line
    from sahc_core.runs.protocol import mixed_warning

    tbl = runs.drop(columns=[c for c in ("started_at", "protocol_key") if c in runs]).copy()
    figures = (fr.runs_scatter(runs),) if len(fr.finished_runs(runs)) else ()  # empty state: the caption says why
    warning = mixed_warning(fr.finished_runs(runs)) if figures else None
    notes = tuple(f"Run {r.run_id} ({r.plan_name}): {summary_line(audit_log(cache, run_id=r.run_id))}"
                  for r in runs.itertuples()) if cache is not None else ()  # decisions counted per gate
    return rp.ReportSection("runs", "5. Runs: ratio vs perplexity against each run's own baseline",
                            rp.caption_runs(runs), figures, tbl, notes, warnings=(warning,) if warning else ())


def _failed(key: str, title: str, exc: Exception) -> rp.ReportSection:
    return rp.ReportSection(key, title, f"Not available: {exc}", error=str(exc))


def build_sections(source, cache, device: str, target_ratio: float, pareto_tensors: Sequence[str] | None,
                   progress: Callable[[int, int, str], None] | None) -> list[rp.ReportSection]:
    """Every section in story order (see :mod:`sahc_core.report.build`)."""
    from sahc_core.io.components import tensor_table

    table = tensor_table(source)
    sections = [_shares(source, table)]
    try:
        sections.append(_spectrum(source, table, cache, device, progress))
    except (SahcError, ValueError) as exc:
        sections.append(_failed("spectrum", "2. Spectrum verdict", exc))
    if pareto_tensors is None:
        pareto_tensors = [n for n in (rp.middle_tensor(table), embedding_tensor(table)) if n]
    for i, name in enumerate(pareto_tensors, start=1):
        try:
            sections.append(_pareto(source, name, cache, device, progress, i))
        except (SahcError, ValueError) as exc:
            sections.append(_failed(f"pareto-{i}", f"3.{i} Per-tensor Pareto ({name})", exc))
    runs = rp.runs_table(cache, source.fingerprint)
    try:
        sections.append(_budget(source, cache, runs, target_ratio))
    except (SahcError, ValueError) as exc:
        sections.append(_failed("budget", "4. Byte budget and the embedding wall", exc))
    sections.append(_runs(runs, cache))
    return sections


def build_report(source, cache=None, device: str = "auto", target_ratio: float = rp.TARGET_RATIO,
                 pareto_tensors: Sequence[str] | None = None, progress=None) -> rp.Report:
    """Compute (or read from the cache) every section of the report for ``source``.

    Every figure gets one polish (:func:`sahc_core.figures.style.tidy_figure`: decade-only log axes,
    automargins), so the page, the HTML and the PNG/SVG exports all show the same figures.
    """
    from sahc_core.figures.style import tidy_figure

    sections = [replace(s, figures=tuple(tidy_figure(f) for f in s.figures))
                for s in build_sections(source, cache, device, target_ratio, pareto_tensors, progress)]
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return rp.Report(title=f"SAHC report: {source.path.name}",
                     subtitle=(f"{source.architecture} · {source.num_params:,} parameters · fingerprint "
                               f"{source.fingerprint[:12]} · {now}"),
                     model=str(source.path), fingerprint=source.fingerprint, sections=tuple(sections))
