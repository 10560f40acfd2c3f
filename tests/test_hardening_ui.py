"""Hardening (issue 13) through the pages: the inputs a page takes get the same one-line refusal.

Model path in the sidebar (through app.py), plan upload on Budget and Runs, run deletion and the
corpus path on Runs. Every case checks ``st.error`` is shown, ``at.exception`` is empty, and that
nothing outside SAHC's own files changed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import streamlit as st
from apptest_helpers import ROOT, run_page
from streamlit.testing.v1 import AppTest

from sahc_core.cache import Cache, to_json, utcnow
from sahc_core.paths import mark_owned
from sahc_core.plans import _limits

INT8 = {"name": "int8", "default": {"method": "int", "bits": 8, "group_size": 32}}
HOSTILE_PLANS = {
    "nested too deep": ('{"name": "d", "default": ' + "[" * 5000 + "]" * 5000 + "}", "nested more than"),
    "too large": (json.dumps({**INT8, "description": "x" * (_limits.MAX_PLAN_BYTES + 10)}), "larger than"),
    "path-like name": (json.dumps({**INT8, "name": "../../etc/cron.d/x"}), "plan name"),
    "too many overrides": (json.dumps({**INT8, "overrides": [{"pattern": f"t{i}", "method": "keep"}
                                                             for i in range(_limits.MAX_OVERRIDES + 1)]}),
                           "overrides, more than"),
}


@pytest.fixture(autouse=True)
def _fresh_streamlit_caches():
    st.cache_resource.clear()  # app_state caches the cache handle and the model per process
    st.cache_data.clear()
    yield
    st.cache_resource.clear()


def _error_text(at: AppTest) -> str:
    assert not at.exception, at.exception
    assert at.error, "no st.error shown"
    return " ".join(e.value for e in at.error)


# -- model path in the sidebar ---------------------------------------------------------------------------
def test_sidebar_model_whose_index_points_outside(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    idx_path = d / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    idx["weight_map"][sorted(idx["weight_map"])[0]] = "../../../../etc/passwd"
    idx_path.write_text(json.dumps(idx))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["model_path"] = str(d)
    at.run()
    assert "outside the model directory" in _error_text(at) and "root:" not in _error_text(at)


def test_sidebar_model_with_non_float_weights_is_named_on_the_model_page(tiny_llama_dir, tmp_path, monkeypatch):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    shard = sorted(d.glob("*.safetensors"))[0]
    with safe_open(str(shard), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    name = next(k for k, t in tensors.items() if t.ndim == 2)
    tensors[name] = (tensors[name] * 100).to(torch.int8)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    at = run_page("model", d, monkeypatch, tmp_path)
    assert not at.exception and not at.error
    assert any("I8" in w.value and "never analysed" in w.value for w in at.warning)


# -- plan upload on Budget and Runs ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(HOSTILE_PLANS))
def test_budget_plan_upload_is_bounded(kind, tiny_llama_dir, tmp_path, monkeypatch):
    text, expect = HOSTILE_PLANS[kind]
    at = run_page("budget", tiny_llama_dir, monkeypatch, tmp_path)
    assert not at.exception and not at.error
    at.file_uploader(key="budget_upload").set_value(("plan.json", text.encode(), "application/json")).run()
    assert expect in _error_text(at)
    assert at.session_state["budget_name"] == "my-plan"  # the widgets kept the last good plan


@pytest.mark.parametrize("kind", ["nested too deep", "path-like name"])
def test_runs_plan_upload_is_bounded(kind, tiny_llama_dir, tmp_path, monkeypatch):
    text, expect = HOSTILE_PLANS[kind]
    at = run_page("runs", tiny_llama_dir, monkeypatch, tmp_path)
    at.radio(key="runs_plan_kind").set_value("upload JSON").run()
    at.file_uploader(key="runs_plan_upload").set_value(("plan.json", text.encode(), "application/json")).run()
    assert expect in _error_text(at)
    assert Cache(tmp_path / "c.duckdb").execute("SELECT count(*) FROM runs") == [(0,)]


# -- run deletion and corpus path on Runs ----------------------------------------------------------------
def test_runs_page_deletes_only_checkpoints_sahc_created(tiny_llama_dir, tmp_path, monkeypatch):
    cache = Cache(tmp_path / "c.duckdb")
    ours = mark_owned(tmp_path / "runs" / "r-ours")  # what an assembly leaves
    (ours / "compressed-00001.safetensors").write_bytes(b"\0" * 2_000_000)
    theirs = tmp_path / "thesis"  # a run row (an old or crafted one) pointing at the user's folder
    theirs.mkdir()
    (theirs / "manifest.json").write_text("{}")
    (theirs / "thesis.tex").write_bytes(b"\0" * 3_000_000)
    now = utcnow()
    for rid, out in (("r-ours", ours), ("r-theirs", theirs)):
        cache.execute("INSERT INTO runs (run_id, plan_name, status, result, started_at, finished_at) VALUES "
                      "(?, 'p', 'done', ?, ?, ?)", [rid, to_json({"ppl": 1.0, "out_dir": str(out)}), now, now])
    at = run_page("runs", tiny_llama_dir, monkeypatch, tmp_path)
    assert not at.exception
    assert at.selectbox(key="runs_free_pick").options == ["r-ours (2.0 MB)"]  # the foreign folder is not offered
    at.checkbox(key="runs_free_sure").check().run()
    at.button(key="runs_free").click().run()
    assert not at.exception and any("2.0 MB freed" in s.value for s in at.success)
    assert not ours.exists() and (theirs / "thesis.tex").stat().st_size == 3_000_000


@pytest.mark.parametrize("corpus", ["/dev/zero", "fifo"])
def test_runs_page_refuses_a_device_or_pipe_corpus_before_starting(corpus, tiny_llama_dir, tmp_path, monkeypatch):
    import os

    if corpus == "fifo":
        corpus = str(tmp_path / "pipe.txt")
        os.mkfifo(corpus)
    cache = Cache(tmp_path / "c.duckdb")
    from sahc_core.plans.plan import CompressionPlan, save_plan

    save_plan(cache, CompressionPlan.from_dict(INT8))
    at = run_page("runs", tiny_llama_dir, monkeypatch, tmp_path)
    at.text_input(key="runs_corpus").input(corpus).run()
    at.button(key="runs_start").click().run()
    assert "not a regular file or a folder" in _error_text(at)
    assert cache.execute("SELECT count(*) FROM runs") == [(0,)]
    assert not Path(tmp_path / "jobs").exists()


def test_budget_page_survives_a_saved_plan_whose_name_is_no_longer_allowed(tiny_llama_dir, tmp_path, monkeypatch):
    """A cache written before plan names were checked: the page names the bad plan and stays usable."""
    Cache(tmp_path / "c.duckdb").save_plan("old/plan", {**INT8, "name": "old/plan"})
    at = run_page("budget", tiny_llama_dir, monkeypatch, tmp_path)
    assert "old/plan" in _error_text(at)
    assert any(m.label == "Total ratio (projected)" for m in at.metric)
