"""The plan optimizer end to end on the tiny llama: damage model, plan form, frontier, bad input, predictions."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sahc_core.cache import Cache
from sahc_core.calib.stats import CalibConfig
from sahc_core.errors import PlanError
from sahc_core.evaluate.model import load_model
from sahc_core.io.source import ModelSource
from sahc_core.plans import optimize as opt
from sahc_core.plans.candidates import CandidateGrid
from sahc_core.plans.plan import CompressionPlan, project
from sahc_core.plans.sensitivity import SensitivityConfig
from tiny_models import TINY_TEXT

TEXT = TINY_TEXT * 3
GRID = CandidateGrid(methods=("int", "gptq"), bits=(2, 4, 8), calibrated_bits=(3,), group_sizes=(32, None))
KW = dict(text=TEXT, calib_cfg=CalibConfig(tokens=256, heldout_tokens=128), sens_cfg=SensitivityConfig(tokens=256, window=64),
          smoke_tokens=128)


@pytest.fixture(scope="module")
def net(tiny_llama_tok_dir):
    return load_model(tiny_llama_tok_dir, device="cpu")


@pytest.fixture(scope="module")
def prep(tiny_llama_tok_dir, tmp_path_factory, net):
    cache = Cache(tmp_path_factory.mktemp("opt") / "c.duckdb")
    return opt.prepare(ModelSource.open(tiny_llama_tok_dir), cache, grid=GRID, load=lambda: net, **KW)


def test_damage_is_sensitivity_times_squared_held_out_error(prep):
    c, s = prep.candidates, prep.sensitivity.set_index("module")["sensitivity"]
    r = c[(c["tensor"] == "model.layers.0.mlp.up_proj.weight") & (c["label"] == "int2-row")].iloc[0]
    assert r["damage"] == pytest.approx(s["model.layers.0.mlp.up_proj"] * r["output_error"] ** 2)
    e = c[(c["tensor"] == "model.embed_tokens.weight") & (c["label"] == "int4-g32")].iloc[0]  # tied: lookup + head
    assert e["damage"] == pytest.approx(s["model.embed_tokens"] * e["lookup_output_error"] ** 2
                                        + s["lm_head"] * e["output_error"] ** 2)
    assert (c.loc[c["ndim"] == 1, "damage"] == 0).all()
    assert (c.loc[c["ndim"] == 2, "error_basis"] == "held-out output error").all()


def test_frontier_plans_are_within_budget_exact_and_carry_provenance(prep):
    targets = [1.5, 2.0, 3.0, 4.0]
    res = opt.optimize(prep, targets)
    damages = [r.solution.damage for r in res]
    assert all(np.diff(damages) >= -1e-12)  # a smaller budget never predicts less damage
    for r, target in zip(res, targets):
        assert r.plan is not None and r.solution.status == "optimal"
        proj = project(r.plan, prep.source)
        assert proj["ratio_projected"] >= target and proj["bytes_projected"] == r.solution.bytes
        chosen = r.solution.choice.set_index("tensor")
        got = proj["tensors"].set_index("name")
        for name in chosen.index[chosen["ndim"] == 2]:  # the plan JSON resolves to the solver's choice
            assert got.loc[name, "config"] == chosen.loc[name, "config"]  # the solver hands configs as dicts
        assert chosen["feasible"].all()  # gates are constraints
        again = CompressionPlan.from_json_text(r.plan.to_json())
        assert again.provenance == json.loads(json.dumps(r.plan.provenance)) and again.to_dict() == r.plan.to_dict()
        prov = again.provenance
        assert prov["kind"] == "optimized" and prov["predicted_dloss"] == pytest.approx(r.solution.damage)
        assert prov["solver"]["status"] == "optimal" and prov["damage_model"]["error"] == "held-out output error"
        assert all(o.pattern in set(chosen.index) for o in r.plan.overrides)  # exact names


def test_the_optimum_beats_every_uniform_setting_at_its_bytes(prep):
    """Independent check: for each uniform int-k plan, the optimum at its ratio predicts no more damage."""
    for bits, group in ((3, 32), (4, 32), (8, None)):
        plan = CompressionPlan.from_dict({"name": "u", "default": {"method": "int", "bits": bits, "group_size": group}})
        pred = opt.predict_plan(prep, plan)
        best = opt.optimize_plan(prep, pred["ratio"])
        assert best.solution.bytes <= pred["bytes"]
        if pred["feasible"]:
            assert best.solution.damage <= pred["predicted_dloss"] + 1e-12


def test_unreachable_target_names_the_best_ratio(prep):
    c = prep.candidates[prep.candidates["feasible"]]
    best = prep.original_bytes / c.groupby("tensor")["bytes"].min().sum()  # independent: least bytes per tensor
    with pytest.raises(PlanError, match=rf"best reachable ratio is {best:.2f}x"):
        opt.optimize_plan(prep, 50.0)
    assert opt.optimize(prep, [50.0, 2.0])[0].plan is None  # the frontier mode reports, never raises


def test_constraints_are_parsed_respected_and_contradictions_named(prep):
    cons = opt.parse_constraints(["only=int", "max-bits=embedding:4", "one-group-size"])
    r = opt.optimize_plan(prep, 3.0, cons)
    ch = r.solution.choice
    assert set(ch["method"]) <= {"int", "keep"}
    assert (ch.loc[ch["component"] == "embedding", "bits"] <= 4).all()
    assert ch["group_size"].dropna().nunique() == 1
    assert r.plan.provenance["constraints"]["only_methods"] == ["int"]
    keep_emb = opt.optimize_plan(prep, 1.5, opt.parse_constraints(["keep=embedding"]))
    assert set(keep_emb.solution.choice.query("component == 'embedding'")["method"]) == {"keep"}
    with pytest.raises(ValueError, match="embedding"):
        opt.parse_constraints(["keep=embedding", "max-bits=embedding:8"])
    with pytest.raises(ValueError, match="unknown constraint"):
        opt.parse_constraints(["fast"])
    with pytest.raises(ValueError, match="COMPONENT:BITS"):
        opt.parse_constraints(["max-bits=embedding"])
    with pytest.raises(ValueError, match="positive number"):
        opt.optimize(prep, [0.0])


def test_without_calibration_falls_back_and_says_so(tiny_llama_tok_dir, tmp_path, net):
    p = opt.prepare(ModelSource.open(tiny_llama_tok_dir), Cache(tmp_path / "c.duckdb"), calibration=False,
                    grid=GRID, load=lambda: net, **KW)
    assert p.calib is None and "gptq" not in set(p.candidates["method"])
    assert any("calibration-free" in n and "gptq" in n for n in p.notes)
    two_d = p.candidates[p.candidates["ndim"] == 2]
    assert (two_d["error_basis"] == "weight error").all()
    s = p.sensitivity.set_index("module")["sensitivity"]
    r = two_d[(two_d["tensor"] == "model.layers.1.self_attn.o_proj.weight") & (two_d["label"] == "int2-row")].iloc[0]
    assert r["damage"] == pytest.approx(s["model.layers.1.self_attn.o_proj"] * r["rel_error"] ** 2)
    res = opt.optimize_plan(p, 3.0)
    assert res.plan.provenance["notes"] == p.notes
    assert res.plan.provenance["damage_model"]["error"].startswith("weight error")


def test_predict_plan_measures_settings_outside_the_grid(prep):
    plan = CompressionPlan.from_dict({"name": "hand", "default": {"method": "int", "bits": 5, "group_size": 16},
                                      "components": {"embedding": {"method": "int", "bits": 8, "group_size": None}}})
    pred = opt.predict_plan(prep, plan)
    rows = pred["tensors"].set_index("tensor")
    assert math.isclose(pred["predicted_dloss"], float(rows["damage"].sum()))
    assert rows.loc["model.layers.0.mlp.down_proj.weight", "label"] == "int5-g16"
    assert pred["bytes"] == project(plan, prep.source)["bytes_projected"]
    tagged = opt.with_prediction(plan, prep)
    assert tagged.provenance["kind"] == "hand" and tagged.provenance["predicted_dloss"] == pred["predicted_dloss"]


def test_a_calibration_text_too_short_falls_back_and_names_the_reason(tiny_llama_tok_dir, tmp_path, net):
    kw = {**KW, "calib_cfg": CalibConfig(tokens=4096, heldout_tokens=512)}  # the text has 702 tokens
    p = opt.prepare(ModelSource.open(tiny_llama_tok_dir), Cache(tmp_path / "c.duckdb"), grid=GRID,
                    load=lambda: net, tensors=["model.layers.0.mlp.up_proj.weight"], **kw)
    assert p.calib is None and set(p.candidates["method"]) == {"keep", "int"}
    assert any("702 tokens" in n for n in p.notes) and any("calibration-free" in n for n in p.notes)


def test_plan_provenance_must_be_an_object():
    with pytest.raises(PlanError, match="provenance"):
        CompressionPlan.from_dict({"name": "x", "default": {"method": "keep"}, "provenance": [1, 2]})
    plan = CompressionPlan.from_dict({"name": "x", "default": {"method": "keep"}})
    assert "provenance" not in plan.to_dict()  # absent stays absent (older plans are unchanged)
