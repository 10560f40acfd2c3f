"""The report: sections with computed captions, the reference study's tables, and exports (HTML, PNG/SVG, CSV)."""
from sahc_core._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "build": ("Report", "ReportSection"),
    "sections": ("build_report",),
    "study": ("StudyTables", "reproduce_study"),
    "export": ("write_report", "report_html"),
})
