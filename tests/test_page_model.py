"""AppTest of the Model page, through app.py (the router), on a tiny model and on a bad path."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

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
