"""Quality gates: decisions on constructed successes/failures, and the DuckDB audit log round trip."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sahc_core.cache import Cache
from sahc_core.gates import (GateResult, audit_log, coverage_gate, log_gates, ppl_gate, shape_gate,
                             tensor_gates)


def _rel(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    return float(torch.linalg.norm(W - W_hat) / torch.linalg.norm(W))


def _by_gate(gates: list[GateResult]) -> dict[str, GateResult]:
    return {g.gate: g for g in gates}


@pytest.fixture
def cache(tmp_path):
    return Cache(tmp_path / "g.duckdb")


def test_negated_matrix_fails_rel_error_gate():
    W = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    err = _rel(W, -W)
    assert err == pytest.approx(2.0)
    g = _by_gate(tensor_gates("w", {"rel_error": err, "method": "int"}))
    assert not g["rel_error"].passed and g["rel_error"].threshold == 1.0
    zero = _by_gate(tensor_gates("w", {"rel_error": _rel(W, torch.zeros_like(W))}))
    assert zero["rel_error"].value == pytest.approx(1.0) and not zero["rel_error"].passed  # zeros: not < 1.0
    ok = _by_gate(tensor_gates("w", {"rel_error": _rel(W, 0.9 * W)}))
    assert ok["rel_error"].passed and ok["rel_error"].value == pytest.approx(0.1)


def test_theory_gate_uses_eym_in_quadrature_with_quant_error():
    # Independent EYM on a random matrix: truncated SVD error equals sqrt(tail energy).
    W = torch.randn(40, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = 6
    W_r = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    eym = float(torch.sqrt((S[r:] ** 2).sum() / (S**2).sum()))
    assert _rel(W, W_r) == pytest.approx(eym, rel=1e-9)
    good = _by_gate(tensor_gates("w", {"rel_error": _rel(W, W_r), "eym_error": eym, "quant_error": 0.0}))
    assert good["theory_vs_actual"].passed and good["theory_vs_actual"].value == pytest.approx(1.0)
    # Quadrature: a quant error of 0.5 on top of eym predicts sqrt(eym^2 + 0.25).
    q = 0.5
    pred = math.sqrt(eym**2 + q**2)
    g = _by_gate(tensor_gates("w", {"rel_error": pred * 1.1, "eym_error": eym, "quant_error": q}))
    assert g["theory_vs_actual"].evidence["predicted_error"] == pytest.approx(pred)
    assert g["theory_vs_actual"].passed
    # The study's failure: measured 0.834 vs predicted 0.039 (21x) must fire.
    bad = _by_gate(tensor_gates("w", {"rel_error": 0.834, "eym_error": 0.039}))
    assert bad["theory_vs_actual"].value == pytest.approx(0.834 / 0.039)
    assert not bad["theory_vs_actual"].passed
    # A stricter factor flips a pass into a fail.
    strict = _by_gate(tensor_gates("w", {"rel_error": 1.5 * eym, "eym_error": eym}, theory_gap_factor=1.2))
    assert not strict["theory_vs_actual"].passed


def test_theory_gate_with_explicit_prediction_and_zero_prediction():
    g = _by_gate(tensor_gates("w", {"rel_error": 0.3, "predicted_error": 0.1, "prediction": "uniform noise"}))
    assert g["theory_vs_actual"].value == pytest.approx(3.0) and not g["theory_vs_actual"].passed
    assert g["theory_vs_actual"].evidence["basis"] == "uniform noise"
    exact = _by_gate(tensor_gates("w", {"rel_error": 0.0, "eym_error": 0.0}))
    assert exact["theory_vs_actual"].passed
    off = _by_gate(tensor_gates("w", {"rel_error": 0.01, "eym_error": 0.0}))
    assert math.isinf(off["theory_vs_actual"].value) and not off["theory_vs_actual"].passed
    assert "theory_vs_actual" not in _by_gate(tensor_gates("w", {"rel_error": 0.2}))


def test_quant_and_output_cosine_gates_thresholds():
    g = _by_gate(tensor_gates("w", {"rel_error": 0.3, "quant_error": 0.3}, output_cosine=0.94))
    assert g["quant_error"].passed and not g["output_cosine"].passed
    g = _by_gate(tensor_gates("w", {"rel_error": 0.3, "quant_error": 0.3}, output_cosine=0.94,
                              cos_threshold=0.9, quant_threshold=0.2))
    assert g["output_cosine"].passed and not g["quant_error"].passed
    assert "output_cosine" not in _by_gate(tensor_gates("w", {"rel_error": 0.3}))
    with pytest.raises(ValueError):
        tensor_gates("w", {"bytes": 3})
    with pytest.raises(ValueError):
        tensor_gates("w", {"rel_error": 0.1}, cos_threshold=1.5)


def test_model_level_gates():
    exp = {"a": (4, 4), "b": (2,), "c": (3, 1)}
    g = shape_gate(exp, {"a": (4, 4), "b": (2,), "c": (1, 3)})
    assert not g.passed and g.value == pytest.approx(2 / 3) and g.evidence["mismatched"] == ["c"]
    assert shape_gate(exp, dict(exp)).passed
    c = coverage_gate(["a", "b", "c"], ["a", "b", "x"])
    assert not c.passed and c.evidence["missing"] == ["c"] and c.evidence["unknown_in_plan"] == ["x"]
    assert coverage_gate(["a"], ["a"]).value == 1.0
    assert ppl_gate(12.5).passed and not ppl_gate(float("inf")).passed and not ppl_gate(float("nan")).passed


def test_log_gates_round_trip_and_filters(cache):
    W = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    gates = tensor_gates("layer.w", {"rel_error": _rel(W, -W), "eym_error": np.float64(0.0), "method": "svd"},
                         output_cosine=-1.0)
    log_gates(cache, "fp1", gates, run_id="r1")
    log_gates(cache, "fp1", [ppl_gate(float("inf"))])
    log_gates(cache, "fp2", [ppl_gate(3.0)], run_id="r2")
    df = audit_log(cache, model_fp="fp1")
    assert len(df) == len(gates) + 1
    assert set(df.columns) >= {"id", "time", "model_fp", "run_id", "tensor", "gate", "value", "threshold",
                               "passed", "evidence"}
    row = df[df.gate == "rel_error"].iloc[0]
    assert row.value == pytest.approx(2.0) and row.threshold == 1.0 and not row.passed and row.run_id == "r1"
    assert json.loads(row.evidence)["method"] == "svd"
    ppl_row = df[df.gate == "ppl_finite"].iloc[0]
    assert math.isinf(ppl_row.value) and not ppl_row.passed
    assert len(audit_log(cache, run_id="r1")) == len(gates)
    assert len(audit_log(cache)) == len(gates) + 2
    assert df.id.is_unique
    log_gates(cache, "fp1", [])  # nothing to write is not an error
    assert len(audit_log(cache, model_fp="fp1")) == len(gates) + 1


def test_gate_to_dict_is_json():
    g = ppl_gate(float("inf"))
    d = g.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["value"] is None and d["passed"] is False


# -- how the UI reads a gate ------------------------------------------------------------------------
def test_every_gate_the_code_emits_is_described():
    import math

    from sahc_core.gates import (GATE_INFO, coverage_gate, cosine_gate, gate_info, ppl_gate, shape_gate,
                                 tensor_gates)

    emitted = {g.gate for g in tensor_gates("w", {"rel_error": 0.5, "eym_error": 0.4, "quant_error": 0.1},
                                            output_cosine=0.99)}
    emitted |= {cosine_gate("w", 0.9, gate=k).gate for k in ("block_output_cosine", "lm_head_output_cosine")}
    emitted |= {shape_gate({}, {}).gate, coverage_gate([], []).gate, ppl_gate(math.inf).gate}
    assert emitted <= set(GATE_INFO)
    for name in emitted:
        info = gate_info(name)
        assert info.label and info.why.endswith(".") and info.kind in ("sanity", "consistency", "quality", "integrity")
    new = gate_info("ppl_increase")  # a gate another change adds later still reads
    assert new.label == "ppl_increase" and new.kind == "other" and not new.weak


def test_a_pass_that_only_rules_out_zeros_is_weak():
    from sahc_core.gates import gate_verdict

    assert gate_verdict("rel_error", True) == "weak pass"  # the 0.8168 < 1
    assert gate_verdict("theory_vs_actual", True) == "weak pass"
    assert gate_verdict("output_cosine", True) == "pass"
    assert gate_verdict("rel_error", False) == "fail"


def test_gate_summary_counts_worst_values_and_orders_failures_first():
    from sahc_core.gates import gate_summary

    rows = [{"gate": "rel_error", "value": v, "threshold": 1.0, "passed": v < 1} for v in (0.2, 0.8168, 0.5)]
    rows += [{"gate": "output_cosine", "value": v, "threshold": 0.95, "passed": v >= 0.95} for v in (0.99, 0.91)]
    s = gate_summary(rows).set_index("gate")
    assert list(s.index) == ["output_cosine", "rel_error"]  # the failure first
    assert s.loc["rel_error", "worst"] == 0.8168 and s.loc["rel_error", "verdict"] == "weak pass"
    assert s.loc["output_cosine", "worst"] == 0.91 and s.loc["output_cosine", "n_failed"] == 1
    assert gate_summary([]).empty
