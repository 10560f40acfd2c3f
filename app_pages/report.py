"""Report page: the model's story with computed captions, presentation mode, study tables, exports."""
from __future__ import annotations

import streamlit as st

import app_frontier
import app_state
from sahc_core.errors import SahcError
from sahc_core.figures.style import slide_figure
from sahc_core.report.export import ExportUnavailable, figure_images, report_figures, report_html, report_tables, \
    table_csv, zip_bytes

#: session_state key of the rendered PNG + SVG zip (NOT the render button's own key: Streamlit forbids
#: writing a widget's key after the widget was drawn).
IMAGES = "report_images_zip"

_PRESENT_CSS = """<style>
section[data-testid="stSidebar"], header[data-testid="stHeader"], [data-testid="stSidebarCollapsedControl"]
{display:none}
.block-container{max-width:100% !important;padding:1.5rem 3rem}
html, body, [data-testid="stMarkdownContainer"] p{font-size:1.35rem}
h1{font-size:2.6rem !important} h2, h3{font-size:1.9rem !important}
</style>"""


def _progress_cb(bar):
    def update(done: int, total: int, what: str = "", *_):
        bar.progress(min(1.0, done / total) if total else 1.0, text=f"{what} ({done}/{total})")
    return update


def controls_ui(fp: str) -> tuple[float, bool, bool]:
    """Widgets (hidden in presentation mode): target ratio, build, study buttons."""
    c1, c2, c3, c4 = st.columns([1.2, 1, 1.2, 1])
    target = c1.number_input("Target total ratio (embedding wall)", min_value=1.01, max_value=1000.0, value=5.0,
                             step=0.5, key="report_target")
    build = c2.button("Build the report", type="primary", key="report_build")
    study = c3.button("Reproduce the study tables", key="report_study")
    c4.button("Presentation mode", key="report_present_on", help="Wide layout, large fonts, no widgets.",
              on_click=lambda: st.session_state.update(present_mode=True))
    return float(target), build, study


def show_report(report, present: bool) -> None:
    st.header(report.title)
    st.caption(report.subtitle)
    for sec in report.sections:
        st.subheader(sec.title)
        if sec.error:
            st.error(sec.error)
            continue
        st.markdown(f"**{sec.caption}**")
        for note in sec.notes:
            st.caption(note)
        for warning in sec.warnings:
            st.warning(warning)
        for i, fig in enumerate(sec.figures):
            st.plotly_chart(slide_figure(fig) if present else fig, width="stretch", key=f"report-{sec.key}-{i}",
                            theme=None if present else "streamlit")
        if sec.table is not None and len(sec.table) and not present:
            with st.expander("Table"):
                app_state.show_table(sec.table)


def exports_ui(report, study, audit) -> None:
    st.subheader("Export")
    c1, c2, c3 = st.columns(3)
    html_doc = report_html(report, study.tables if study else None, study.notes if study else None)
    c1.download_button("Report (self-contained HTML)", html_doc, "sahc-report.html", "text/html", key="dl_html")
    files = {f"tables/{k}.csv": table_csv(v) for k, v in report_tables(report, study.tables if study else None).items()}
    if audit is not None:
        files["audit_log.csv"] = table_csv(audit)
    c2.download_button("Tables + audit log (CSV, zip)", zip_bytes(files), "sahc-tables.zip", "application/zip",
                       key="dl_csv")
    if c3.button("Render figures as PNG + SVG", key="report_render_images"):
        try:
            figs = report_figures(report)  # the very figures of the HTML report
            with st.spinner(f"Rendering {len(figs)} figures with Chromium (about 30 s)…"):
                imgs = {f"{k}.png": v for k, v in figure_images(figs, "png").items()}
                imgs |= {f"{k}.svg": v for k, v in figure_images(figs, "svg").items()}
            st.session_state[IMAGES] = zip_bytes(imgs)
        except ExportUnavailable as exc:
            st.warning(str(exc))
    if st.session_state.get(IMAGES):
        c3.download_button("Figures (PNG + SVG, zip)", st.session_state[IMAGES], "sahc-figures.zip",
                           "application/zip", key="dl_images")


st.title("Report")
source = app_state.current_source()
if source is None:
    st.stop()
cache = app_state.current_cache()
present = bool(st.session_state.get("present_mode", False))
fp = source.fingerprint
if present:
    st.markdown(_PRESENT_CSS, unsafe_allow_html=True)
    target, build, want_study = 5.0, False, False
else:
    target, build, want_study = controls_ui(fp)

try:
    if build:
        from sahc_core.report.sections import build_report

        bar = st.progress(0.0, text="building the report…")
        st.session_state["report"] = (fp, build_report(source, cache, target_ratio=target, progress=_progress_cb(bar)))
        st.session_state.pop(IMAGES, None)
        bar.empty()
    if want_study:
        from sahc_core.report.study import reproduce_study

        bar = st.progress(0.0, text="reproducing the study tables…")
        st.session_state["report_study_tables"] = (fp, reproduce_study(source, cache, progress=_progress_cb(bar)))
        bar.empty()
except (SahcError, ValueError) as exc:
    app_state.show_error(exc)

stored = st.session_state.get("report")
report = stored[1] if stored and stored[0] == fp else None
stored_study = st.session_state.get("report_study_tables")
study = stored_study[1] if stored_study and stored_study[0] == fp else None

if report is None and study is None:
    st.info("Press **Build the report** to compute (or read from the cache) the five figures of this model's "
            "story, or **Reproduce the study tables** for the reference study's tables.")
if report is not None:
    show_report(report, present)
if study is not None:
    st.header("Reproduce the study")
    for title, df in study.tables.items():
        st.subheader(title)
        st.caption(study.notes.get(title, ""))
        app_state.show_table(df)
if cache is not None:
    app_frontier.frontier_section(cache, fp, "report")
if present:
    st.button("Exit presentation mode", key="report_exit", on_click=lambda: st.session_state.update(present_mode=False))
elif report is not None:
    from sahc_core.gates import audit_log

    try:
        audit = audit_log(cache, model_fp=fp) if cache is not None else None
    except SahcError as exc:
        app_state.show_error(exc)
        audit = None
    exports_ui(report, study, audit)
