"""AppTest of the Budget page and tests of its sahc_core helpers (figures_budget)."""
from __future__ import annotations

import json

import pytest
from apptest_helpers import run_page
from streamlit.testing.v1 import AppTest

from sahc_core.figures.budget import breakdown_frame, bytes_breakdown_figure, plan_dict, wall_curve, wall_figure
from sahc_core.io.source import ModelSource
from sahc_core.plans.plan import CompressionPlan, embedding_wall, project



def _page(model_dir, monkeypatch, tmp_path) -> AppTest:
    return run_page("budget", model_dir, monkeypatch, tmp_path)


def _ratio(at: AppTest) -> float:
    return float(next(m.value for m in at.metric if m.label == "Total ratio (projected)").rstrip("x"))


def test_budget_page_ratio_follows_the_bits(tiny_llama_dir, monkeypatch, tmp_path):
    at = _page(tiny_llama_dir, monkeypatch, tmp_path)
    assert not at.exception and not at.error
    before = _ratio(at)
    # independent: the same per-component choices through the library
    plan = CompressionPlan.from_dict(plan_dict("my-plan", {
        c: {"method": "int", "bits": 4, "group_size": 64} for c in ("ffn", "attention_full", "embedding")
    } | {"norm_other": {"method": "keep"}}, fallback={"method": "keep"}))
    assert before == pytest.approx(project(plan, ModelSource.open(tiny_llama_dir))["ratio_projected"], abs=0.005)
    at.number_input(key="budget_ffn_int_bits").set_value(8).run()
    assert not at.exception
    assert _ratio(at) < before
    at.selectbox(key="budget_ffn_method").set_value("16-bit (kept)").run()
    assert _ratio(at) < before
    assert any("must reach" in i.value or "impossible" in i.value for i in [*at.info, *at.warning])


def test_budget_page_group_size_that_does_not_divide_is_adapted(tiny_llama_dir, monkeypatch, tmp_path):
    """256 divides neither 64 nor 128: without a fallback config the method adapts (per row here) and
    the page says so per tensor; nothing is refused."""
    at = _page(tiny_llama_dir, monkeypatch, tmp_path)
    at.selectbox(key="budget_fallback").set_value("none (adapt, else error)").run()
    at.selectbox(key="budget_ffn_int_group_size").set_value(256).run()
    assert not at.exception and not at.error
    assert any("adapted" in w.value or "group size 256 does not divide" in w.value for w in at.warning)


def test_budget_page_error_is_shown_not_raised(tiny_llama_dir, monkeypatch, tmp_path):
    """TT ranks the embedding's reshaping cannot hold: one clear error line, no traceback."""
    at = _page(tiny_llama_dir, monkeypatch, tmp_path)
    at.selectbox(key="budget_fallback").set_value("none (adapt, else error)").run()
    at.selectbox(key="budget_embedding_method").set_value("Tensor-Train").run()
    at.text_input(key="budget_embedding_tt_tt_ranks").set_value("1, 100000, 8, 1").run()
    assert not at.exception
    assert at.error and "rank" in at.error[0].value


def test_budget_page_save_and_load_from_cache(tiny_llama_dir, monkeypatch, tmp_path):
    at = _page(tiny_llama_dir, monkeypatch, tmp_path)
    at.text_input(key="budget_name").set_value("p8").run()
    at.number_input(key="budget_ffn_int_bits").set_value(8).run()
    at.button[1].click().run()  # "Save plan to cache"
    assert not at.exception and any("Saved plan 'p8'" in s.value for s in at.success)
    saved = _ratio(at)
    at.number_input(key="budget_ffn_int_bits").set_value(2).run()
    assert _ratio(at) != saved
    at.selectbox(key="budget_pick").set_value("p8").run()
    at.button[0].click().run()  # "Load saved plan"
    assert not at.exception and _ratio(at) == saved
    assert at.number_input(key="budget_ffn_int_bits").value == 8


def test_plan_dict_round_trips_every_registered_method():
    """Each method's schema defaults make a config whose plan JSON survives the plan round trip."""
    from sahc_core.methods import registry

    comps = {}
    for spec in registry.methods():
        comp = "embedding" if spec.components and "embedding" in spec.components else "ffn"
        if comp in comps:
            continue
        comps[comp] = registry.config_to_dict(registry.config_from_values(spec.name, {}))
    plan = CompressionPlan.from_dict(plan_dict("rt", comps))
    assert plan.to_dict()["components"] == comps


def test_breakdown_and_wall_figures(tiny_qwen35_dir):
    plan = CompressionPlan.from_dict({"name": "i8", "default": {"method": "int", "bits": 8, "group_size": None}})
    res = project(plan, ModelSource.open(tiny_qwen35_dir))
    df = breakdown_frame(res)
    orig = df[df["side"].str.startswith("original")]["MB"].sum()
    assert orig == pytest.approx(res["bytes_original"] / 1e6)
    fig = bytes_breakdown_figure(res)
    assert len(fig.data) == len(res["components"]) and fig.layout.barmode == "stack"
    curve = wall_curve(res)
    ok = curve.dropna()
    for t, need in zip(ok["target_ratio"], ok["embedding_ratio_needed"]):
        assert need == pytest.approx(embedding_wall(res, t)["embedding_ratio_needed"])
    assert ok["embedding_ratio_needed"].is_monotonic_increasing
    json.loads(wall_figure(res, 2.0).to_json())


def test_fallback_name_overrides_and_settings_tables(tiny_llama_dir):
    import pandas as pd

    from sahc_core.figures.budget import fallback_name, fallback_sentence, overrides_frame, with_settings

    assert fallback_name({"fallback": {"method": "int", "bits": 8, "group_size": None, "scheme": "asym"}}) == \
        "int8 per row"
    assert fallback_name({}) == fallback_name({"fallback": {"method": "svd"}}) == "none (adapt, else error)"
    table = overrides_frame([{"pattern": "*norm*", "method": "keep"},
                             {"pattern": "*q_proj*", "method": "int", "bits": 8, "group_size": None}])
    assert table["pattern"].tolist() == ["*norm*", "*q_proj*"] and table["setting"].str.len().min() > 0
    tensors = pd.DataFrame({"config": [{"method": "keep"}, None]})
    assert with_settings(tensors)["setting"].iloc[1] == "tied"
    res = project(CompressionPlan.from_dict({"name": "g256", "default": {"method": "int", "bits": 4,
                                                                          "group_size": 256}}),
                  ModelSource.open(tiny_llama_dir))
    assert res["n_fallback"] and fallback_sentence(res).startswith(f"{res['n_fallback']} tensor(s) took a fallback")
    assert fallback_sentence({**res, "n_fallback": 0}) is None
