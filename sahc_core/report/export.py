"""Exports of a report: one self-contained HTML file, PNG/SVG figures, CSV tables, the audit log.

* **HTML**: ``plotly.io.to_html`` embeds plotly.js once (``include_plotlyjs=True`` for the first
  figure, ``False`` after), so the file opens offline, stays interactive and loads no CDN script.
* **PNG/SVG**: plotly's kaleido 1.x renders through a Chrome/Chromium binary driven by
  choreographer. The binary is looked up as ``$BROWSER_PATH`` (choreographer's own variable), then
  ``chromium``, ``chromium-browser``, ``google-chrome`` on ``PATH``. Without one, or when the
  browser fails, :class:`ExportUnavailable` says so in one sentence; HTML and CSV still work.
* **CSV**: ``DataFrame.to_csv(index=False)``; list/tuple cells are written as their ``str`` (raw numbers;
  the HTML tables are the readable ones, :func:`sahc_core.figures.format.display_table`).
"""
from __future__ import annotations

import html
import io
import os
import re
import shutil
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from sahc_core.errors import SahcError

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from sahc_core.report.build import Report

BROWSER_ENV = "BROWSER_PATH"
_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
IMAGE_FORMATS = ("png", "svg")
_INSTALL_HINT = "install Chromium (Debian: apt-get install -y chromium) or set BROWSER_PATH to a Chrome binary"


class ExportUnavailable(SahcError):
    """An image export that cannot run here (no Chrome/Chromium, or the browser failed)."""


def browser_path() -> str | None:
    """The Chrome/Chromium binary kaleido will use, or ``None`` when there is none."""
    env = os.environ.get(BROWSER_ENV, "").strip()
    if env:
        return env if Path(env).is_file() and os.access(env, os.X_OK) else None
    for name in _BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def slug(text: str) -> str:
    """File-name-safe lower-case slug (``"Spectrum verdict"`` -> ``"spectrum-verdict"``)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "item"


# -- images --------------------------------------------------------------------------------------
def figure_images(figures: Mapping[str, go.Figure], fmt: str = "png", width: int = 1100, height: int | None = None,
                  scale: float = 2.0) -> dict[str, bytes]:
    """Render figures to PNG or SVG bytes with one browser session.

    Parameters
    ----------
    figures : mapping of name -> plotly Figure
    fmt : {"png", "svg"}
    width, height : int
        Pixel size (height defaults to the figure's own layout height, else 550).
    scale : float
        PNG pixel density (2 = crisp on slides).

    Returns
    -------
    dict of name -> bytes

    Raises
    ------
    ExportUnavailable
        No Chrome/Chromium binary, or kaleido/the browser failed.
    ValueError
        ``fmt`` is not png or svg.
    """
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {fmt!r}.")
    if not figures:
        return {}
    browser = browser_path()
    if browser is None:
        raise ExportUnavailable(f"PNG/SVG export needs a Chrome/Chromium browser and none was found: {_INSTALL_HINT} "
                                "(the HTML report and the CSV tables do not need it).")
    import kaleido

    out: dict[str, bytes] = {}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sahc-img-") as tmp:
        jobs = []
        for name, fig in figures.items():
            h = height or fig.layout.height or 550
            path = Path(tmp) / f"{slug(name)}.{fmt}"
            jobs.append({"fig": fig, "path": path,
                         "opts": {"format": fmt, "width": width, "height": h, "scale": scale}})
        try:
            # mathjax=False: kaleido would otherwise fetch MathJax from a CDN (no network here).
            kaleido.write_fig_from_object_sync(jobs, kopts={"path": browser, "mathjax": False})
        except Exception as exc:  # noqa: BLE001 - kaleido raises many types; the user needs one sentence
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportUnavailable(f"the browser at {browser} could not render the figures ({first[:160]}); "
                                    f"{_INSTALL_HINT}.") from exc
        for name, job in zip(figures, jobs):
            p = Path(job["path"])
            if not p.is_file() or p.stat().st_size == 0:
                raise ExportUnavailable(f"the browser at {browser} produced no image for {name!r}; {_INSTALL_HINT}.")
            out[name] = p.read_bytes()
    return out


# -- CSV -----------------------------------------------------------------------------------------
def table_csv(df: pd.DataFrame) -> str:
    """CSV text of a table (no index; list/tuple/dict cells as text)."""
    def cell(v):
        return str(v) if isinstance(v, list | tuple | dict) else v
    return df.apply(lambda col: col.map(cell) if col.dtype == object else col).to_csv(index=False)


# -- HTML ----------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#1b1f24;line-height:1.45;padding:0 1rem}
h1{font-size:2rem;margin-bottom:.2rem} h2{font-size:1.45rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
h3{font-size:1.15rem;margin-top:1.4rem}
.meta{color:#57606a;font-size:.9rem} .caption{font-size:1.1rem;font-weight:600;margin:.4rem 0 .6rem}
.note{color:#57606a;font-size:.9rem;margin:.2rem 0 .8rem}
.warning{background:#fff8c5;border:1px solid #d4a72c;padding:.4rem .6rem;border-radius:6px}
table{border-collapse:collapse;font-size:.88rem;margin:.5rem 0 1rem} th,td{border:1px solid #d0d7de;padding:.25rem .5rem;
text-align:right} th{background:#f6f8fa} td:first-child,th:first-child{text-align:left}
"""


def _table_html(df: pd.DataFrame) -> str:
    from sahc_core.figures.format import display_table

    return display_table(df).to_html(index=False, border=0, escape=True)


def report_html(report: Report, study: Mapping[str, pd.DataFrame] | None = None,
                study_notes: Mapping[str, str] | None = None) -> str:
    """The whole report as one self-contained HTML document (plotly.js embedded once, no CDN).

    Parameters
    ----------
    report : Report
        From :func:`sahc_core.report.build.build_report`.
    study : mapping of title -> DataFrame, optional
        The "reproduce the study" tables (:func:`sahc_core.report.study.reproduce_study`), appended.
    study_notes : mapping of title -> str, optional
        One line under each study table.
    """
    import plotly.io as pio

    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(report.title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(report.title)}</h1>",
             f"<p class='meta'>{html.escape(report.subtitle)}</p>"]
    plotly_included = False
    for sec in report.sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        parts.append(f"<p class='caption'>{html.escape(sec.caption)}</p>")
        for note in sec.notes:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
        for warning in sec.warnings:
            parts.append(f"<p class='warning'>⚠ {html.escape(warning)}</p>")
        for fig in sec.figures:
            parts.append(pio.to_html(fig, full_html=False, include_plotlyjs=not plotly_included,
                                     config={"displaylogo": False, "responsive": True}))
            plotly_included = True
        if sec.table is not None and len(sec.table):
            parts.append(_table_html(sec.table))
    if study:
        parts.append("<h2>Reproduce the study</h2>")
        for title, df in study.items():
            parts.append(f"<h3>{html.escape(title)}</h3>")
            if study_notes and study_notes.get(title):
                parts.append(f"<p class='note'>{html.escape(study_notes[title])}</p>")
            parts.append(_table_html(df))
    parts.append("</body></html>")
    return "\n".join(parts)


# -- everything at once ---------------------------------------------------------------------------
def report_tables(report: Report, study: Mapping[str, pd.DataFrame] | None = None) -> dict[str, pd.DataFrame]:
    """Every table of the report (and the study), file stem -> DataFrame."""
    tables = {slug(s.key): s.table for s in report.sections if s.table is not None}
    for title, df in (study or {}).items():
        tables[f"study-{slug(title)}"] = df
    return tables


def report_figures(report: Report) -> dict[str, go.Figure]:
    """Every figure of the report, file stem -> Figure (``<section key>`` or ``<key>-<i>``)."""
    out = {}
    for s in report.sections:
        for i, fig in enumerate(s.figures):
            out[slug(s.key) if len(s.figures) == 1 else f"{slug(s.key)}-{i + 1}"] = fig
    return out


def zip_bytes(files: Mapping[str, bytes | str]) -> bytes:
    """A zip archive (deflated) of ``{name: content}``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buf.getvalue()


def check_out_dir(out_dir: str | Path) -> Path:
    """The resolved export folder, checked before any work: a folder, or creatable in a writable one.

    Raises
    ------
    SahcError
        When the path is a file (or lies under one), or its nearest existing folder is not writable.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise SahcError(f"the export path {out} is a file, not a folder; choose a folder for --out (it is created "
                        "when missing).")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise SahcError(f"cannot create the export folder {out}: {existing} is a file, not a folder; choose "
                        "another --out.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SahcError(f"cannot write the export folder {out}: {existing} is not writable; choose a writable --out.")
    return out


def write_report(report: Report, out_dir: str | Path, study: Mapping[str, pd.DataFrame] | None = None,
                 study_notes: Mapping[str, str] | None = None, audit: pd.DataFrame | None = None,
                 image_formats: Iterable[str] = IMAGE_FORMATS) -> dict:
    """Write ``report.html``, ``tables/*.csv``, ``audit_log.csv`` and ``figures/*.{png,svg}``.

    Files are written to a temporary name and renamed, so a crash leaves no half-written file under
    the final name. Image export failing (no browser) is reported in ``images_error``, not raised.

    Returns
    -------
    dict
        ``out_dir``, ``html``, ``tables`` (paths), ``audit_log`` (path or None), ``figures`` (paths),
        ``images_error`` (one sentence or None).
    """
    out = check_out_dir(out_dir)
    try:
        (out / "tables").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SahcError(f"cannot create the export directory {out} ({exc.strerror}); choose a writable --out.") from exc
    written: dict = {"out_dir": str(out), "tables": [], "figures": [], "audit_log": None, "images_error": None}
    written["html"] = str(_atomic_write(out / "report.html", report_html(report, study, study_notes)))
    for stem, df in report_tables(report, study).items():
        written["tables"].append(str(_atomic_write(out / "tables" / f"{stem}.csv", table_csv(df))))
    if audit is not None:
        written["audit_log"] = str(_atomic_write(out / "audit_log.csv", table_csv(audit)))
    figures = report_figures(report)
    formats = [f for f in image_formats]
    if figures and formats:
        (out / "figures").mkdir(exist_ok=True)
        try:
            for fmt in formats:
                for name, data in figure_images(figures, fmt).items():
                    written["figures"].append(str(_atomic_write(out / "figures" / f"{slug(name)}.{fmt}", data)))
        except ExportUnavailable as exc:
            written["images_error"] = str(exc)
    return written


def _atomic_write(path: Path, content: str | bytes) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            tmp.write_bytes(content)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SahcError(f"cannot write {path} ({exc.strerror}); free some space or choose another --out.") from exc
    return path
