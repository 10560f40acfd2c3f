"""AppTest of the Budget page's "Optimise for a ratio" section and the Runs page's frontier section."""
from __future__ import annotations

from apptest_helpers import run_page

import app_optimize
from sahc_core.cache import Cache, to_json, utcnow
from sahc_core.calib.stats import CalibConfig
from sahc_core.plans import optimize as opt
from sahc_core.plans.candidates import CandidateGrid
from sahc_core.plans.sensitivity import SensitivityConfig
from tiny_models import TINY_TEXT


def test_optimise_section_shows_the_plan_and_launches_its_run(tiny_llama_tok_dir, monkeypatch, tmp_path):
    seen: dict = {}

    def small_prepare(source, cache, calibration, grid, progress):  # the page's call, on a small grid and text
        seen["methods"] = grid.methods
        return opt.prepare(source, cache, calibration=calibration, progress=progress, text=TINY_TEXT * 3,
                           grid=CandidateGrid(methods=grid.methods, bits=(2, 4, 8), group_sizes=(None,)),
                           calib_cfg=CalibConfig(tokens=256, heldout_tokens=128),
                           sens_cfg=SensitivityConfig(tokens=128, window=64), smoke_tokens=64)

    def fake_start(cache, plan, model_dir, **_):
        seen["plan"] = plan
        return "run-x"

    monkeypatch.setattr(app_optimize, "prepare", small_prepare)
    monkeypatch.setattr("sahc_core.runs.jobs.start_run", fake_start)
    at = run_page("budget", tiny_llama_tok_dir, monkeypatch, tmp_path)
    assert not at.exception and not at.error
    at.number_input(key="opt_target").set_value(2.5)
    at.multiselect(key="opt_methods").set_value(["int"])
    at.checkbox(key="opt_calib").uncheck()
    at.button(key="opt_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert seen["methods"] == ("int",)
    ratio = next(m.value for m in at.metric if m.label == "Ratio (projected)")
    assert float(ratio.rstrip("x")) >= 2.5
    assert any("calibration-free" in w.value for w in at.warning)  # the fallback is said, not silent
    at.button(key="opt_launch").click().run()
    assert not at.exception and seen["plan"].provenance["kind"] == "optimized"
    assert any("run-x" in s.value for s in at.success)


def test_every_widget_of_the_optimise_section(tiny_llama_tok_dir, monkeypatch, tmp_path):
    """The constraints reach the optimizer and hold in its plan; save and download work (every widget moved)."""
    from apptest_helpers import install_widget_coverage

    def small_prepare(source, cache, calibration, grid, progress):
        return opt.prepare(source, cache, calibration=calibration, progress=progress, text=TINY_TEXT * 3,
                           grid=CandidateGrid(methods=grid.methods, bits=(2, 4, 8), group_sizes=(None, 32)),
                           calib_cfg=CalibConfig(tokens=256, heldout_tokens=128),
                           sens_cfg=SensitivityConfig(tokens=128, window=64), smoke_tokens=64)

    monkeypatch.setattr(app_optimize, "prepare", small_prepare)
    at = run_page("budget", tiny_llama_tok_dir, monkeypatch, tmp_path)
    cov = install_widget_coverage(monkeypatch)
    at.number_input(key="opt_target").set_value(2.0).run()
    at.multiselect(key="opt_keep").set_value(["attention_full"]).run()
    at.selectbox(key="opt_emb_bits").set_value(8).run()
    at.checkbox(key="opt_one_group").check().run()
    at.multiselect(key="opt_methods").set_value(["int", "keep"]).run()
    at.checkbox(key="opt_calib").uncheck().run()
    at.button(key="opt_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    at.button(key="opt_save").click().run()
    assert not at.exception and any("Saved 'optimized-2x'" in m.value for m in at.success), [m.value for m in at.success]
    at.download_button(key="opt_download").click().run()
    assert not at.exception
    import json

    from sahc_core.io.components import tensor_table
    from sahc_core.io.source import ModelSource
    from sahc_core.plans.plan import CompressionPlan, resolve

    (text,), = Cache(tmp_path / "c.duckdb").execute("SELECT plan FROM plans")
    plan = CompressionPlan.from_dict(json.loads(text))
    df = resolve(plan, tensor_table(ModelSource.open(tiny_llama_tok_dir)))
    mats = df[df["shape"].map(len) >= 2]
    attn = mats[mats["component"] == "attention_full"]
    assert len(attn) and (attn["method"] == "keep").all()  # keep=attention_full held
    ints = mats[mats["method"] == "int"]
    assert len(ints) and ints["config"].map(lambda c: c.get("group_size")).nunique(dropna=False) == 1  # one group size
    emb = mats[mats["component"] == "embedding"]
    assert all(m == "keep" or c.get("bits", 16) <= 8 for m, c in zip(emb["method"], emb["config"]))
    assert not [w for w in cov.missing() if w.startswith("opt_")], cov.missing()


def test_runs_page_frontier_section(tiny_llama_dir, monkeypatch, tmp_path):
    from sahc_core.io.source import ModelSource

    cache = Cache(tmp_path / "c.duckdb")
    fp = ModelSource.open(tiny_llama_dir).fingerprint  # the page shows the frontier of the current model's runs
    for i, (ratio, ppl, pred) in enumerate([(2.0, 10.5, 0.04), (3.0, 11.0, 0.1), (4.0, 14.0, 0.3)]):
        plan = {"name": f"opt{i}", "default": {"method": "int", "bits": 4, "group_size": 32},
                "provenance": {"kind": "optimized", "predicted_dloss": pred}}
        result = {"ratio_actual": ratio, "ppl": ppl, "baseline_ppl": 10.0, "gates_passed": 3, "gates_failed": 0,
                  "protocol": {"text": "t", "tokens": 100, "window": 64}}
        cache.execute("INSERT INTO runs (run_id, plan_name, plan, model_fp, status, result, started_at) VALUES "
                      "(?, ?, ?, ?, 'done', ?, ?)", [f"r{i}", plan["name"], to_json(plan), fp, to_json(result), utcnow()])
    at = run_page("runs", tiny_llama_dir, monkeypatch, tmp_path)
    assert not at.exception
    assert any("Spearman ρ = 1.00 over 3 run(s)" in e.label for e in at.expander)
