"""AppTest of the Runs page on a pre-filled cache: table, live progress, cancel, comparison, failed gates."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from sahc_core.cache import Cache, to_json, utcnow
from sahc_core.gates import GateResult, log_gates
from sahc_core.paths import mark_owned
from sahc_core.runs.jobs import process_start_time, run_status

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "app_pages" / "runs.py")


def _result(run_id: str, plan: str, ratio: float, ppl: float, failed: int) -> dict:
    return {"run_id": run_id, "plan_name": plan, "ratio_projected": ratio, "ratio_actual": ratio * 0.99, "ppl": ppl,
            "baseline_ppl": 10.0, "delta_ppl": ppl - 10.0, "gates_passed": 5, "gates_failed": failed,
            "components": [{"component": "ffn", "original_bytes": 1000, "bytes_projected": 250,
                            "bytes_payload": 250, "ratio_projected": 4.0, "ratio_payload": 4.0, "n_tensors": 2,
                            "max_rel_error": 0.1, "min_weight_cosine": 0.99}]}


@pytest.fixture()
def filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A cache with two finished runs (one with a failed gate), one failed run and one live 'worker'."""
    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    monkeypatch.syspath_prepend(str(ROOT))
    st.cache_resource.clear()  # app_state caches the Cache object per process
    cache = Cache()
    now = utcnow()
    for rid, plan, ratio, ppl, failed in (("r-int4", "int4", 3.9, 11.0, 0), ("r-int2", "int2", 7.5, 40.0, 1)):
        cache.execute("INSERT INTO runs (run_id, plan_name, plan, status, stage, result, started_at, finished_at) "
                      "VALUES (?, ?, ?, 'done', 'done', ?, ?, ?)",
                      [rid, plan, json.dumps({"name": plan}), to_json(_result(rid, plan, ratio, ppl, failed)), now, now])
    cache.execute("INSERT INTO runs (run_id, plan_name, status, error, started_at, finished_at) VALUES "
                  "('r-bad', 'svd', 'failed', 'could not write the compressed checkpoint', ?, ?)", [now, now])
    log_gates(cache, "fp", [GateResult("rel_error", "model.layers.0.mlp.up_proj.weight", 0.2, 1.0, True, {}),
                            GateResult("theory_vs_actual", "model.layers.0.mlp.up_proj.weight", 21.0, 2.0, False,
                                       {"measured_error": 0.42, "predicted_error": 0.02})], run_id="r-int2")
    log_gates(cache, "fp", [GateResult("shape_match", "*", 1.0, 1.0, True, {"matched": 3, "total": 3})],
              run_id="r-int4")
    worker = subprocess.Popen(["sleep", "60"], start_new_session=True)  # stands in for a live worker
    cache.execute("INSERT INTO runs (run_id, plan_name, status, stage, progress, pid, pid_start, cancel_requested, "
                  "started_at) VALUES ('r-live', 'tt', 'running', 'assemble', ?, ?, ?, false, ?)",
                  [to_json({"stage": "assemble", "tensors_done": 3, "tensors_total": 12, "fraction": 0.25,
                            "eta_s": 9.0}), worker.pid, process_start_time(worker.pid), now])
    yield cache, worker
    worker.kill()
    worker.wait()
    st.cache_resource.clear()


def test_runs_page_renders_table_progress_and_comparison(filled) -> None:
    cache, worker = filled
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert set(table["run_id"]) == {"r-int4", "r-int2", "r-bad", "r-live"}
    assert table.set_index("run_id").loc["r-bad", "error"].startswith("could not write")
    # the live run: a progress line with stage and tensor counts
    assert any("tensors 3/12" in str(p.proto.text) for p in at.get("progress"))
    # a failed gate is shown, never hidden: warning in the table section and error in the gate log
    assert any("r-int2" in w.value and "1 quality gate" in w.value for w in at.warning)
    assert at.multiselect(key="runs_compare").value == ["r-int4", "r-int2"]
    assert any("theory_vs_actual" in e.value for e in at.error)
    gate_log = at.dataframe[-1].value
    assert len(gate_log) == 3 and not bool(gate_log.iloc[0]["passed"])  # failed first
    assert len(at.dataframe[1].value) == 2  # per-component rows, one per compared run


def test_cancel_button_signals_the_worker(filled) -> None:
    cache, worker = filled
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    at.button(key="runs_cancel_r-live").click().run()
    assert not at.exception
    assert worker.wait(timeout=10) != 0  # SIGTERM reached the process group
    st_ = run_status(cache, "r-live")
    assert st_["cancel_requested"] is True
    assert st_["status"] == "cancelled"  # `sleep` cannot say so itself: the reaper sees the cancel request


def test_launch_needs_a_plan_and_reports_bad_uploads(filled) -> None:
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert at.radio(key="runs_plan_kind").value == "example plan"  # no saved plan yet: the shipped examples
    assert set(at.selectbox(key="runs_plan_pick").options) == {"int8", "int4-g128", "int4-svd-ffn", "tt-embedding"}
    at.radio(key="runs_plan_kind").set_value("upload JSON").run()
    assert at.button(key="runs_start").disabled
    cache, _ = filled
    cache.save_plan("int4", {"name": "int4", "default": {"method": "int", "bits": 4, "group_size": 32}})
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert at.selectbox(key="runs_plan_pick").value == "int4" and not at.button(key="runs_start").disabled
    assert not at.exception


def test_start_button_launches_with_the_protocol(filled, monkeypatch: pytest.MonkeyPatch, tiny_llama_dir) -> None:
    import sahc_core.runs.jobs as jobs

    calls = []
    monkeypatch.setattr(jobs, "start_run", lambda cache, plan, model_dir, **kw: calls.append((plan, model_dir, kw))
                        or "r-new")
    cache, _ = filled
    cache.save_plan("int4", {"name": "int4", "default": {"method": "int", "bits": 4, "group_size": 32}})
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["model_path"] = str(tiny_llama_dir)
    at.run()
    at.number_input(key="runs_window").set_value(256)
    at.button(key="runs_start").click().run()
    assert not at.exception
    plan, model_dir, kw = calls[0]
    assert plan.name == "int4" and model_dir == str(tiny_llama_dir.resolve())
    assert kw == {"corpus": None, "window": 256, "max_tokens": None}
    assert any("r-new" in s.value for s in at.success)


def test_runs_page_deletes_checkpoint_files_and_keeps_results(filled) -> None:
    cache, _ = filled
    out = mark_owned(cache.path.parent / "runs" / "r-int4")  # an assembly marks its directory as SAHC's
    (out / "model-00001.safetensors").write_bytes(b"\0" * 2_000_000)
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    assert any("2 MB of checkpoints from 1 finished run" in e.label for e in at.expander)
    assert at.button(key="runs_free").disabled  # nothing happens without the confirmation
    at.checkbox(key="runs_free_sure").check().run()
    at.button(key="runs_free").click().run()
    assert not at.exception and not out.exists()
    assert any("2.0 MB freed" in s.value for s in at.success)
    assert run_status(cache, "r-int4")["result"]["ppl"] == 11.0  # the results stay
