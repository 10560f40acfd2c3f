"""Numerical faults are named, never silent: NaN / Inf / empty tensors and non-finite perplexities.

A copy of the tiny llama (with its word tokenizer) gets ``model.layers.0.mlp.down_proj.weight`` with one
NaN and one Inf entry and an extra, empty ``model.layers.0.mlp.empty_proj.weight`` (0 x 64); a second
copy has its final norm scaled by 1e5, so its logits are huge but finite and exp(mean NLL) overflows.
Each command must exit != 0 with one line that names the tensor (or the window) and the reason, except
``scan`` and ``report``, which record the bad tensors and go on with the rest. The Spectrum and Report
pages say the same through AppTest.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from streamlit.testing.v1 import AppTest

from sahc_core.cli.main import EXIT_NUMERIC, main

ROOT = Path(__file__).resolve().parents[1]
BAD = "model.layers.0.mlp.down_proj.weight"
EMPTY = "model.layers.0.mlp.empty_proj.weight"


def _edit(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    idx_path = dst / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    name = edit.__defaults__[0]
    shard = dst / idx["weight_map"][name]
    tensors = load_file(str(shard))
    added = edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    for key in added:
        idx["weight_map"][key] = idx["weight_map"][name]
    idx_path.write_text(json.dumps(idx))
    return dst


@pytest.fixture(scope="module")
def nan_model(tiny_llama_tok_dir, tmp_path_factory) -> Path:
    def edit(t, name=BAD):
        w = t[name].clone()
        w[0, 0], w[1, 2] = math.nan, math.inf
        t[name] = w
        t[EMPTY] = torch.zeros(0, 64)
        return [EMPTY]
    return _edit(tiny_llama_tok_dir, tmp_path_factory.mktemp("faults") / "nan", edit)


@pytest.fixture(scope="module")
def nan_only_model(tiny_llama_tok_dir, tmp_path_factory) -> Path:
    """The NaN / Inf weight without the extra empty tensor: ``ppl`` and ``run`` map every checkpoint
    name onto the evaluated model first, and refuse a tensor the model has no parameter for."""
    def edit(t, name=BAD):
        w = t[name].clone()
        w[0, 0], w[1, 2] = math.nan, math.inf
        t[name] = w
        return []
    return _edit(tiny_llama_tok_dir, tmp_path_factory.mktemp("faults") / "nan-only", edit)


@pytest.fixture(scope="module")
def overflow_model(tiny_llama_tok_dir, tmp_path_factory) -> Path:
    def edit(t, name="model.norm.weight"):
        t[name] = t[name] * 1e5
        return []
    return _edit(tiny_llama_tok_dir, tmp_path_factory.mktemp("faults") / "big", edit)


@pytest.fixture()
def cache_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "c.duckdb"
    monkeypatch.setenv("SAHC_CACHE", str(path))
    return path


def _fails(capsys, argv: list[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == EXIT_NUMERIC, (code, out[-300:], err[-500:])
    assert len(lines) == 1 and "Traceback" not in err and "unexpected" not in err
    return lines[0]


def _json(capsys, argv: list[str]) -> dict:
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err[-500:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("tensor,why", [(BAD, "holds 1 NaN and 1 Inf value(s) among its 8,192 entries"),
                                        (EMPTY, "has no elements (shape (0, 64))")], ids=["nan-inf", "empty"])
def test_spectrum_names_the_tensor_and_why(tensor, why, nan_model, cache_file, capsys):
    line = _fails(capsys, ["spectrum", "--tensor", tensor, "--model", str(nan_model), "--device", "cpu"])
    assert f"tensor '{tensor}' {why}" in line and "spectrum is undefined" in line


def test_scan_records_the_bad_tensors_and_goes_on(nan_model, cache_file, capsys):
    res = _json(capsys, ["scan", "--model", str(nan_model), "--device", "cpu"])
    rows = {r["name"]: r for r in res["rows"]}
    assert res["n_tensors"] == len(rows) == 16  # 14 weights of the tiny llama + the empty one + the embedding
    assert "NaN" in rows[BAD]["error"] and rows[BAD]["sigma_max"] is None
    assert "no elements" in rows[EMPTY]["error"]
    good = [r for n, r in rows.items() if n not in (BAD, EMPTY)]
    assert all(r["error"] is None and r["sigma_max"] > 0 for r in good)
    again = _json(capsys, ["scan", "--model", str(nan_model), "--device", "cpu"])  # the reasons come from the cache
    assert {r["name"]: r["error"] for r in again["rows"]} == {n: r["error"] for n, r in rows.items()}
    assert all(r["cached"] for r in again["rows"])


@pytest.mark.parametrize("method", ["keep", "int", "svd"])
def test_measure_on_a_nan_tensor_is_named_not_a_zero_matrix(method, nan_model, cache_file, capsys):
    line = _fails(capsys, ["measure", "--tensor", BAD, "--method", method, "--model", str(nan_model),
                           "--device", "cpu"])
    assert f"tensor '{BAD}' holds 1 NaN and 1 Inf" in line and "no compression error can be measured" in line
    assert "zero matrix" not in line
    line = _fails(capsys, ["measure", "--tensor", EMPTY, "--method", method, "--model", str(nan_model)])
    assert "no elements" in line


def test_metrics_of_a_nan_tensor_are_nan_never_one():
    from sahc_core import metrics
    from sahc_core.methods import registry
    from sahc_core.methods.keep import KeepConfig

    W = torch.randn(4, 8)
    W[1, 1] = math.nan
    assert math.isnan(metrics.rel_error(W, W)) and math.isnan(metrics.compare(W, W)[0])
    assert metrics.rel_error(torch.zeros(4, 8), torch.ones(4, 8)) == 1.0  # a real zero W still scores 1.0
    m = registry.measure(W, KeepConfig())
    assert math.isnan(m["rel_error"])


@pytest.mark.parametrize("which,why", [("nan", "NaN or infinite in window 1 of"), ("big", "overflows float64")])
def test_ppl_of_a_model_with_non_finite_outputs_exits_nonzero(which, why, nan_only_model, overflow_model,
                                                              cache_file, capsys):
    model = nan_only_model if which == "nan" else overflow_model
    line = _fails(capsys, ["ppl", "--model", str(model), "--max-tokens", "300", "--window", "64", "--device", "cpu"])
    assert why in line and "perplexity" in line


def test_run_on_a_nan_tensor_fails_at_assembly_naming_it(nan_only_model, cache_file, tmp_path, capsys):
    from sahc_core.cache import Cache
    from sahc_core.runs.jobs import list_runs

    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"name": "int8", "default": {"method": "int", "bits": 8, "group_size": None}}))
    line = _fails(capsys, ["run", "--plan", str(plan), "--model", str(nan_only_model), "--cache", str(cache_file),
                           "--window", "64", "--max-tokens", "200"])
    assert f"tensor '{BAD}' holds 1 NaN" in line
    row = list_runs(Cache(cache_file)).iloc[0]
    assert row["status"] == "failed" and "cannot be compressed or kept" in row["error"]


def test_run_ppl_threshold_flag(capsys, tmp_path):
    from sahc_core.cli.main import build_parser

    args = build_parser().parse_args(["run", "--plan", "p.json", "--ppl-threshold", "0.25"])
    assert args.ppl_threshold == 0.25
    assert build_parser().parse_args(["run", "--plan", "p.json"]).ppl_threshold is None  # default: the gate's 0.10


@pytest.fixture()
def no_pareto(monkeypatch):
    """The Pareto grids (tens of measurements, and unrelated to the faults) are left out of the report."""
    import sahc_core.report.sections as sections

    monkeypatch.setattr(sections.rp, "middle_tensor", lambda table, *a, **k: None)
    monkeypatch.setattr(sections, "embedding_tensor", lambda table: None)


def test_report_and_study_name_the_bad_tensors_and_go_on(nan_model, cache_file, tmp_path, capsys, no_pareto):
    res = _json(capsys, ["report", "--model", str(nan_model), "--out", str(tmp_path / "rep"), "--study", "--no-tt",
                         "--no-images", "--device", "cpu"])
    assert [s["key"] for s in res["sections"]] == ["shares", "spectrum", "budget", "runs"]
    html = Path(res["html"]).read_text()
    assert f"Left out of the verdict: tensor &#x27;{BAD}&#x27; holds 1 NaN" in html
    fig = res["study_figures"]
    assert len(fig["tensors_without_spectrum"]) == 2 and any(BAD in e for e in fig["tensors_without_spectrum"])
    assert fig["ffn_min_rank_frac_0.1"]["n"] == 5  # 6 FFN matrices (+ the empty one) minus the two bad ones


# -- pages ---------------------------------------------------------------------------------------------
def _page(page: str, model: Path, monkeypatch, tmp_path) -> AppTest:
    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    monkeypatch.syspath_prepend(str(ROOT))
    at = AppTest.from_file(str(ROOT / "app_pages" / f"{page}.py"), default_timeout=180)
    at.session_state["model_path"] = str(model)
    return at.run()


def test_spectrum_page_names_the_bad_tensor_and_shows_the_rest(nan_model, monkeypatch, tmp_path):
    at = _page("spectrum", nan_model, monkeypatch, tmp_path)
    at.selectbox(key="sp_component").select("ffn").run()
    at.selectbox(key="sp_layer").select(0).run()
    at.selectbox(key="sp_tensor").select(BAD).run()
    assert not at.exception
    assert at.error and BAD in at.error[0].value and "NaN" in at.error[0].value
    at.radio(key="sp_mode").set_value("All projections of this layer").run()
    assert not at.exception and any(BAD in e.value for e in at.error)
    assert len(at.dataframe[0].value) == 2  # gate and up still plotted (the empty one is named too)
    at.radio(key="sp_scope").set_value("Whole model").run()
    at.button(key="sp_scan").click().run()
    assert not at.exception
    assert any(e.value.startswith("Not in the heatmaps") and BAD in e.value for e in at.error)
    assert any("14 tensor(s) scanned" in c.value for c in at.caption)


def test_report_page_warns_about_the_bad_tensor(nan_model, monkeypatch, tmp_path, no_pareto):
    at = _page("report", nan_model, monkeypatch, tmp_path)
    at.button(key="report_build").click().run()
    assert not at.exception
    assert any(BAD in w.value and "NaN" in w.value for w in at.warning)
