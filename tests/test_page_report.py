"""AppTest of the Report page on the embedded default model: every widget once, the PNG + SVG export (the
issue's crash), presentation mode, readable tables.

``build_report`` (5 min on the default model from an empty cache) is patched to return the tiny llama's
report, which tests/test_report.py builds and checks; ``reproduce_study`` likewise (tests/test_study.py);
the Chromium rendering behind ``figure_images`` is patched with a renderer that tags each image with its
figure's title (tests/test_report.py and the browser suite render for real).
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from apptest_helpers import install_widget_coverage
from streamlit.testing.v1 import AppTest

from sahc_core.figures.format import no_raw_cells

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture(scope="module")
def tiny_report(tiny_llama_report):
    """The tiny llama's report (conftest.py) and its study tables."""
    from sahc_core.report.study import reproduce_study

    src, cache, report, _ = tiny_llama_report
    return report, reproduce_study(src, cache, device="cpu", with_tt=False)


def _fake_images(figures, fmt="png", **_):
    """Stands in for Chromium: one 'image' per figure naming its format and its title."""
    return {name: f"{fmt}:{fig.layout.title.text or ''}:{len(fig.data)}".encode() for name, fig in figures.items()}


@pytest.fixture()
def report_app(tiny_report, monkeypatch, tmp_path):
    import sahc_core.report.export as export
    import sahc_core.report.sections as sections
    import sahc_core.report.study as study

    report, tables = tiny_report
    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    monkeypatch.setattr(sections, "build_report", lambda *a, progress=None, **k: (progress(1, 1, "report"), report)[1])
    monkeypatch.setattr(study, "reproduce_study", lambda *a, progress=None, **k: tables)
    monkeypatch.setattr(export, "figure_images", _fake_images)
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_path"] = ""
    at.run()
    return at


def test_every_widget_of_the_report_page(report_app, tiny_report, monkeypatch):
    from sahc_core.report.export import report_figures

    at = report_app
    cov = install_widget_coverage(monkeypatch)
    at.switch_page("app_pages/report.py").run()
    assert not at.exception
    assert any("Build the report" in i.value for i in at.info)  # the empty state says what to do
    at.text_input(key="model_path").input("").run()
    at.number_input(key="report_target").set_value(4.0).run()
    at.button(key="report_build").click().run()
    at.button(key="report_study").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    for d in at.dataframe:  # section and study tables: human headers, no None / JSON / snake_case
        assert not no_raw_cells(d.value), no_raw_cells(d.value)
    at.download_button(key="dl_html").click().run()
    at.download_button(key="dl_csv").click().run()
    # the button of the StreamlitWidgetAlreadyInstantiatedError
    at.button(key="report_render_images").click().run()
    assert not at.exception, at.exception
    zf = zipfile.ZipFile(io.BytesIO(at.session_state["report_images_zip"]))
    figs = report_figures(tiny_report[0])  # the HTML report's figures
    assert sorted(zf.namelist()) == sorted([f"{k}.png" for k in figs] + [f"{k}.svg" for k in figs])
    for k, fig in figs.items():
        assert zf.read(f"{k}.svg").decode() == f"svg:{fig.layout.title.text or ''}:{len(fig.data)}"
    at.download_button(key="dl_images").click().run()
    at.button(key="report_present_on").click().run()
    assert [b.key for b in at.button] == ["report_exit"]  # no widgets but the way out
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert charts and all(c["layout"]["font"]["size"] >= 18 for c in charts)  # projector sizes
    at.button(key="report_exit").click().run()
    assert not at.exception and any(b.key == "report_build" for b in at.button)
    assert not cov.missing(), cov.missing()


def test_a_render_failure_is_one_warning(report_app, monkeypatch):
    import sahc_core.report.export as export

    def no_browser(*a, **k):
        raise export.ExportUnavailable("PNG/SVG export needs a Chrome/Chromium browser and none was found.")
    monkeypatch.setattr(export, "figure_images", no_browser)
    at = report_app
    at.switch_page("app_pages/report.py").run()
    at.button(key="report_build").click().run()
    at.button(key="report_render_images").click().run()
    assert not at.exception
    assert any("Chrome/Chromium" in w.value for w in at.warning)
    assert "report_images_zip" not in at.session_state
