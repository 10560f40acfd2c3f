"""The optimizer's candidate table: schema-driven configs, exact bytes, held-out errors, the predicted smoke gate."""
from __future__ import annotations

import json

import pytest
import torch

from sahc_core import metrics
from sahc_core.cache import Cache
from sahc_core.calib.stats import CalibConfig
from sahc_core.calib.store import calibration_stats
from sahc_core.evaluate.model import load_model
from sahc_core.evaluate.smoke import layer_output_cosines
from sahc_core.io.source import ModelSource
from sahc_core.methods import registry
from sahc_core.plans import candidates as cand
from sahc_core.plans.candidates import CandidateGrid, GateSource, candidate_table, tensor_configs
from tiny_models import TINY_TEXT

TEXT = TINY_TEXT * 3  # 702 word tokens
GRID = CandidateGrid(methods=("int", "gptq"), bits=(2, 4), calibrated_bits=(3,), group_sizes=(64, None))


@pytest.fixture(scope="module")
def setup(tiny_llama_tok_dir, tmp_path_factory):
    source = ModelSource.open(tiny_llama_tok_dir)
    cache = Cache(tmp_path_factory.mktemp("cand") / "c.duckdb")
    model, tok = load_model(tiny_llama_tok_dir, device="cpu")
    calib = calibration_stats(source, cache, TEXT, CalibConfig(tokens=256, heldout_tokens=128), model=model,
                              tokenizer=tok)
    gate = GateSource(load=lambda: (model, tok), text=TEXT, n_tokens=128)
    return source, cache, calib, gate, model, tok


@pytest.fixture(scope="module")
def table(setup):
    source, cache, calib, gate, *_ = setup
    return candidate_table(source, gate, cache, calib, GRID)


def test_configs_come_from_the_schemas_fitted_and_distinct():
    cfgs = [registry.config_to_dict(c) for c in tensor_configs((128, 64), "ffn", GRID, with_calibration=True)]
    assert cfgs[0]["method"] == "keep"
    # int: bits 2, 4 x groups 64 / per row; gptq: 3 bits x the same groups
    got = [(c["method"], c["bits"], c["group_size"]) for c in cfgs[1:]]
    assert len(got) == len(set(got)) and set(got) == (
        {("int", b, g) for b in (2, 4) for g in (64, None)} | {("gptq", 3, g) for g in (64, None)})
    assert all(registry.incompatibility((128, 64), "ffn", registry.config_from_dict(c)) is None for c in cfgs)
    no_cal = tensor_configs((128, 64), "ffn", GRID, with_calibration=False)
    assert {registry.spec_of(c).name for c in no_cal} == {"keep", "int"}
    # group sizes that do not divide the width 48 are fitted (the largest divisor within 2x below)
    fitted = tensor_configs((16, 48), "ffn", CandidateGrid(methods=("int",), bits=(4,), group_sizes=(64, 32, 48)))
    assert [registry.config_to_dict(c)["group_size"] for c in fitted[1:]] == [48, 24]  # 48 twice: kept once
    lowrank = tensor_configs((64, 64), "ffn", CandidateGrid(methods=("svd",), rank_fractions=(0.5,),
                                                            factor_bits=(None, 8), group_sizes=(32,)))
    assert [registry.config_to_dict(c) for c in lowrank[1:]] == [
        {"method": "svd", "rank_fraction": 0.5, "bits": None, "group_size": 128, "scheme": "asym"},
        {"method": "svd", "rank_fraction": 0.5, "bits": 8, "group_size": 32, "scheme": "asym"}]
    tt_ffn = tensor_configs((256, 64), "ffn", CandidateGrid(methods=("tt",)))
    tt_emb = tensor_configs((256, 64), "embedding", CandidateGrid(methods=("tt",)))
    assert len(tt_ffn) == 1 and len(tt_emb) > 1  # TT only for the embedding


def test_rows_have_exact_bytes_and_held_out_errors(setup, table):
    source, cache, calib, *_ = setup
    two_d = table[table["ndim"] == 2]
    for r in two_d.sample(8, random_state=0).itertuples():
        cfg = registry.config_from_dict(json.loads(r.config))
        shape = source.info(r.tensor).shape
        assert r.bytes == registry.projected_bytes(shape, cfg)
        W = source.read(r.tensor, dtype=torch.float32)
        W_hat = registry.compress(W, cfg, calib.for_weight(r.tensor)).reconstruct(torch.float32)
        held = calib.heldout_for_weight(r.tensor)
        assert r.output_error == pytest.approx(metrics.output_error(W, W_hat, held.xtx), rel=1e-4, abs=1e-7)
        assert r.rel_error == pytest.approx(metrics.rel_error(W, W_hat), rel=1e-4, abs=1e-7)
    one_d = table[table["ndim"] == 1]
    assert (one_d.groupby("tensor").size() == 1).all() and (one_d["method"] == "keep").all()
    assert (one_d["bytes"] == one_d["orig_bytes"]).all()
    assert (table["feasible"] == (table["failed_gates"] == "")).all()
    assert set(table.loc[table["ndim"] == 2, "tensor"]) == {t.name for t in source.tensors() if len(t.shape) == 2}


def test_cosine_gate_is_the_runs_smoke_test(setup, table):
    """The predicted cosine equals what the run's forward smoke test measures for the same Ŵ."""
    source, cache, calib, gate, model, tok = setup
    for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        rows = table[(table["tensor"] == name) & (table["method"] == "int") & (table["bits"] == 2)]
        r = rows.iloc[0]
        W_hat = registry.compress(source.read(name, dtype=torch.float32),
                                  registry.config_from_dict(json.loads(r["config"]))).reconstruct(torch.float32)
        smoke = layer_output_cosines(model, tok, TEXT, {name: W_hat}, n_tokens=128)
        assert r["output_cosine"] == pytest.approx(min(v["cosine"] for v in smoke.values()), abs=1e-5)
        if name.startswith("model.embed"):  # tied: the lookup and the LM head's logits are both judged
            assert set(smoke) == {"model.embed_tokens.weight", "lm_head.weight"}
            counts = calib.heldout.token_counts
            W = source.read(name, dtype=torch.float32)
            assert r["lookup_output_error"] == pytest.approx(metrics.output_error(W, W_hat, counts), rel=1e-5)
    bad = table[table["output_cosine"] < GRID.cos_threshold]
    assert len(bad) and not bad["feasible"].any() and bad["failed_gates"].str.contains("output_cosine").all()


def test_second_table_is_lookups_only(setup, table, monkeypatch):
    source, cache, calib, gate, *_ = setup

    def boom(*_a, **_k):
        raise AssertionError("a cached candidate was measured again")

    monkeypatch.setattr(cand.whatif, "measure_tensor", boom)
    monkeypatch.setattr(cand, "gate_numbers", boom)
    again = candidate_table(source, GateSource(load=boom, text=gate.text, n_tokens=gate.n_tokens), cache, calib, GRID)
    assert again.equals(table)


def test_unknown_tensor_and_bad_grid_are_clear_errors(setup):
    source, cache, calib, gate, *_ = setup
    with pytest.raises(ValueError, match="no tensor"):
        candidate_table(source, gate, cache, calib, GRID, tensors=["nope.weight"])
    with pytest.raises(ValueError, match="unknown compression method"):
        CandidateGrid(methods=("int9",))
    with pytest.raises(ValueError, match="sequence"):
        CandidateGrid(bits=4)
