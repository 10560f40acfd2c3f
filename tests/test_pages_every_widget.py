"""Every widget of the What-if and Budget pages, moved once, through the router on the default model.

The widgets are generated from the method registry, so every registered method is selected and each of
its parameter widgets touched. Slow library calls are cut down only where another test covers them:
the Pareto grid is trimmed to a few settings per method (tests/test_whatif.py sweeps the full grid), and
calibration statistics are captured on 512 + 256 tokens instead of 8192 + 2048 (tests/test_calib.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from apptest_helpers import install_widget_coverage
from streamlit.testing.v1 import AppTest

from sahc_core.figures.format import no_raw_cells

APP = str(Path(__file__).resolve().parents[1] / "app.py")
Q = "model.layers.3.self_attn.q_proj.weight"


def _router(monkeypatch, tmp_path, page: str) -> tuple[AppTest, object]:
    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    at = AppTest.from_file(APP, default_timeout=600)
    at.session_state["model_path"] = ""
    at.run()
    cov = install_widget_coverage(monkeypatch)
    at.switch_page(f"app_pages/{page}.py").run()
    at.text_input(key="model_path").input("").run()
    return at, cov


def _value_for(w, label: str):
    """The underlying value whose formatted text is ``label`` (AppTest lists select options as text)."""
    candidates = [label, None, True, False]
    for cast in (int, float):
        try:
            candidates.append(cast(label))
        except ValueError:
            pass
    for c in candidates:
        try:
            if str(w.format_func(c)) == label:
                return c
        except (TypeError, ValueError):
            continue
    raise AssertionError(f"no value behind option {label!r} of {w.key}")


def _touch(at: AppTest, prefix: str) -> None:
    """Move every drawn widget whose key starts with ``prefix`` to another value (a select to another
    option, a slider / number to its minimum) and rerun: every generated widget is used once."""
    for kind in ("select_slider", "radio", "selectbox", "slider", "number_input", "text_input", "checkbox"):
        for w in list(getattr(at, kind)):
            key = w.key or ""
            if not key.startswith(prefix):
                continue
            w = getattr(at, kind)(key=key)
            before = w.value
            if kind in ("select_slider", "radio", "selectbox"):
                labels = list(w.options)
                current = str(w.format_func(before))
                other = next((o for o in labels if o != current), current)
                w.set_value(_value_for(w, other)).run()
            elif kind in ("slider", "number_input"):
                lo = getattr(w, "min", None)
                w.set_value(lo if lo is not None and lo != before else before).run()
            else:
                w.set_value(before).run()
            assert not at.exception, (key, at.exception)


@pytest.fixture
def small_calibration(monkeypatch):
    import sahc_core.calib.store as store
    from sahc_core.calib.stats import CalibConfig

    real = store.calibration_stats
    monkeypatch.setattr(store, "calibration_stats", lambda source, cache, text=None, cfg=None, **kw: real(
        source, cache, text, CalibConfig(tokens=512, heldout_tokens=256), **kw))


def test_every_widget_of_the_whatif_page(monkeypatch, tmp_path, small_calibration):
    import sahc_core.whatif.sweeps as sweeps

    full = sweeps.pareto_configs
    monkeypatch.setattr(sweeps, "pareto_configs", lambda shape, component=None, with_calibration=False: [
        c for i, c in enumerate(full(shape, component, with_calibration)) if i % 15 == 0])
    at, cov = _router(monkeypatch, tmp_path, "whatif")
    _touch(at, "wi_int_")  # the first tensor's widgets (k_proj, 192 x 576)
    at.selectbox(key="wi_component").select("attention_full").run()
    at.selectbox(key="wi_tensor").select(Q).run()
    at.checkbox(key="wi_calib").check().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    titles = list(at.radio(key="wi_method").options)
    assert {"int-k (RTN)", "GPTQ int-k", "HQQ int-k", "SVD + int-k factors", "Whitened SVD (SVD-LLM)",
            "16-bit (kept)"} <= set(titles) and "Tensor-Train" not in titles  # TT: embedding only
    from sahc_core.methods import registry

    by_title = {m.title: m.name for m in registry.methods()}
    for title in titles:
        at.radio(key="wi_method").set_value(title).run()
        assert not at.exception and not at.error, (title, [e.value for e in at.error])
        _touch(at, f"wi_{by_title[title]}_")
        labels = {m.label for m in at.metric}
        assert "Output error ‖X(W−Ŵ)ᵀ‖/‖XWᵀ‖" in labels, title  # beside the weight error, for every method
    at.checkbox(key="wi_outcos").check().run()
    assert not at.exception and not at.error and any(m.label == "output cosine" for m in at.metric)
    at.button(key="wi_pareto_btn").click().run()
    assert not at.exception and not at.error
    frontier = at.dataframe[-1].value
    gates = next(c for c in frontier.columns if "gate" in c.lower())
    assert set(frontier[gates]) <= {"all pass"} | {v for v in frontier[gates] if v.startswith("fails ")}
    assert not no_raw_cells(frontier), no_raw_cells(frontier)
    at.radio(key="wi_pareto_metric").set_value("output_error").run()
    assert not at.exception
    at.selectbox(key="wi_component").select("embedding").run()
    at.radio(key="wi_method").set_value("Tensor-Train").run()
    _touch(at, "wi_tt_")
    at.number_input(key="wi_tt_thr").set_value(0.9).run()
    at.button(key="wi_tt_btn").click().run()
    assert not at.exception and not at.error
    assert not no_raw_cells(at.dataframe[-1].value)
    at.checkbox(key="wi_calib").uncheck().run()
    at.checkbox(key="wi_outcos").uncheck().run()
    assert not cov.missing(), cov.missing()


def test_every_widget_of_the_budget_page(monkeypatch, tmp_path):
    from sahc_core.methods import registry

    at, cov = _router(monkeypatch, tmp_path, "budget")
    assert not at.exception and not at.error, [e.value for e in at.error]
    comps = [w.key.removeprefix("budget_").removesuffix("_method") for w in at.selectbox
             if w.key.endswith("_method") and w.key.startswith("budget_")]
    assert {"ffn", "attention_full", "embedding", "norm_other"} <= set(comps)
    by_title = {m.title: m.name for m in registry.methods()}
    for title in at.selectbox(key="budget_ffn_method").options:  # every method offered for the FFN
        at.selectbox(key="budget_ffn_method").set_value(title).run()
        assert not at.exception, title
        _touch(at, f"budget_ffn_{by_title[title]}_")
    at.selectbox(key="budget_ffn_method").set_value("int-k (RTN)").run()
    for comp in comps:
        title = at.selectbox(key=f"budget_{comp}_method").value
        at.selectbox(key=f"budget_{comp}_method").set_value(title).run()
        _touch(at, f"budget_{comp}_{by_title[title]}_")
    at.selectbox(key="budget_embedding_method").set_value("Tensor-Train").run()
    _touch(at, "budget_embedding_tt_")
    at.selectbox(key="budget_embedding_method").set_value("int-k (RTN)").run()
    at.selectbox(key="budget_fallback").set_value("int8 per row").run()
    at.number_input(key="budget_target").set_value(4.0).run()
    at.text_input(key="budget_name").input("every-widget").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    tables = [d.value for d in at.dataframe]
    assert tables and all(not no_raw_cells(t) for t in tables), [no_raw_cells(t) for t in tables]
    at.button(key="budget_save").click().run()
    assert any("Saved plan 'every-widget'" in s.value for s in at.success)
    at.download_button(key="budget_download").click().run()
    at.selectbox(key="budget_pick").select("every-widget").run()
    at.button(key="budget_load").click().run()
    plan = {"name": "up4", "default": {"method": "int", "bits": 4, "group_size": 64},
            "overrides": [{"pattern": "*norm*", "method": "keep"}]}
    at.file_uploader(key="budget_upload").upload("p.json", json.dumps(plan).encode(), "application/json").run()
    assert not at.exception and at.text_input(key="budget_name").value == "up4"
    # the "Optimise for a ratio" section's widgets (opt_*) are moved, each, in
    # tests/test_page_optimize.py::test_every_widget_of_the_optimise_section (on a small candidate grid)
    missing = [w for w in cov.missing() if not w.startswith("opt_")]
    assert not missing, missing
