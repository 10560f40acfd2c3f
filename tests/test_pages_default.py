"""One AppTest per page through app.py on the real embedded default model (SmolLM2-135M).

The first test that needs it converts the GGUF once into cache/models (about 30 s on 2 cores);
later tests reuse the converted directory.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGES = ["model", "spectrum", "whatif", "budget", "runs", "report"]


@pytest.fixture()
def app(monkeypatch, tmp_path) -> AppTest:
    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_path"] = ""  # empty = the embedded default
    return at.run()


@pytest.mark.parametrize("page", PAGES)
def test_every_page_on_the_default_model(app: AppTest, page: str):
    assert not app.exception
    app.switch_page(f"app_pages/{page}.py").run()
    assert not app.exception, app.exception
    assert not app.error, [e.value for e in app.error]
    assert app.title[0].value.lower().replace("-", "") == page


def test_model_page_facts_of_the_default_model(app: AppTest):
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Architecture"] == "llama"
    assert metrics["Parameters"] == "134.5 M"
    assert metrics["Embedding / LM head share"] == "21.0%"  # 49152*576 / 134,515,008, tied counted once
    assert any("4-bit" in i.value for i in app.info), "the GGUF provenance note must be shown"


def test_spectrum_of_a_default_ffn_tensor(app: AppTest):
    app.switch_page("app_pages/spectrum.py").run()
    app.selectbox(key="sp_component").select("ffn").run()
    app.selectbox(key="sp_layer").select(15).run()
    app.selectbox(key="sp_tensor").select("model.layers.15.mlp.gate_proj.weight").run()
    assert not app.exception and not app.error
    stats = app.dataframe[0].value
    assert stats["Tensor"].tolist() == ["model.layers.15.mlp.gate_proj.weight"]
    assert 0.5 < int(stats["Min rank for error 0.1"].iloc[0].replace(",", "")) / 576 <= 1.0  # trained FFN: near full rank
