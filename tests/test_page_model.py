"""AppTest of the Model page, through app.py (the router), on a tiny model and on a bad path."""
from __future__ import annotations

from pathlib import Path

from apptest_helpers import install_widget_coverage
from streamlit.testing.v1 import AppTest

from sahc_core.figures.format import no_raw_cells

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def _app(model_path: str, monkeypatch, tmp_path) -> AppTest:
    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["model_path"] = model_path
    return at.run()


def test_model_page_tiny_qwen35(tiny_qwen35_dir, monkeypatch, tmp_path):
    at = _app(str(tiny_qwen35_dir), monkeypatch, tmp_path)
    assert not at.exception
    assert at.title[0].value == "Model"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Architecture"] == "qwen3_5"
    assert not at.error
    # the tensor filter narrows the table
    at.text_input(key="model_filter").input("mtp").run()
    assert not at.exception
    df = at.dataframe[-1].value
    assert len(df) > 0 and df["name"].str.contains("mtp").all()


def test_model_page_bad_path(monkeypatch, tmp_path):
    at = _app(str(tmp_path / "does-not-exist"), monkeypatch, tmp_path)
    assert not at.exception
    assert at.error and "does-not-exist" in at.error[0].value


def test_every_widget_of_the_model_page_on_the_default_model(monkeypatch, tmp_path):
    cov = install_widget_coverage(monkeypatch)
    at = _app("", monkeypatch, tmp_path)
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Parameters"] == "134.5 M"
    shares = at.dataframe[0].value
    assert not no_raw_cells(shares), no_raw_cells(shares)
    # counts with thousands separators, not 28311552 beside "134.5 M"
    assert shares.set_index("Component").loc["Embedding / LM head", "Parameters"] == "28,311,552"
    at.text_input(key="model_filter").input("embed").run()
    assert at.dataframe[-1].value["name"].tolist() == ["model.embed_tokens.weight"]
    at.multiselect(key="model_components").set_value(["ffn"]).run()
    assert any("No tensor matches" in i.value for i in at.info)  # an empty state that says what to do
    at.text_input(key="model_filter").input("").run()
    assert set(at.dataframe[-1].value["component"]) == {"FFN"} and len(at.dataframe[-1].value) == 90
    at.download_button(key="model_download").click().run()
    at.text_input(key="model_path").input(str(tmp_path / "nowhere")).run()
    assert at.error and "nowhere" in at.error[0].value
    at.text_input(key="model_path").input("").run()
    assert not at.exception and not at.error
    assert not cov.missing(), cov.missing()
