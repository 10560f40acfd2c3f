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
    assert stats["Tensor"].tolist() == ["model.layers.1.mlp.down_proj.weight"]
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


def test_every_widget_of_the_spectrum_page_on_the_default_model(monkeypatch, tmp_path):
    """Every widget once on the embedded default model; the across-layers view is coloured by depth.

    ``scan`` (minutes for the whole default model) is patched to the spectra already cached by the views
    above plus ``cached_scan``; tests/test_scan.py covers the real scan.
    """
    import json

    import sahc_core.spectra.scan as scan_mod
    from apptest_helpers import install_widget_coverage

    from sahc_core.figures.format import no_raw_cells

    monkeypatch.setattr(scan_mod, "scan", lambda source, component=None, cache=None, device="auto", progress=None:
                        (progress(1, 1, "model.layers.0.self_attn.k_proj.weight", 0.0),
                         scan_mod.cached_scan(source, cache, component))[1])
    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    at = AppTest.from_file(str(Path(PAGE).parents[1] / "app.py"), default_timeout=300)
    at.session_state["model_path"] = ""
    at.run()
    cov = install_widget_coverage(monkeypatch)
    at.switch_page("app_pages/spectrum.py").run()
    at.text_input(key="model_path").input("").run()
    at.selectbox(key="sp_component").select("attention_full").run()
    at.selectbox(key="sp_layer").select(3).run()
    at.selectbox(key="sp_tensor").select("model.layers.3.self_attn.k_proj.weight").run()
    at.selectbox(key="sp_device").select("cpu").run()
    at.radio(key="sp_mode").set_value("This projection across layers").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    fig = json.loads(next(c for c in at.get("plotly_chart") if c.key == "sp_fig_sigma").proto.spec)
    bands = [t for t in fig["data"] if t.get("fill") == "toself"]
    assert len(bands) == 1 and "median of 30" in bands[0]["name"]  # ONE MP band, not 30
    assert fig["layout"]["showlegend"] is False  # a depth colorbar instead of a 30-entry legend
    assert any(t.get("marker", {}).get("colorbar", {}).get("title", {}).get("text") == "layer" for t in fig["data"])
    assert "_" not in fig["layout"]["yaxis"]["title"]["text"]  # σ<sub>i</sub>, not σ_i
    assert fig["layout"]["yaxis"]["dtick"] == 1  # decades only
    stats = at.dataframe[0].value
    assert len(stats) == 30 and not no_raw_cells(stats), no_raw_cells(stats)
    at.radio(key="sp_mode").set_value("This tensor").run()  # the rest on one tensor: each rerun stays quick
    at.multiselect(key="sp_extra").set_value(["model.layers.0.mlp.down_proj.weight"]).run()
    at.download_button(key="sp_download_stats").click().run()
    at.radio(key="sp_scope").set_value("Whole model").run()
    at.button(key="sp_scan").click().run()
    assert not at.exception and not at.error
    assert {"sp_heat_rank", "sp_heat_stable"} <= _charts(at)
    at.download_button(key="sp_download_scan").click().run()
    # calibration statistics take a minute on the default model (tests/test_calib*.py capture them for real):
    # here the capture fails with a user-facing error, which the page shows in one line, then the box is cleared
    import sahc_core.calib.store as store
    from sahc_core.errors import SahcError

    def no_capture(*a, **k):
        raise SahcError("calibration capture skipped in this test.")
    monkeypatch.setattr(store, "calibration_stats", no_capture)
    at.checkbox(key="sp_calib").check().run()
    assert not at.exception and [e.value for e in at.error] == ["calibration capture skipped in this test."]
    at.checkbox(key="sp_calib").uncheck().run()
    assert not at.exception and not at.error
    assert not cov.missing(), cov.missing()
