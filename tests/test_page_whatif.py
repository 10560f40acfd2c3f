"""AppTest of the What-if page on the tiny llama fixture; figure builders of figures_whatif."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from apptest_helpers import run_page
from streamlit.testing.v1 import AppTest

from sahc_core.figures.whatif import pareto_figure, tt_sweep_figure

Q = "model.layers.0.self_attn.q_proj.weight"   # (64, 64)
EMB = "model.embed_tokens.weight"               # (256, 64)


def _page(model_dir, monkeypatch, tmp_path) -> AppTest:
    return run_page("whatif", model_dir, monkeypatch, tmp_path)


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def _ratio(at: AppTest) -> float:
    return float(_metric(at, "Projected ratio vs 16-bit").rstrip("x"))


def test_whatif_page_sliders_move_the_ratio(tiny_llama_dir, monkeypatch, tmp_path):
    at = _page(tiny_llama_dir, monkeypatch, tmp_path)
    assert not at.exception and not at.error
    at.selectbox(key="wi_component").select("attention_full").run()
    at.selectbox(key="wi_tensor").select(Q).run()
    # int4, group 64 (largest divisor <= 128), asym: independent byte count of a 64x64 tensor
    assert _ratio(at) == pytest.approx(2 * 64 * 64 / (64 * 64 * 4 / 8 + 4 * 64 * 1), abs=0.005)
    before = _ratio(at)
    at.slider(key="wi_int_bits").set_value(2).run()
    assert not at.exception
    assert _ratio(at) == pytest.approx(2 * 64 * 64 / (64 * 64 * 2 / 8 + 4 * 64 * 1), abs=0.005) != before
    err = float(_metric(at, "Relative error ‖W−Ŵ‖/‖W‖"))
    assert 0 < err < 1
    badges = [m.value for m in at.markdown if "-badge[" in m.value]  # gate badges: one per gate
    # rel_error < 1 only rules out "worse than zeros": a grey (weak) pass, never green (app_state.gate_badges)
    assert any(b.startswith(":gray-badge[") and "Relative error" in b for b in badges)
    assert any("Theory vs actual" in b for b in badges)

    at.radio(key="wi_method").set_value("SVD + int-k factors").run()
    assert not at.exception and not at.error
    r16 = _ratio(at)
    at.slider(key="wi_svd_rank_64x64").set_value(8).run()
    assert not at.exception
    assert _ratio(at) > r16
    # SVD r=8, int4 factors, group 64 along m and n: 2 factors of 8 x 64 -> 2 * (8*64/2 + 4*8)
    assert _ratio(at) == pytest.approx(2 * 64 * 64 / (2 * (8 * 64 * 4 / 8 + 4 * 8)), abs=0.005)
    assert "Tensor-Train" not in at.radio(key="wi_method").options  # TT not offered for attention


def test_whatif_page_embedding_tt_and_pareto(tiny_llama_dir, monkeypatch, tmp_path):
    at = _page(tiny_llama_dir, monkeypatch, tmp_path)
    at.selectbox(key="wi_component").select("embedding").run()
    at.selectbox(key="wi_tensor").select(EMB).run()
    at.radio(key="wi_method").set_value("Tensor-Train").run()
    assert not at.exception and not at.error
    r1 = at.select_slider(key="wi_tt_tt_ranks_256x64_0")
    assert r1.options[0] == "1" and r1.value == min(64, int(r1.options[-1]))
    r1.set_value(4).run()
    assert not at.exception and not at.error
    before = _ratio(at)
    at.select_slider(key="wi_tt_tt_ranks_256x64_1").set_value(8).run()
    assert _ratio(at) != before
    assert not at.exception and not at.error
    assert math.isfinite(_ratio(at)) and _ratio(at) > 1
    at.button(key="wi_tt_btn").click().run()
    assert not at.exception and not at.error
    from sahc_core.figures.format import header, no_raw_cells

    table = at.dataframe[-1].value  # shown as a reader sees it: human headers, formatted cells
    assert {header(c) for c in ("tt_ranks", "ratio", "cosine", "rel_error", "passed")} <= set(table.columns)
    assert len(table) >= 1 and not no_raw_cells(table)
    at.button(key="wi_pareto_btn").click().run()
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) >= 2


def test_whatif_page_bad_model_path(monkeypatch, tmp_path):
    at = _page(tmp_path / "missing", monkeypatch, tmp_path)
    assert not at.exception
    assert at.error and "missing" in at.error[0].value


def test_pareto_and_tt_figures():
    df = pd.DataFrame({"method": ["int", "int", "svd"], "label": ["a", "b", "c"], "bytes": [100, 50, 60],
                       "ratio": [2.0, 4.0, 3.3], "bits_per_weight": [8.0, 4.0, 4.8],
                       "rel_error": [0.01, 0.1, 0.5], "weight_cosine": [0.99, 0.95, 0.8],
                       "frontier": [True, True, False]})
    fig = pareto_figure(df, current={"bytes": 70, "rel_error": 0.2})
    names = [t.name for t in fig.data]
    assert names[:2] == ["int-k (RTN)", "SVD + int-k factors"] and "Pareto front" in names
    front = next(t for t in fig.data if t.name == "Pareto front")
    assert list(front.x) == [50, 100]
    with pytest.raises(ValueError):
        pareto_figure(df, metric="ppl")
    tdf = pd.DataFrame({"tt_ranks": ["[1, 8, 8, 1]"], "ratio": [100.0], "cosine": [0.7], "passed": [False]})
    tfig = tt_sweep_figure(tdf, 0.95)
    assert list(tfig.data[0].marker.color) == ["#E45756"]
