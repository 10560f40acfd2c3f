"""Defaults that work on every tensor: each registered method's schema defaults (and the CLI's default
commands, page defaults and shipped plans) apply to every 2-D tensor of the default model, fitting
group sizes that do not divide (576 wide: 128 -> 96) and saying so."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sahc_core.io.components import tensor_table
from sahc_core.io.source import ModelSource
from sahc_core.methods import registry
from sahc_core.methods.quant import QuantConfig
from sahc_core.methods.rtn import divisor_fallback
from sahc_core.plans.plan import CompressionPlan, resolve
from sahc_core.whatif.measure import measure_tensor
from sahc_core.workspace import Workspace

PLANS = sorted((Path(__file__).resolve().parents[1] / "plans").glob("*.json"))


@pytest.fixture(scope="module")
def table(default_model):
    t = tensor_table(ModelSource.open(default_model))
    return t[t["shape"].map(len) >= 2]


def test_divisor_fallback_rule():
    assert divisor_fallback(576, 128) == 96      # largest divisor of 576 within 2x below 128
    assert divisor_fallback(1536, 128) == 128
    assert divisor_fallback(4304, 128) is None   # divisors stop at 16: per row
    assert divisor_fallback(4, 128) is None      # a 4-wide conv kernel: per row
    assert divisor_fallback(48, 64) == 48


def test_every_method_default_fits_every_2d_tensor(table):
    """Schema defaults -> a config that fits (possibly adapted) every tensor the method may take."""
    for spec in registry.methods():
        if spec.needs_calibration:
            continue
        cfg = registry.config_from_values(spec.name, {})
        for rec in table.itertuples():
            if not registry.applicable(spec, tuple(rec.shape), rec.component):
                continue
            fitted, note = registry.fit_to_shape(tuple(rec.shape), rec.component, cfg)
            assert registry.projected_bytes(rec.shape, fitted) > 0
            if note is not None:
                assert "does not divide" in note, (spec.name, rec.name, note)


def test_every_method_default_measures_one_tensor_of_each_shape(default_model, table):
    """The measurement path itself, once per distinct (shape, component) and method."""
    src, ws = ModelSource.open(default_model), Workspace()
    seen = set()
    for rec in table.itertuples():
        key = (tuple(rec.shape), rec.component)
        if key in seen:
            continue
        seen.add(key)
        for spec in registry.methods():
            if spec.needs_calibration or not registry.applicable(spec, key[0], rec.component):
                continue
            if spec.name == "svd" and max(key[0]) > 2000:
                continue  # the embedding's full SVD is covered by test_whatif; keep this test fast
            m = measure_tensor(src, rec.name, registry.config_from_values(spec.name, {}), workspace=ws, device="cpu")
            assert 0 <= m["rel_error"] < 1.5 and m["bytes"] > 0, (spec.name, rec.name)


def test_issue_commands_now_work(default_model, tmp_path, capsys):
    """The two commands issue 17 names (group size 128 on 576-wide tensors) succeed and report the fit."""
    from sahc_core.cli.main import main

    cache = str(tmp_path / "c.duckdb")
    for argv in (["measure", "--tensor", "model.layers.3.self_attn.q_proj.weight", "--method", "int", "--bits", "4"],
                 ["measure", "--tensor", "model.layers.15.mlp.down_proj.weight", "--method", "svd", "--rank", "64",
                  "--bits", "8"]):
        assert main([*argv, "--cache", cache, "--json"]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (out["group_size_requested"], out["group_size"]) == (128, 96) and "96" in out["note"]


def test_a_plan_without_fallback_adapts_per_tensor(default_model, table):
    src = ModelSource.open(default_model)
    plan = CompressionPlan.from_dict({"name": "g128", "default": {"method": "int", "bits": 4, "group_size": 128}})
    df = resolve(plan, tensor_table(src), tied_embeddings=src.tied_embeddings)
    adapted = df[df["rule"].str.startswith("adapted")]
    assert len(adapted) > 100 and (adapted["config"].map(lambda c: c["group_size"]) == 96).all()
    assert adapted["fallback_reason"].str.contains("used 96").all()


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_shipped_plans_resolve_on_the_default_model(path, default_model):
    src = ModelSource.open(default_model)
    df = resolve(CompressionPlan.from_json(path), tensor_table(src), tied_embeddings=src.tied_embeddings)
    assert df["bytes"].sum() > 0


def test_measure_with_a_fitted_group_equals_asking_for_the_divisor(default_model):
    src = ModelSource.open(default_model)
    name = "model.layers.3.self_attn.q_proj.weight"
    a = measure_tensor(src, name, QuantConfig(4, 128))
    b = measure_tensor(src, name, QuantConfig(4, 96))
    assert a["rel_error"] == b["rel_error"] and a["bytes"] == b["bytes"] and "note" not in b
    assert torch.isfinite(torch.tensor(a["rel_error"]))
