"""Measured frontier of finished runs and the predicted-vs-measured check (runs.frontier, figures.frontier)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from sahc_core.cache import Cache, to_json, utcnow
from sahc_core.figures.frontier import choice_heatmap, frontier_figure, prediction_figure
from sahc_core.runs.frontier import measured_frontier, prediction_check, run_points, spearman

BASE = 10.0
RUNS = [  # (plan, ratio, ppl, gates failed)
    ({"name": "int8", "default": {"method": "int", "bits": 8, "group_size": None},
      "overrides": [{"pattern": "*norm*", "method": "keep"}]}, 1.9, 10.05, 0),
    ({"name": "int4-g64", "default": {"method": "int", "bits": 4, "group_size": 64}}, 3.5, 12.0, 0),
    ({"name": "int3-g64", "default": {"method": "int", "bits": 3, "group_size": 64}}, 4.5, 30.0, 2),
    ({"name": "opt-3.5x", "default": {"method": "gptq", "bits": 4, "group_size": 64},
      "provenance": {"kind": "optimized", "predicted_dloss": 0.1}}, 3.6, 11.0, 0),
    ({"name": "opt-4.5x", "default": {"method": "gptq", "bits": 3, "group_size": 64},
      "provenance": {"kind": "optimized", "predicted_dloss": 0.4}}, 4.6, 16.0, 0),
    ({"name": "svd-study", "default": {"method": "int", "bits": 4, "group_size": 128},
      "components": {"ffn": {"method": "svd", "rank_fraction": 0.5, "bits": 4, "group_size": 64}}}, 4.0, 40.0, 1),
]


@pytest.fixture()
def cache(tmp_path):
    c = Cache(tmp_path / "c.duckdb")
    for i, (plan, ratio, ppl, failed) in enumerate(RUNS):
        result = {"ratio_actual": ratio, "ppl": ppl, "baseline_ppl": BASE, "gates_passed": 10, "gates_failed": failed,
                  "protocol": {"text": "shakespeare", "tokens": 4096, "window": 2048}}
        c.execute("INSERT INTO runs (run_id, plan_name, plan, model_fp, status, result, started_at) VALUES "
                  "(?, ?, ?, 'fp', 'done', ?, ?)", [f"r{i}", plan["name"], to_json(plan), to_json(result), utcnow()])
    c.execute("INSERT INTO runs (run_id, plan_name, plan, model_fp, status, started_at) VALUES "
              "('live', 'x', '{}', 'fp', 'running', ?)", [utcnow()])
    return c


def test_points_kinds_and_log_ppl(cache):
    pts = run_points(cache).set_index("plan_name")
    assert len(pts) == len(RUNS)  # the running one is left out
    assert pts.loc["int4-g64", "kind"] == "uniform" and pts.loc["int4-g64", "label"] == "int4-g64"
    assert pts.loc["int8", "kind"] == "uniform"  # keep overrides do not make a hand plan
    assert pts.loc["opt-3.5x", "kind"] == "optimized" and pts.loc["svd-study", "kind"] == "hand"
    assert pts.loc["opt-4.5x", "delta_log_ppl"] == pytest.approx(math.log(16.0 / BASE))
    assert pts.loc["opt-4.5x", "predicted_dloss"] == 0.4 and math.isnan(pts.loc["int8", "predicted_dloss"])
    assert pts.loc["int8", "protocol"] == "shakespeare, 4096 tokens, window 2048"
    assert run_points(cache, model_fp="other").empty


def test_measured_frontier_is_the_pareto_set(cache):
    pts = run_points(cache)
    front = set(measured_frontier(pts)["plan_name"])
    brute = {a.plan_name for a in pts.itertuples()
             if not any((b.ratio >= a.ratio and b.ppl <= a.ppl) and (b.ratio > a.ratio or b.ppl < a.ppl)
                        for b in pts.itertuples())}
    assert front == brute == {"int8", "opt-3.5x", "opt-4.5x"}
    assert list(measured_frontier(pts)["ratio"]) == sorted(measured_frontier(pts)["ratio"])


def test_spearman_against_ranks_by_hand():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=12), rng.normal(size=12)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))  # no ties: ranks 0..n-1
    n = len(x)
    by_hand = 1 - 6 * float(((rx - ry) ** 2).sum()) / (n * (n * n - 1))
    assert spearman(x, y) == pytest.approx(by_hand)
    assert spearman(x, 2 * x + 1) == pytest.approx(1.0) and math.isnan(spearman(x[:2], y[:2]))
    assert spearman(np.r_[x, np.nan], np.r_[y, 1.0]) == pytest.approx(by_hand)  # non-finite pairs dropped


def test_prediction_check_uses_runs_with_a_prediction(cache):
    pts = run_points(cache)
    chk = prediction_check(pts)
    assert chk["n"] == 2 and set(chk["points"]["plan_name"]) == {"opt-3.5x", "opt-4.5x"}
    assert math.isnan(chk["spearman"])  # two points
    more = pd.concat([pts, pts.assign(predicted_dloss=[0.01, 0.05, 0.2, np.nan, np.nan, 0.6])], ignore_index=True)
    chk = prediction_check(more)
    assert chk["n"] == 6 and -1 <= chk["spearman"] <= 1
    fig = prediction_figure(chk["points"], chk["spearman"])
    assert f"{chk['spearman']:.2f}" in fig.layout.title.text


def test_frontier_figure_traces(cache):
    pts = run_points(cache)
    fig = frontier_figure(pts, measured_frontier(pts))
    names = [t.name for t in fig.data]
    assert names == ["uniform RTN int-k", "optimised plans", "hand plans (study style)", "measured frontier"]
    uniform = fig.data[0]
    assert list(uniform.marker.symbol) == ["circle", "circle", "circle-open"]  # int3-g64 failed its gates
    assert fig.layout.yaxis.type == "log"


def test_choice_heatmap_layers_by_projection():
    rows = [{"tensor": f"model.layers.{i}.mlp.{k}.weight", "kind": k, "layer": i, "ndim": 2, "bytes": b,
             "orig_bytes": 2000, "label": f"int{8 * b // 1000}"} for i, (k, b) in
            itertools.product(range(3), [("up_proj", 500), ("down_proj", 250)])]
    rows.append({"tensor": "model.embed_tokens.weight", "kind": "embed_tokens", "layer": pd.NA, "ndim": 2,
                 "bytes": 1000, "orig_bytes": 2000, "label": "int8"})
    fig = choice_heatmap(pd.DataFrame(rows))
    hm = fig.data[0]
    assert list(hm.y) == ["-", "0", "1", "2"] and set(hm.x) == {"up_proj", "down_proj", "embed_tokens"}
    z = pd.DataFrame(hm.z, index=hm.y, columns=hm.x)
    assert z.loc["1", "up_proj"] == pytest.approx(4.0) and z.loc["-", "embed_tokens"] == pytest.approx(8.0)
