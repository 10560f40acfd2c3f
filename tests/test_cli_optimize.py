"""``python -m sahc_core optimize``: the design.md contract, the plan file, the frontier mode, errors."""
from __future__ import annotations

import json

import pytest

from sahc_core.cli.main import main
from sahc_core.io.source import ModelSource
from sahc_core.plans.plan import CompressionPlan, load_plans, project

FAST = ["--methods", "int", "--bits", "2,4,8", "--group-sizes", "row", "--no-calib"]
# a short calibration text keeps the sensitivity pass and the smoke tokens small (702 tokens)


def _json(capsys, argv: list[str]) -> dict:
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _error(capsys, argv: list[str]) -> str:
    code = main(argv)
    _, err = capsys.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_optimize_contract_plan_file_frontier_and_errors(capsys, tiny_llama_tok_dir, tmp_path, monkeypatch):
    from tiny_models import TINY_TEXT

    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    (tmp_path / "calib.txt").write_text(TINY_TEXT * 3, encoding="utf-8")
    model = ["--model", str(tiny_llama_tok_dir), "--corpus", str(tmp_path / "calib.txt")]
    out = tmp_path / "plan.json"
    res = _json(capsys, ["optimize", *model, "--target-ratio", "2.5", "--out", str(out), "--save", *FAST])
    for key in ("ratio_projected", "bytes_projected", "predicted", "status", "plan"):
        assert key in res
    assert res["status"] == "optimal" and res["ratio_projected"] >= 2.5
    assert any("calibration-free" in n for n in res["notes"])
    plan = CompressionPlan.from_json(out)
    assert plan.to_dict() == res["plan"] and plan.provenance["predicted_dloss"] == pytest.approx(res["predicted"])
    assert project(plan, ModelSource.open(tiny_llama_tok_dir))["bytes_projected"] == res["bytes_projected"]
    assert plan.name in load_plans(__import__("sahc_core.cache", fromlist=["Cache"]).Cache())

    front = _json(capsys, ["optimize", *model, "--target-ratio", "1.5", "2.5", "50", *FAST])["frontier"]
    assert [f["target_ratio"] for f in front] == [1.5, 2.5, 50.0]
    assert front[1]["predicted"] == pytest.approx(res["predicted"])  # same candidates from the cache
    assert front[0]["predicted"] <= front[1]["predicted"] and front[2]["plan"] is None
    assert "best reachable ratio" in front[2]["message"]

    assert "best reachable ratio" in _error(capsys, ["optimize", *model, "--target-ratio", "50", *FAST])
    assert "embedding" in _error(capsys, ["optimize", *model, "--target-ratio", "2", *FAST, "--constraints",
                                          "keep=embedding", "max-bits=embedding:4"])
    assert "--out writes one plan" in _error(capsys, ["optimize", *model, "--target-ratio", "2", "3", "--out",
                                                      str(out), *FAST])
    assert "--group-sizes takes" in _error(capsys, ["optimize", *model, "--target-ratio", "2", "--methods", "int",
                                                    "--group-sizes", "big"])
