"""Reproduce-the-study tables: index scaling, σ table, SVD+int4 summary, TT table, final table, on a tiny model."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sahc_core.report import study as sd


@pytest.mark.parametrize("i,k,expected", [(512, 4096, 512), (1024, 4096, 1024), (512, 576, 72), (2048, 576, 288),
                                          (1, 64, 1), (2048, 64, 32), (512, 8, 1)])
def test_scaled_index_keeps_the_fraction(i, k, expected):
    assert sd.scaled_index(i, k) == expected


def test_sigma_table_against_numpy():
    g = np.random.default_rng(0)
    W = g.standard_normal((96, 64))
    s = np.linalg.svd(W, compute_uv=False)
    t = sd.sigma_table(s, W.shape).set_index("σ")
    assert list(t.index) == ["σ₁", "σ₅₁₂", "σ₁₀₂₄", "σ₂₀₄₈", "σₘᵢₙ"]
    assert t.loc["σ₁", "value"] == pytest.approx(s[0], abs=1e-4)
    assert t.loc["σ₅₁₂", "index here"] == 8 and t.loc["σ₅₁₂", "value"] == pytest.approx(s[7], abs=1e-4)
    assert t.loc["σₘᵢₙ", "% of σ₁"] == pytest.approx(100 * s[-1] / s[0], abs=1e-3)


def test_summarize_svd_counts_worse_than_zeros():
    rows = pd.DataFrame({"layer": [0, 0, 1, 1], "orig_bytes": [100] * 4, "svd_bytes": [10, 10, 20, 20],
                         "trunc_error": [0.5, 0.6, 0.7, 0.8], "eym_error": [0.5, 0.6, 0.7, 0.8],
                         "total_error": [0.9, 1.02, 0.95, 0.97], "int4_bytes": [25] * 4,
                         "int4_error": [0.1, 0.1, 0.1, 0.1]})
    t = sd.summarize_svd(rows).set_index("metric")
    assert t.loc["compression ratio (projected)", "SVD + int4"] == pytest.approx(400 / 60)
    assert t.loc["compression ratio (projected)", "direct int4"] == pytest.approx(4.0)
    assert t.loc["mean total error", "SVD + int4"] == pytest.approx(np.mean([0.9, 1.02, 0.95, 0.97]))
    assert t.loc["tensors worse than zeros (error ≥ 1.0)", "SVD + int4"] == "1 of 4"
    assert t.loc["layers with a tensor worse than zeros", "SVD + int4"] == "1 of 2"
    assert t.loc["layers with a tensor worse than zeros", "direct int4"] == "0 of 2"


def test_tt_table_gate():
    sweep = pd.DataFrame({"tt_ranks": ["[1, 8, 8, 1]", "[1, 64, 64, 1]"], "ratio": [100.0, 3.9],
                          "cosine": [0.8, 0.96]})
    t = sd.tt_table(sweep)
    assert t["TT Config"].tolist() == ["[1, 8, 8, 1]", "[1, 64, 64, 1]"]
    assert sd.tt_table(sweep.assign(tt_ranks=[(1, 8, 8, 1), [1, 64, 64, 1]]))["TT Config"].tolist() == \
        ["[1, 8, 8, 1]", "[1, 64, 64, 1]"]
    assert t.iloc[:, -1].tolist() == ["❌ FAIL", "✅ PASS"]
    assert t.columns[-1] == "Quality Gate (cos ≥ 0.95)"


@pytest.fixture(scope="module")
def study(tiny_llama_dir, tmp_path_factory):
    from sahc_core.cache import Cache
    from sahc_core.io.source import ModelSource

    src = ModelSource.open(tiny_llama_dir)
    cache = Cache(tmp_path_factory.mktemp("study") / "c.duckdb")
    calls = []
    res = sd.reproduce_study(src, cache, device="cpu", progress=lambda d, t, w: calls.append(w))
    return src, cache, res, calls


def test_study_tables_on_tiny_llama(study):
    src, _, res, calls = study
    titles = list(res.tables)
    assert titles[0] == "Architecture breakdown" and titles[-1] == "Final results"
    assert any(t.startswith("Singular values of model.layers.") for t in titles)
    assert any(t.startswith("Tensor-Train sweep of model.embed_tokens.weight") for t in titles)
    arch = res.tables["Architecture breakdown"]
    assert arch["% of Params"].sum() == pytest.approx(100, abs=0.2)
    assert res.tables["Final results"].iloc[0]["Final Method"] == "no run yet"
    assert calls and set(res.notes) == set(res.tables) - {"SVD + int4 per FFN tensor"}


def test_study_min_rank_and_svd_numbers_are_independent_svds(study):
    src, _, res, _ = study
    mr = res.tables["Minimum rank for SVD error < 0.10"].set_index("tensor")
    assert list(mr.index) == ["gate_proj", "up_proj", "down_proj"]
    for kind, row in mr.iterrows():
        s = np.linalg.svd(src.read(row["name"]).double().numpy(), compute_uv=False)
        err = np.sqrt(np.append(np.cumsum((s**2)[::-1])[::-1], 0.0) / (s**2).sum())
        assert row["min rank (error < 0.10)"] == int(np.argmax(err <= 0.10))
    per = res.tables["SVD + int4 per FFN tensor"]
    assert len(per) == 6  # 2 layers x gate/up/down
    name = per.iloc[0]["tensor"]
    W = src.read(name).double().numpy()
    s = np.linalg.svd(W, compute_uv=False)
    r = max(1, round(sd.SVD_RANK_FRACTION * min(W.shape)))
    assert per.iloc[0]["eym_error"] == pytest.approx(np.sqrt((s[r:] ** 2).sum() / (s**2).sum()), abs=1e-4)
    assert (per["total_error"] >= per["trunc_error"] - 1e-6).all()


def test_study_final_table_reads_latest_done_run(study):
    src, cache, _, _ = study
    from sahc_core.io.components import tensor_table
    from sahc_core.runs.jobs import new_run_id

    plan = {"name": "int8-all", "default": {"method": "int", "bits": 8, "group_size": 32}}
    rid = new_run_id()
    cache.execute("INSERT INTO runs (run_id, plan_name, plan, model_path, model_fp, status, result, started_at) "
                  "VALUES (?, ?, ?, ?, ?, 'done', ?, now())",
                  [rid, "int8-all", json.dumps(plan), str(src.path), src.fingerprint,
                   json.dumps({"ratio_projected": 1.9, "ratio_actual": 1.88, "ppl": 11.0, "baseline_ppl": 10.0})])
    table, note = sd.final_table(src, cache, tensor_table(src))
    assert table.iloc[-1]["Component"] == "Total" and table.iloc[-1]["Compression"] == pytest.approx(1.88)
    assert "Perplexity: 11.00 (baseline 10.00, +10%)" in note and rid in note
    assert set(table["Final Method"].iloc[:-1]) <= {"int", "keep", "int, keep"}
