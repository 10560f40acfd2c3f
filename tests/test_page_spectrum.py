"""AppTest of the Spectrum page on the tiny llama fixture (cache in tmp)."""
from __future__ import annotations

import re
from pathlib import Path

from apptest_helpers import run_page
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "app_pages" / "spectrum.py")


def _page(model_dir, monkeypatch, tmp_path) -> AppTest:
    return run_page("spectrum", model_dir, monkeypatch, tmp_path)


def _charts(at: AppTest) -> set[str]:
    return {c.key for c in at.get("plotly_chart")}


def test_select_a_tensor_and_the_plots_appear(tiny_llama_dir, monkeypatch, tmp_path):
    at = _page(str(tiny_llama_dir), monkeypatch, tmp_path)
    assert not at.exception and not at.error
    at.selectbox(key="sp_component").select("ffn").run()
    at.selectbox(key="sp_layer").select(1).run()
    at.selectbox(key="sp_tensor").select("model.layers.1.mlp.down_proj.weight").run()
    assert not at.exception and not at.error
    assert {"sp_fig_sigma", "sp_fig_norm", "sp_fig_err", "sp_fig_energy"} <= _charts(at)
    stats = at.dataframe[0].value
    assert stats["name"].tolist() == ["model.layers.1.mlp.down_proj.weight"]
    assert any("Device: **cpu**" in c.value for c in at.caption)
    # all projections of this layer overlaid, then the whole-model scan fills the heatmaps
    at.radio(key="sp_mode").set_value("All projections of this layer").run()
    assert len(at.dataframe[0].value) == 3
    # the FFN tensors shown so far are cached: the FFN scan is partly done, its ETA from their measured times
    assert any(re.fullmatch(r"Scan: [3-5]/6 tensors done · ETA \d+\.\d min", c.value) for c in at.caption)
    at.radio(key="sp_scope").set_value("Whole model").run()
    at.button(key="sp_scan").click().run()
    assert not at.exception and not at.error
    assert {"sp_heat_rank", "sp_heat_stable"} <= _charts(at)
    assert any("15 tensor(s) scanned" in c.value for c in at.caption)
    at.run()  # the scan status (computed before the button) now counts every tensor
    assert any(c.value == "Scan: 15/15 tensors done" for c in at.caption)


def test_bad_model_path_is_one_error(monkeypatch, tmp_path):
    at = _page(str(tmp_path / "missing"), monkeypatch, tmp_path)
    assert not at.exception
    assert at.error and "missing" in at.error[0].value


def test_spectrum_page_through_the_router(tiny_llama_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    at = AppTest.from_file(str(Path(PAGE).parents[1] / "app.py"), default_timeout=120)
    at.session_state["model_path"] = str(tiny_llama_dir)
    at.run()
    at.switch_page("app_pages/spectrum.py").run()
    assert not at.exception and not at.error
    assert at.title[0].value == "Spectrum" and "sp_fig_err" in _charts(at)
