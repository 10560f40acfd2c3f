"""The CLI ``report`` command: build the report (and the study tables) and export it to a folder.

``python -m sahc_core report --out DIR [--study] [--no-images] [--target-ratio 5] [--tensor NAME ...]``
writes ``DIR/report.html`` (self-contained, interactive), ``DIR/tables/*.csv``, ``DIR/audit_log.csv``
and ``DIR/figures/*.png|svg`` (when a Chrome/Chromium binary exists; otherwise ``images_error`` in the
JSON says why). With ``--study`` the JSON also carries ``study_figures`` (parameter shares, the FFN
min-rank range, σ₁/σ_min: :func:`sahc_core.report.study.study_figures`, the numbers README quotes).
Wired into :mod:`sahc_core.cli.main` by :func:`add_report_parser`.
"""
from __future__ import annotations

import argparse


def cmd_report(args: argparse.Namespace) -> dict:
    """Build, optionally add the study tables, and write every export; returns the written paths."""
    from sahc_core.cli.common import _cache, _source, _tqdm_progress
    from sahc_core.report.export import check_out_dir, write_report
    from sahc_core.gates import audit_log
    from sahc_core.report.sections import build_report

    if args.target_ratio is not None and not args.target_ratio > 0:
        raise ValueError(f"--target-ratio must be positive, got {args.target_ratio}.")
    check_out_dir(args.out)  # a file or an unwritable place fails now, not after minutes of building
    source = _source(args)
    cache = _cache(args)
    update, close = _tqdm_progress("report", "step")
    try:
        report = build_report(source, cache=cache, device=args.device, target_ratio=args.target_ratio,
                              pareto_tensors=args.tensor or None, progress=update)
        study = None
        if args.study:
            from sahc_core.report.study import reproduce_study

            from sahc_core.cli.common import _calib

            study = reproduce_study(source, cache=cache, device=args.device, progress=update, with_tt=not args.no_tt,
                                    calib=_calib(args, source))
    finally:
        close()
    audit = audit_log(cache, model_fp=source.fingerprint) if cache is not None else None
    written = write_report(report, args.out, study=study.tables if study else None,
                           study_notes=study.notes if study else None, audit=audit,
                           image_formats=() if args.no_images else ("png", "svg"))
    return {"model": str(source.path), "fingerprint": source.fingerprint,
            "sections": [{"key": s.key, "title": s.title, "caption": s.caption} for s in report.sections],
            "study_tables": list(study.tables) if study else [],
            "study_figures": study.figures if study else None, **written}


def add_report_parser(sub: argparse._SubParsersAction, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``report`` sub-command (with the shared flags of ``parents``) to ``sub``."""
    help_ = "build the report (figures with captions, optional study tables) and export HTML, PNG/SVG and CSV"
    sp = sub.add_parser("report", parents=list(parents), help=help_, description=help_)
    sp.set_defaults(func=cmd_report)
    sp.add_argument("--out", required=True, help="output folder (created): report.html, tables/, figures/")
    sp.add_argument("--study", action="store_true", help="also reproduce the reference study's tables")
    sp.add_argument("--no-tt", action="store_true", help="skip the Tensor-Train sweep in the study tables")
    sp.add_argument("--calib", action="store_true", help="add GPTQ and whitened-SVD columns and output errors to the "
                    "study tables (calibration statistics captured once, then cached)")
    sp.add_argument("--no-images", action="store_true", help="skip PNG/SVG export (needs Chromium)")
    sp.add_argument("--target-ratio", type=float, default=5.0, help="total ratio for the embedding wall (default 5)")
    sp.add_argument("--tensor", action="append", help="tensor for the Pareto section (repeatable; default: the "
                    "middle FFN gate_proj and the embedding)")
    return sp
