"""Report: captions computed from the data, sections on a tiny model, exports, CLI command, page."""
from __future__ import annotations

import argparse
import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sahc_core.report import build as rp
from sahc_core.report.export import ExportUnavailable, browser_path, figure_images, report_html, write_report

APP = str(Path(__file__).resolve().parents[1] / "app.py")


# -- pure numbers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n", [(64, 64), (128, 64), (64, 128), (1536, 576), (7, 3)])
def test_break_even_matches_brute_force(m, n):
    # largest r that stores fewer values as factors than dense, found by counting
    r_max = max(r for r in range(0, min(m, n) + 1) if r * (m + n) < m * n)
    f = rp.break_even_fraction(m, n)
    assert r_max / min(m, n) < f <= (r_max + 1) / min(m, n)


def _min_rank_np(W: np.ndarray, eps: float) -> int:
    s = np.linalg.svd(W, compute_uv=False)
    e2 = np.cumsum((s**2)[::-1])[::-1] / (s**2).sum()  # e2[r] = sum_{i>=r} / total (0-based)
    tail = np.append(e2, 0.0)                           # error of keeping r = sqrt(tail[r])
    return int(np.argmax(np.sqrt(tail) <= eps))


def test_spectrum_verdict_low_rank_vs_noise():
    g = np.random.default_rng(0)
    low = g.standard_normal((96, 4)) @ g.standard_normal((4, 64))        # rank 4: truncation saves bytes
    noise = g.standard_normal((96, 64))                                    # flat spectrum: it cannot
    rows = []
    for name, comp, W in (("a.weight", "attention_full", low), ("f.weight", "ffn", noise)):
        rows.append({"name": name, "component": comp, "kind": "x", "layer": 0, "shape": W.shape,
                     "min_rank_0.1": _min_rank_np(W, 0.1)})
    per_tensor, per_comp = rp.spectrum_verdict(pd.DataFrame(rows))
    by = per_comp.set_index("component")
    assert by.loc["attention_full", "n_saving"] == 1 and by.loc["ffn", "n_saving"] == 0
    assert by.loc["attention_full", "rank_fraction_median"] == pytest.approx(4 / 64)
    ffn = rp.component_sentence(by.reset_index().iloc[list(by.index).index("ffn")])
    assert ffn.startswith("FFN needs") and "cannot save bytes here" in ffn
    pct = round(100 * _min_rank_np(noise, 0.1) / 64)
    assert f"{pct} % of full rank" in ffn
    att = rp.component_sentence(by.reset_index().iloc[list(by.index).index("attention_full")])
    assert att.endswith("saves bytes on its only tensor.")  # never "all 1 tensors"


def test_spectrum_verdict_needs_min_rank_column():
    with pytest.raises(ValueError, match="min_rank_0.1"):
        rp.spectrum_verdict(pd.DataFrame({"name": ["a"], "shape": [(2, 2)]}))


def test_pareto_mask_against_brute_force():
    g = np.random.default_rng(1)
    ratio, err = g.uniform(1, 10, 40), g.uniform(0, 1, 40)
    mask = rp.pareto_mask(ratio, err)
    # independent: a point is optimal iff no other point has >= ratio and <= error with one strict
    order = np.lexsort((err, -ratio))  # by ratio desc, then error asc
    best_err, front = np.inf, set()
    for i in order:
        if err[i] < best_err:
            front.add(int(i))
            best_err = err[i]
    assert {i for i, m in enumerate(mask) if m} == front


def test_caption_pareto_int_dominates_and_svd_wins():
    pts = pd.DataFrame([
        {"method": "int", "bits": 4, "label": "int4", "ratio": 3.6, "rel_error": 0.09},
        {"method": "svd", "bits": 4, "label": "SVD a", "ratio": 3.2, "rel_error": 0.30},
    ])
    assert "int-k dominates" in rp.caption_pareto(pts, "T")
    pts.loc[1, ["ratio", "rel_error"]] = [8.0, 0.05]
    cap = rp.caption_pareto(pts, "T")
    assert "gives 8.00×, so it beats int4" in cap


def test_caption_shares_and_runs():
    shares = pd.DataFrame({"component": ["ffn", "embedding"], "params": [75, 25], "share": [0.75, 0.25]})
    assert rp.caption_shares(shares) == ("FFN holds 75 % of the 100 parameters; the embedding / LM head 25 %, "
                                         "a share int-k alone must carry.")
    empty = pd.DataFrame(columns=["status", "ppl", "ratio", "plan_name", "baseline_ppl"])
    assert rp.caption_runs(empty).startswith("No finished run")
    runs = pd.DataFrame([{"status": "done", "ppl": 12.0, "ratio": 3.9, "plan_name": "int4", "baseline_ppl": 8.0,
                          "gates_failed": 0},
                         {"status": "done", "ppl": 40.0, "ratio": 4.4, "plan_name": "svd", "baseline_ppl": 8.0,
                          "gates_failed": 3},
                         {"status": "done", "ppl": float("inf"), "ratio": 9.0, "plan_name": "tt", "baseline_ppl": 8.0,
                          "gates_failed": 1},
                         {"status": "failed", "ppl": None, "ratio": 5.0, "plan_name": "x", "baseline_ppl": None,
                          "gates_failed": None}])
    # the higher-ratio 'svd' run failed a gate, so it is not the best
    assert rp.caption_runs(runs) == ("Best run passing every gate 'int4': 3.90× at perplexity 12.00 (its baseline "
                                     "8.00, +50 %); 2 finished runs in total, 1 with failed gates.")
    assert rp.caption_runs(runs[runs["plan_name"] == "svd"]).startswith("Every finished run failed a quality gate")


# -- the report on a tiny model ----------------------------------------------------------------------
@pytest.fixture()
def built(tiny_llama_report):
    """``(source, cache, report, progress calls)`` of the tiny llama (built once per session, conftest.py)."""
    return tiny_llama_report


def test_report_sections_in_story_order(built):
    src, _, report, calls = built
    assert [s.key for s in report.sections] == ["shares", "spectrum", "pareto-1", "pareto-2", "budget", "runs"]
    assert all(s.caption and not s.caption.startswith("Not available") for s in report.sections)
    assert calls and calls[-1][0] == calls[-1][1]
    assert report.fingerprint == src.fingerprint


def test_spectrum_section_numbers_are_the_model_svd(built):
    src, _, report, _ = built
    tbl = report.section("spectrum").table.set_index("component")
    ffn_names = [t.name for t in src.tensors() if ".mlp." in t.name]
    fr = [_min_rank_np(src.read(n).double().numpy(), 0.1) / min(src.info(n).shape) for n in ffn_names]
    assert tbl.loc["FFN", "min_rank_pct_median"] == pytest.approx(100 * float(np.median(fr)), abs=0.06)
    assert report.section("spectrum").caption.startswith("FFN needs")


def test_pareto_section_measures_real_errors(built):
    src, _, report, _ = built
    sec = report.section("pareto-1")
    name = rp.middle_tensor(__import__("sahc_core.io.components", fromlist=["x"]).tensor_table(src))
    assert name in sec.title
    pts = sec.table
    assert {"int", "svd"} <= set(pts["method"])
    # independent check of the int8 point: per-group asym round-to-nearest error is tiny, int2 is large
    e = pts.set_index("label")["rel_error"]
    assert e[[k for k in e.index if k.startswith("int8")][0]] < 0.01 < e[[k for k in e.index if k.startswith("int2")][0]]
    assert pts["pareto"].any()


def test_export_html_embeds_plotly_once(built, tmp_path):
    _, _, report, _ = built
    doc = report_html(report)
    n_figs = sum(len(s.figures) for s in report.sections)
    assert doc.count("Plotly.newPlot") == n_figs
    assert len(re.findall(r"plotly\.js v\d", doc)) == 1  # the library banner, once
    assert not re.search(r"<script[^>]*\ssrc=", doc)  # no external script: works offline
    for s in report.sections:
        assert html.escape(s.caption) in doc


def test_write_report_tables_roundtrip_and_no_browser(built, tmp_path, monkeypatch):
    _, cache, report, _ = built
    from sahc_core.gates import audit_log

    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chrome"))
    out = write_report(report, tmp_path / "out", audit=audit_log(cache))
    assert Path(out["html"]).is_file() and out["figures"] == []
    assert "Chrome/Chromium" in out["images_error"] and "\n" not in out["images_error"]
    shares = pd.read_csv(tmp_path / "out" / "tables" / "shares.csv")
    assert shares["params"].sum() == report.section("shares").table["params"].sum()
    assert (tmp_path / "out" / "audit_log.csv").is_file()
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_figure_images_without_browser_is_clear(monkeypatch, tmp_path):
    import plotly.graph_objects as go

    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "missing"))
    assert browser_path() is None
    with pytest.raises(ExportUnavailable, match="apt-get install -y chromium"):
        figure_images({"a": go.Figure()}, "png")
    with pytest.raises(ValueError, match="png"):
        figure_images({"a": go.Figure()}, "gif")


@pytest.mark.skipif(browser_path() is None, reason="no Chrome/Chromium binary")
def test_figure_png_and_svg_with_chromium(built):
    _, _, report, _ = built
    fig = report.section("shares").figures[0]
    png = figure_images({"s": fig}, "png", width=400, height=300, scale=1)["s"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (w, h) == (400, 300)
    svg = figure_images({"s": fig}, "svg", width=400, height=300)["s"].decode()
    assert svg.lstrip().startswith("<svg") and "FFN" in svg


# -- CLI command ------------------------------------------------------------------------------------
def _parser():
    from sahc_core.cli.report import add_report_parser

    common = argparse.ArgumentParser(add_help=False)
    for flag in ("--model", "--cache"):
        common.add_argument(flag)
    for flag in ("--json", "--no-cache", "--debug"):
        common.add_argument(flag, action="store_true")
    common.add_argument("--device", default="auto")
    p = argparse.ArgumentParser()
    add_report_parser(p.add_subparsers(dest="command", required=True), common)
    return p


def test_cmd_report_writes_everything(tiny_llama_dir, tmp_path):
    args = _parser().parse_args(["report", "--model", str(tiny_llama_dir), "--cache", str(tmp_path / "c.duckdb"),
                                 "--out", str(tmp_path / "rep"), "--no-images", "--device", "cpu"])
    res = args.func(args)
    assert Path(res["html"]).is_file() and res["images_error"] is None
    assert [s["key"] for s in res["sections"]][0] == "shares"
    assert {Path(p).name for p in res["tables"]} >= {"shares.csv", "spectrum.csv", "budget.csv", "runs.csv"}
    json.dumps(res)  # JSON-able for --json


def test_cli_report_wired(tiny_llama_dir, tmp_path, capsys):
    from sahc_core.cli.main import build_parser, main

    assert "report" in build_parser()._subparsers._group_actions[0].choices
    code = main(["report", "--model", str(tiny_llama_dir), "--cache", str(tmp_path / "c.duckdb"),
                 "--out", str(tmp_path / "r"), "--no-images", "--device", "cpu", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["html"].endswith("report.html")


# -- page -------------------------------------------------------------------------------------------
def test_report_page_build_present_and_exit(tiny_llama_dir, monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["model_path"] = str(tiny_llama_dir)
    at.run()
    at.switch_page("app_pages/report.py").run()
    assert not at.exception and at.title[0].value == "Report"
    at.button(key="report_build").click().run()
    assert not at.exception and not at.error
    heads = [h.value for h in at.subheader]
    assert heads[0] == "1. Where the parameters live" and any(h.startswith("5. Runs") for h in heads)
    assert any("FFN needs" in m.value for m in at.markdown)
    at.button(key="report_present_on").click().run()
    assert not at.exception
    assert [b.key for b in at.button] == ["report_exit"]          # no widgets but the way out
    at.button(key="report_exit").click().run()
    assert not at.exception and any(b.key == "report_build" for b in at.button)
