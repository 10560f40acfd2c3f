"""The app in a real browser: every page loads without an exception block, the Spectrum page draws a
plot for a selected tensor, a What-if slider changes the ratio, a run starts and shows its progress.

Run with ``pytest -m browser`` (Debian chromium + Playwright). Screenshots of each page land in
``test-artifacts/screenshots/``.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

MODEL_INPUT = "Local HuggingFace model directory"

pytestmark = pytest.mark.browser

SHOT_DIR = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"

PAGES = ["Model", "Spectrum", "What-if", "Budget", "Runs", "Report"]
EXC = '[data-testid="stException"]'


def wait_idle(page, timeout: float = 120.0) -> None:
    """Until the script run finished: the app's run state is ``notRunning`` for a moment.

    The state is the attribute the Streamlit frontend keeps on its root element (the app's busy
    indicator keys on it too); Streamlit's own status widget is not drawn in this layout.
    """
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        state = page.evaluate("() => { const a = document.querySelector('[data-testid=stApp]');"
                              " return a ? a.getAttribute('data-test-script-state') : null; }")
        if state != "notRunning":
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 1.0:
            return
        page.wait_for_timeout(200)
    raise AssertionError("the app kept running for too long")


def set_model(page, model: str) -> None:
    """Type the model directory; retried because keys typed while the first run renders can be lost."""
    shown = page.locator('[data-testid="stSidebar"] code', has_text=model).first
    for _ in range(3):
        box = page.get_by_label(MODEL_INPUT, exact=True)
        box.click()
        box.fill(model)
        box.press("Enter")
        try:
            shown.wait_for(timeout=20_000)
            break
        except Exception:  # noqa: BLE001 - playwright TimeoutError; retry the typing
            page.screenshot(path=str(SHOT_DIR / "debug-set-model.png"))
    shown.wait_for(timeout=5_000)
    wait_idle(page)


def open_app(page, url: str, model: str | None) -> None:
    page.goto(url)
    page.get_by_label(MODEL_INPUT, exact=True).wait_for()
    page.locator("h1").first.wait_for()
    wait_idle(page)
    if model is not None:
        set_model(page, model)


def goto(page, title: str, model: str | None = None) -> None:
    """Open a page from the sidebar; re-type ``model`` if the page switch lost it (see the test below)."""
    page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()
    page.locator("h1", has_text=title).first.wait_for()
    wait_idle(page)
    if model is not None and page.get_by_label(MODEL_INPUT, exact=True).input_value() != model:
        set_model(page, model)


def test_model_path_survives_a_page_switch(page, server, tiny_model):
    """The typed model directory must stay selected on every page (app.py keeps the widget state)."""
    open_app(page, server.url, str(tiny_model))
    goto(page, "Spectrum")
    page.wait_for_timeout(3000)
    assert page.get_by_label(MODEL_INPUT, exact=True).input_value() == str(tiny_model)
    assert page.locator('[data-testid="stSidebar"] code', has_text=str(tiny_model)).count() == 1


def no_exception(page) -> None:
    assert page.locator(EXC).count() == 0, page.locator(EXC).first.inner_text()


def test_every_page_loads_tiny_model(page, server, tiny_model, shots):
    open_app(page, server.url, str(tiny_model))
    for title in PAGES:
        goto(page, title, str(tiny_model))
        no_exception(page)
        assert page.locator('[data-testid="stAlertContentError"]').count() == 0, \
            page.locator('[data-testid="stAlertContentError"]').first.inner_text()
        page.screenshot(path=str(shots / f"tiny-{title.lower().replace('-', '')}.png"), full_page=True)


def _first_trace_name(page) -> str | None:
    return page.evaluate("() => { const g = document.querySelector('.js-plotly-plot');"
                         " return g && g.data && g.data.length ? String(g.data[0].name) : null; }")


def test_spectrum_selecting_a_tensor_draws_a_plot(page, server, tiny_model, shots):
    open_app(page, server.url, str(tiny_model))
    goto(page, "Spectrum", str(tiny_model))
    page.locator(".js-plotly-plot").first.wait_for()
    before = _first_trace_name(page)
    box = page.locator('[data-testid="stSelectbox"]', has_text="Tensor").first
    box.click()
    options = page.locator('[role="option"]')
    options.first.wait_for()
    texts = [t.strip() for t in options.all_inner_texts()]
    target = next(t for t in texts if t and t not in (before or ""))
    options.filter(has_text=target).first.click()
    wait_idle(page)
    page.locator(".js-plotly-plot").first.wait_for()
    no_exception(page)
    after = _first_trace_name(page)
    assert after != before and target in (after or ""), (before, after, target)
    n_points = page.evaluate("() => Math.max(0, ...document.querySelector('.js-plotly-plot').calcdata"
                             ".map(c => c.length))")  # points plotly actually computed
    assert n_points >= 2
    page.screenshot(path=str(shots / "tiny-spectrum-selected.png"), full_page=True)


def _ratio(page) -> str:
    metric = page.locator('[data-testid="stMetric"]', has_text="Projected ratio").first
    return metric.locator('[data-testid="stMetricValue"]').inner_text()


def test_whatif_slider_changes_the_ratio(page, server, tiny_model, shots):
    open_app(page, server.url, str(tiny_model))
    goto(page, "What-if", str(tiny_model))
    before = _ratio(page)
    thumb = page.locator('input[type="range"][aria-label="bits" i]').first  # react-aria slider ("bits" since the registry)
    assert thumb.input_value() == "4"
    thumb.focus()
    for _ in range(2):
        thumb.press("ArrowLeft")
    wait_idle(page)
    page.wait_for_function("(b) => { const m = [...document.querySelectorAll('[data-testid=stMetric]')]"
                           ".find(e => e.innerText.includes('Projected ratio'));"
                           " return m && !m.innerText.includes(b); }", arg=before)
    after = _ratio(page)
    no_exception(page)
    assert float(after.rstrip("x")) > float(before.rstrip("x")), (before, after)  # fewer bits: higher ratio
    page.screenshot(path=str(shots / "tiny-whatif-slider.png"), full_page=True)


def test_default_model_run_launches_and_shows_progress(page, server, shots):
    """The one test on the embedded default model: start a run, see its progress, cancel it."""
    open_app(page, server.url, None)
    no_exception(page)
    page.screenshot(path=str(shots / "default-model.png"), full_page=True)
    goto(page, "Runs")
    page.get_by_label("Max tokens (0 = whole text)", exact=True).fill("256")
    page.get_by_label("Max tokens (0 = whole text)", exact=True).press("Enter")
    wait_idle(page)
    page.get_by_role("button", name="Start run").click()
    page.get_by_text(re.compile(r"Run \S+ started")).wait_for()
    progress = page.locator('[data-testid="stProgress"]')
    progress.first.wait_for(timeout=90_000)
    text = page.locator('[data-testid="stProgress"]').first.inner_text()
    assert "browser-int8" in text and "stage" in text, text
    no_exception(page)
    page.screenshot(path=str(shots / "default-runs-progress.png"), full_page=True)
    page.get_by_role("button", name="Cancel").first.click()
    from sahc_core.cache import Cache
    from sahc_core.runs.jobs import list_runs

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and list_runs(Cache(server.cache))["status"].isin(["queued", "running"]).any():
        time.sleep(1)
    assert list_runs(Cache(server.cache))["status"].tolist() == ["cancelled"]


def test_report_build_and_presentation_mode(page, server, tiny_model, shots):
    open_app(page, server.url, str(tiny_model))
    goto(page, "Report", str(tiny_model))
    page.get_by_role("button", name="Build the report").click()
    page.get_by_text(re.compile(r"5\. Runs: ratio vs perplexity")).wait_for(timeout=300_000)
    wait_idle(page)
    no_exception(page)
    assert page.get_by_text(re.compile(r"FFN needs \d+ % of full rank")).count() >= 1
    assert page.locator(".js-plotly-plot").count() >= 5
    page.screenshot(path=str(shots / "tiny-report-built.png"), full_page=True)
    page.get_by_role("button", name="Presentation mode").click()
    page.get_by_role("button", name="Exit presentation mode").wait_for()
    wait_idle(page)
    no_exception(page)
    assert not page.locator('[data-testid="stSidebar"]').is_visible()
    assert page.get_by_role("button", name="Build the report").count() == 0
    page.screenshot(path=str(shots / "tiny-report-presentation.png"), full_page=False)


@pytest.mark.parametrize("path", ["runs", "spectrum"])
def test_a_page_url_opened_directly_goes_through_the_router(page, server, path):
    """/runs opened directly must show the router's sidebar (model picker), not a bare page file."""
    open_app(page, f"{server.url.rstrip('/')}/{path}", None)
    no_exception(page)
    assert page.locator('[data-testid="stSidebarNav"] a', has_text="What-if").count() == 1
    assert page.get_by_label(MODEL_INPUT, exact=True).count() == 1
