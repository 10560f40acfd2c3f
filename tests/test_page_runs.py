"""AppTest of the Runs page on a pre-filled cache: live table, overall ETA, cancel, protocol-aware comparison,
honest gate badges, and every widget of the page exercised once on the embedded default model."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import streamlit as st
from apptest_helpers import install_widget_coverage
from streamlit.testing.v1 import AppTest

from sahc_core.cache import Cache, to_json, utcnow
from sahc_core.figures.format import no_raw_cells
from sahc_core.gates import GateResult, log_gates
from sahc_core.paths import mark_owned
from sahc_core.runs.jobs import process_start_time, run_status

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "app_pages" / "runs.py")
APP = str(ROOT / "app.py")
#: Two protocols, as in the issue: the whole test text vs --max-tokens 4096 (different baselines).
WHOLE = {"text": "shakespeare", "text_sha256": "ab" * 32, "tokens": 63989, "window": 2048, "stride": 2048,
         "dtype": "float32", "device": "cpu", "max_tokens": None}
CAPPED = {**WHOLE, "tokens": 4064, "max_tokens": 4096}


def _result(run_id: str, plan: str, ratio: float, ppl: float, base: float, protocol: dict, failed: int) -> dict:
    return {"run_id": run_id, "plan_name": plan, "ratio_projected": ratio, "ratio_actual": ratio * 0.99, "ppl": ppl,
            "baseline_ppl": base, "delta_ppl": ppl - base, "gates_passed": 5, "gates_failed": failed,
            "protocol": protocol, "bytes_original": 2_000_000, "seconds": {"assemble": 2.0, "gates": 4.0, "ppl": 50.0},
            "baseline_cached": True, "work": {"params": 1_000_000, "tokens": protocol["tokens"]},
            "components": [{"component": "ffn", "original_bytes": 1000, "bytes_projected": 250,
                            "bytes_payload": 250, "ratio_projected": 4.0, "ratio_payload": 4.0, "n_tensors": 2,
                            "max_rel_error": 0.1, "min_weight_cosine": 0.99}]}


#: The live run's expected work: 10 s per stage (1e6 params at 1e5/s; 1e6·1000 param-tokens at 1e8/s).
EXPECTED = {"params": 1_000_000, "tokens": 1000, "baseline_cached": False, "basis": "test",
            "rates": {"assemble": 1e5, "gates": 1e5, "baseline": 1e8, "ppl": 1e8}}


@pytest.fixture()
def filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two finished runs under DIFFERENT protocols (one with a failed gate), a failed run and a live 'worker'."""
    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    monkeypatch.syspath_prepend(str(ROOT))
    st.cache_resource.clear()  # app_state caches the Cache object per process
    st.cache_data.clear()
    cache = Cache()
    now = utcnow()
    for rid, plan, ratio, ppl, base, proto, failed in (("r-int4", "int4", 3.9, 52.58, 33.07, WHOLE, 0),
                                                        ("r-int8", "int8", 1.99, 29.28, 29.24, CAPPED, 1)):
        result = _result(rid, plan, ratio, ppl, base, proto, failed)
        if rid == "r-int4":  # a Qwen3.5 run: vision and MTP compressed, not evaluated; layer by layer
            result["evaluation"] = {"note": "1 vision-tower and 1 MTP-head tensors were compressed and counted in the "
                                            "bytes but not evaluated", "not_evaluated_tensors": {
                                                "vision": ["model.visual.merger.linear_fc1.weight"],
                                                "mtp": ["mtp.fc.weight"]}}
            result["offload"] = {"offload": True, "reason": "always (asked for)"}
        cache.execute("INSERT INTO runs (run_id, plan_name, plan, status, stage, result, started_at, finished_at) "
                      "VALUES (?, ?, ?, 'done', 'done', ?, ?, ?)",
                      [rid, plan, json.dumps({"name": plan}), to_json(result), now, now])
    cache.execute("INSERT INTO runs (run_id, plan_name, status, error, started_at, finished_at) VALUES "
                  "('r-bad', 'svd', 'failed', 'could not write the compressed checkpoint', ?, ?)", [now, now])
    log_gates(cache, "fp", [GateResult("rel_error", "model.layers.0.mlp.up_proj.weight", 0.2, 1.0, True, {}),
                            GateResult("theory_vs_actual", "model.layers.0.mlp.up_proj.weight", 21.0, 2.0, False,
                                       {"measured_error": 0.42, "predicted_error": 0.02})], run_id="r-int8")
    log_gates(cache, "fp", [GateResult("shape_match", "*", 1.0, 1.0, True, {"matched": 3, "total": 3})],
              run_id="r-int4")
    worker = subprocess.Popen(["sleep", "120"], start_new_session=True)  # stands in for a live worker
    cache.execute("INSERT INTO runs (run_id, plan_name, status, stage, progress, pid, pid_start, cancel_requested, "
                  "started_at) VALUES ('r-live', 'tt', 'running', 'assemble', ?, ?, ?, false, ?)",
                  [to_json({"stage": "assemble", "tensors_done": 3, "tensors_total": 12, "fraction": 0.25,
                            "eta_s": 9.0, "expected": EXPECTED, "stage_seconds": {"project": 1.0},
                            "stage_elapsed_s": 3.0}), worker.pid, process_start_time(worker.pid), now])
    yield cache, worker
    worker.kill()
    worker.wait()
    st.cache_resource.clear()
    st.cache_data.clear()


def _page(model: str | None = None) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120)
    if model is not None:
        at.session_state["model_path"] = model
    return at.run()


def test_runs_table_live_progress_and_overall_eta(filled, tiny_llama_dir) -> None:
    at = _page(str(tiny_llama_dir))
    assert not at.exception
    table = at.dataframe[0].value
    assert set(table["Run"]) == {"r-int4", "r-int8", "r-bad", "r-live"}
    assert table.set_index("Run").loc["r-bad", "Error"].startswith("could not write")
    assert table.set_index("Run").loc["r-live", "Status (stage)"] == "running (assemble)"
    assert not no_raw_cells(table), no_raw_cells(table)
    # each run is shown with its own protocol and Δppl against its own baseline
    row = table.set_index("Run").loc["r-int8"]
    assert "4,064 tokens" in row["Protocol"] and row["Δppl vs own baseline"] == "+0.040"
    assert table.set_index("Run").loc["r-int4", "Baseline perplexity (same protocol)"] == "33.07"
    # overall ETA, independently: 9 s left in assembly + 10 s for each of gates, baseline and ppl
    text = " ".join(str(p.proto.text) for p in at.get("progress"))
    assert "tensors 3/12" in text and "run ETA ≈ 39 s" in text and "stage assemble (1/4)" in text
    # overall fraction: 1 s (project) + 3 s spent of 4 + 39 s in all
    bar = next(p for p in at.get("progress") if "r-live" in str(p.proto.text))
    assert bar.proto.value == round(100 * 4 / 43)


def test_the_table_follows_the_cache_on_every_refresh(filled, tiny_llama_dir) -> None:
    cache, _ = filled
    at = _page(str(tiny_llama_dir))
    cache.execute("UPDATE runs SET stage = 'ppl' WHERE run_id = 'r-live'")
    at.run()  # what the 2-s fragment refresh does (the browser suite watches it live)
    assert at.dataframe[0].value.set_index("Run").loc["r-live", "Status (stage)"] == "running (ppl)"


def test_comparison_is_protocol_aware(filled, tiny_llama_dir) -> None:
    at = _page(str(tiny_llama_dir))
    assert set(at.multiselect(key="runs_compare").value) == {"r-int4", "r-int8"}
    warn = [w.value for w in at.warning if "different perplexity protocols" in w.value]
    assert warn and "baseline 33.07" in warn[0] and "baseline 29.24" in warn[0]
    base = next(d.value for d in at.dataframe if "Baseline perplexity (same protocol)" in d.value.columns
                and "Runs" in d.value.columns)
    assert sorted(base["Baseline perplexity (same protocol)"]) == ["29.24", "33.07"]
    fig = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "runs_scatter" in c.proto.id)
    hlines = sorted(s["y0"] for s in fig["layout"]["shapes"])
    assert hlines == [29.24, 33.07]  # one baseline per protocol, drawn per protocol
    assert "2 perplexity protocols" in fig["layout"]["title"]["text"]
    # the compared runs' tables show no raw cells
    for d in at.dataframe:
        assert not no_raw_cells(d.value), no_raw_cells(d.value)


def test_comparison_states_what_was_not_evaluated(filled, tiny_llama_dir) -> None:
    """A Qwen3.5 run: its vision and MTP tensors were compressed but not evaluated, and it ran layer by layer."""
    at = _page(str(tiny_llama_dir))
    assert any("r-int4" in i.value and "not evaluated" in i.value for i in at.info)
    assert any("mtp.fc.weight" in m.value for m in at.markdown)
    assert any("r-int4" in c.value and "one decoder layer at a time" in c.value for c in at.caption)


def test_gate_badges_read_honestly(filled, tiny_llama_dir) -> None:
    at = _page(str(tiny_llama_dir))
    lines = [m.value for m in at.markdown if "-badge[" in m.value]
    theory = next(line for line in lines if "Theory vs actual" in line)
    assert theory.startswith(":red-badge[") and "1 of 1 fail" not in theory and "21 outside [1/2, 2]" in theory
    assert "consistency" in theory  # the two-sided theory gate is no weak pass
    rel = next(line for line in lines if "Relative error" in line)
    assert rel.startswith(":gray-badge[") and "sanity" in rel and "0.2 < 1" in rel and "zeros" in rel
    shape = next(line for line in lines if "Shapes match" in line)
    assert shape.startswith(":green-badge[") and "integrity" in shape
    assert any("r-int8" in w.value and "1 quality gate" in w.value for w in at.warning)
    # the decisions counted per gate in one line, weak ones marked
    assert any(c.value.startswith("1 of 3 gates failed: theory_vs_actual 1/1") and "rel_error 0/1 (weak)" in c.value
               for c in at.caption)


def test_perplexity_gate_threshold_is_set_at_launch_and_shown(filled, tiny_llama_dir, monkeypatch) -> None:
    import sahc_core.runs.jobs as jobs

    calls = []
    monkeypatch.setattr(jobs, "start_run", lambda cache, plan, model_dir, **kw: calls.append(kw) or "r-new")
    cache, _ = filled
    cache.execute("UPDATE runs SET result = json_merge_patch(result, '{\"ppl_threshold\": 0.25}') "
                  "WHERE run_id = 'r-int4'")
    at = _page(str(tiny_llama_dir))
    assert at.number_input(key="runs_ppl_threshold").value == 10.0  # the default gate, +10 %, shown
    at.number_input(key="runs_ppl_threshold").set_value(25.0).run()
    at.radio(key="runs_dtype").set_value("bfloat16").run()
    at.radio(key="runs_offload").set_value("always").run()
    at.button(key="runs_start").click().run()
    assert not at.exception and calls[0]["ppl_threshold"] == 0.25
    assert calls[0]["dtype"] == "bfloat16" and calls[0]["offload"] == "always"  # passed on to the run as chosen
    table = at.dataframe[0].value.set_index("Run")
    assert table.loc["r-int4", "Perplexity gate: max Δppl (%)"].startswith("25")


def test_cancel_button_signals_the_worker(filled, tiny_llama_dir) -> None:
    cache, worker = filled
    at = _page(str(tiny_llama_dir))
    at.button(key="runs_cancel_r-live").click().run()
    assert not at.exception
    assert worker.wait(timeout=10) != 0  # SIGTERM reached the process group
    st_ = run_status(cache, "r-live")
    assert st_["cancel_requested"] is True
    assert st_["status"] == "cancelled"  # `sleep` cannot say so itself: the reaper sees the cancel request


def test_prelaunch_estimate_warns_before_a_long_run(filled, tiny_llama_dir) -> None:
    at = _page(str(tiny_llama_dir))
    note = [m.value for m in [*at.info, *at.warning] if "scored tokens on this machine" in m.value]
    assert note and "use Max tokens for a quick look" in note[0]
    assert "measured on 2 past run(s) of other models" in note[0]  # the fixture's runs have no model_fp


def test_every_widget_on_the_default_model(filled, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every widget of the page, moved once, through the router on the embedded default model.

    ``start_run`` is patched (tests/test_pipeline.py and tests/test_jobs.py start real workers).
    """
    import sahc_core.runs.jobs as jobs

    calls = []
    monkeypatch.setattr(jobs, "start_run", lambda cache, plan, model_dir, **kw: calls.append((plan, kw)) or "r-new")
    cache, _ = filled
    out = mark_owned(cache.path.parent / "runs" / "r-int4")  # an assembly marks its directory as SAHC's
    (out / "model-00001.safetensors").write_bytes(b"\0" * 2_000_000)
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_path"] = ""
    at.run()
    cov = install_widget_coverage(monkeypatch)  # from the Runs page on (the router opens on the Model page)
    at.switch_page("app_pages/runs.py").run()
    assert not at.exception, at.exception
    at.text_input(key="model_path").input("").run()
    at.radio(key="runs_plan_kind").set_value("upload JSON").run()
    assert at.button(key="runs_start").disabled
    at.file_uploader(key="runs_plan_upload").upload(
        "p.json", json.dumps({"name": "up8", "default": {"method": "int", "bits": 8, "group_size": None}}).encode(),
        "application/json").run()
    at.radio(key="runs_plan_kind").set_value("example plan").run()
    at.selectbox(key="runs_plan_pick").select("int8").run()
    at.text_input(key="runs_corpus").input("").run()
    at.number_input(key="runs_window").set_value(512).run()
    at.number_input(key="runs_max_tokens").set_value(2048).run()
    at.number_input(key="runs_ppl_threshold").set_value(25.0).run()
    at.radio(key="runs_dtype").set_value("bfloat16").run()
    at.radio(key="runs_offload").set_value("never").run()
    assert any("≈ 2,000 scored tokens" in m.value for m in [*at.info, *at.warning]), [m.value for m in at.info]
    at.button(key="runs_start").click().run()
    assert calls[0][0].name == "int8" and calls[0][1] == {"corpus": None, "window": 512, "max_tokens": 2048,
                                                          "ppl_threshold": 0.25, "dtype": "bfloat16",
                                                          "offload": "never"}
    at.button(key="runs_cancel_r-live").click().run()
    # export: the fake checkpoint has no manifest, so the export is refused in one line (tests/test_model_export.py
    # exports real runs)
    at.selectbox(key="runs_export_pick").select("r-int4").run()
    at.radio(key="runs_export_format").set_value("dense").run()
    at.selectbox(key="runs_export_dtype").select("float32").run()
    at.text_input(key="runs_export_out").input(str(cache.path.parent / "exp")).run()
    at.checkbox(key="runs_export_force").check().run()
    at.button(key="runs_export").click().run()
    assert not at.exception and at.error and "r-int4" in at.error[0].value, [e.value for e in at.error]
    at.selectbox(key="runs_free_pick").select("r-int4").run()
    at.checkbox(key="runs_free_sure").check().run()
    at.button(key="runs_free").click().run()
    assert any("2.0 MB freed" in s.value for s in at.success) and not out.exists()
    at.multiselect(key="runs_compare").set_value(["r-int4"]).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert not cov.missing(), cov.missing()
