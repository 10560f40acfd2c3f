"""Quality gates (reference study, section 7) and their DuckDB audit log.

A gate turns one measured number into a pass/fail decision with the threshold and the evidence
that led to it. Nothing here computes a tensor: per-tensor gates read the dict that
``methods.measure`` (or ``whatif.measure_tensor``) returns, model-level gates read counts. Every
decision can be written to the ``audit_log`` table with :func:`log_gates`, so a failure is never
silent.

Per-tensor gates
----------------
``rel_error``         ``||W - Ŵ||_F / ||W||_F < 1.0``; a zero matrix scores exactly 1.0, so an
                      approximation at or above 1.0 is worse than deleting the tensor.
``theory_vs_actual``  measured error / predicted error <= ``theory_gap_factor`` (default 2.0).
                      Prediction: SVD -> Eckart–Young–Mirsky error of the kept rank, combined in
                      quadrature with the measured factor-quantization error when there is one
                      (the factor-quantization error ``ΔA·B + A·ΔB`` lies in span(U_r) / span(V_r),
                      orthogonal to the EYM residual, so ``total² ≈ eym² + quant²``). Int -> the
                      uniform rounding-noise model ``sqrt(Σ_g n_g Δ_g² / 12) / ||W||_F`` with step
                      ``Δ_g`` per group (supplied by the caller as ``predicted_error``).
                      Why 2.0: numerical noise and non-uniform rounding move the ratio by a few
                      percent, and heavy-tailed groups by tens of percent, never by 2x; a 2x gap
                      means the model of the error is wrong (the study's 21x gap: a rank assumption
                      that the real spectrum did not honour; or a broken quantizer), which is what
                      the gate is for.
``quant_error``       quantization part of the error <= ``quant_threshold`` (default 1.0, i.e. the
                      quantizer alone must not be worse than zeros; set lower to be strict).
``output_cosine``     cos(W·x, Ŵ·x) on real activations >= ``cos_threshold`` (default 0.95).

Model-level gates: :func:`shape_gate` (every tensor shape matches, matched/total),
:func:`coverage_gate` (every tensor accounted for in the plan), :func:`ppl_gate` (perplexity finite).

What a gate means (:data:`GATE_INFO`, :func:`gate_info`): its kind (``sanity``: rules out a broken
result; ``consistency``: the error model holds; ``quality``: the compressed model is close to the
original; ``integrity``: the checkpoint is complete), the comparison it makes, one line on why it
matters, and ``weak``: a pass that only rules out "worse than zeros" (or a broken computation) and
says nothing about quality, which the UI shows grey rather than green. A gate name without an entry
gets a neutral default, so a new gate can be logged before it is described here.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import pandas as pd

from sahc_core.cache import Cache, to_json, utcnow
from sahc_core.jsonutil import jsonable

#: Default gate thresholds (documented in the module docstring).
COS_THRESHOLD = 0.95
THEORY_GAP_FACTOR = 2.0
QUANT_THRESHOLD = 1.0
REL_ERROR_THRESHOLD = 1.0


@dataclass(frozen=True)
class GateInfo:
    """How to read one gate (see the module docstring)."""

    label: str          # human name, e.g. "Relative error"
    kind: str           # "sanity" | "consistency" | "quality" | "integrity" | "other"
    op: str             # how value meets threshold, e.g. "<", "≤", "≥", "= all", "finite"
    why: str            # one line: why it matters
    weak: bool = False  # a pass only rules out a broken result (shown grey, not green)


GATE_INFO: dict[str, GateInfo] = {
    "rel_error": GateInfo("Relative error", "sanity", "<",
                          "‖W−Ŵ‖/‖W‖ < 1 only rules out an approximation worse than replacing W by zeros.", weak=True),
    "quant_error": GateInfo("Quantization error", "sanity", "≤",
                            "The quantizer's own error must not exceed that of zeros; a pass says nothing about "
                            "quality.", weak=True),
    "theory_vs_actual": GateInfo("Theory vs actual", "consistency", "≤",
                                 "Measured / predicted error within 2× means the error model (Eckart–Young, rounding "
                                 "noise) holds; a large gap means a broken rank assumption or quantizer. It does not "
                                 "judge quality.", weak=True),
    "output_cosine": GateInfo("Output cosine", "quality", "≥",
                              "The layer's outputs on real calibration text must stay aligned with the original's; "
                              "below 0.95 the model usually breaks downstream."),
    "block_output_cosine": GateInfo("Block output cosine", "quality", "≥",
                                    "The whole attention / MLP block's output on real text must stay aligned."),
    "lm_head_output_cosine": GateInfo("Logits cosine", "quality", "≥",
                                      "The next-token logits on real text must stay aligned with the original's."),
    "shape_match": GateInfo("Shapes match", "integrity", "= all",
                            "Every tensor of the checkpoint has the original's shape, or the model cannot load."),
    "plan_coverage": GateInfo("Plan covers every tensor", "integrity", "= all",
                              "Every tensor is accounted for by the plan, so no weight is silently dropped."),
    "ppl_finite": GateInfo("Perplexity finite", "sanity", "finite",
                           "A non-finite perplexity means the compressed model diverged; a pass says nothing about "
                           "how much worse it got.", weak=True),
}
_UNKNOWN_GATE = GateInfo("", "other", "vs", "No description recorded for this gate yet.")


def gate_info(gate: str) -> GateInfo:
    """The :data:`GATE_INFO` entry of ``gate``, or a neutral default (its label = the gate name)."""
    info = GATE_INFO.get(gate)
    return info if info is not None else GateInfo(gate, _UNKNOWN_GATE.kind, _UNKNOWN_GATE.op, _UNKNOWN_GATE.why)


def gate_verdict(gate: str, passed: bool) -> str:
    """``"fail"``, ``"weak pass"`` (a pass of a weak gate) or ``"pass"``: the colour a UI gives a decision."""
    if not passed:
        return "fail"
    return "weak pass" if gate_info(gate).weak else "pass"


def gate_summary(gates: pd.DataFrame | Iterable[Mapping]) -> pd.DataFrame:
    """One row per gate name: decisions, failures, worst value, threshold, verdict and how to read it.

    Parameters
    ----------
    gates : DataFrame or iterable of dicts
        Gate decisions with ``gate``, ``value``, ``threshold``, ``passed`` (an audit log or
        ``GateResult.to_dict()`` rows).

    Returns
    -------
    DataFrame
        ``gate``, ``label``, ``kind``, ``op``, ``why``, ``weak``, ``n``, ``n_failed``, ``worst`` (the
        value farthest on the failing side: max for < / ≤ gates, min otherwise), ``threshold``,
        ``verdict`` ("fail" if any failed, else "weak pass" / "pass"); failures first.
    """
    df = pd.DataFrame(list(gates) if not isinstance(gates, pd.DataFrame) else gates)
    cols = ["gate", "label", "kind", "op", "why", "weak", "n", "n_failed", "worst", "threshold", "verdict"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for gate, g in df.groupby("gate", sort=False):
        info = gate_info(str(gate))
        vals = pd.to_numeric(g["value"], errors="coerce")
        worst = vals.max() if info.op in ("<", "≤") else vals.min()
        n_failed = int((~g["passed"].astype(bool)).sum())
        thr = pd.to_numeric(g["threshold"], errors="coerce")
        rows.append({"gate": gate, "label": info.label, "kind": info.kind, "op": info.op, "why": info.why,
                     "weak": info.weak, "n": len(g), "n_failed": n_failed,
                     "worst": float(worst) if pd.notna(worst) else None,
                     "threshold": float(thr.iloc[0]) if thr.notna().any() else None,
                     "verdict": "fail" if n_failed else gate_verdict(str(gate), True)})
    out = pd.DataFrame(rows, columns=cols)
    order = out["verdict"].map({"fail": 0, "pass": 1, "weak pass": 2})
    return out.assign(_o=order).sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)


def failed_gate_names(gates: Iterable[Mapping]) -> str:
    """Comma-separated names of the failed gates in ``gates`` (``""`` when none failed)."""
    return ", ".join(dict.fromkeys(str(g["gate"]) for g in gates if not g["passed"]))


@dataclass(frozen=True)
class GateResult:
    """One gate decision: ``passed`` is ``value`` compared with ``threshold`` (see module docstring)."""

    gate: str
    tensor: str
    value: float
    threshold: float
    passed: bool
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able dict (non-finite values become ``None`` so the CLI line stays valid JSON)."""
        d = asdict(self)
        d["value"] = _finite_or_none(self.value)
        d["threshold"] = _finite_or_none(self.threshold)
        d["evidence"] = _evidence(self.evidence)
        return d


def _evidence(obj: Any) -> Any:
    """Plain-JSON copy of gate evidence (non-finite numbers become null)."""
    return jsonable(obj, nonfinite="null")


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _num(measured: Mapping, key: str) -> float | None:
    v = measured.get(key)
    return None if v is None else float(v)


def _ratio(measured_err: float, predicted: float) -> float:
    """measured / predicted; an exact prediction of 0 is met only by a measured 0."""
    if predicted > 0:
        return measured_err / predicted
    return 1.0 if measured_err <= 1e-12 else math.inf


def tensor_gates(
    name: str,
    measured: dict,
    output_cosine: float | None = None,
    cos_threshold: float = COS_THRESHOLD,
    theory_gap_factor: float = THEORY_GAP_FACTOR,
    quant_threshold: float = QUANT_THRESHOLD,
) -> list[GateResult]:
    """Evaluate the per-tensor gates on one measurement.

    Parameters
    ----------
    name : str
        Tensor name (goes into every result and the audit log).
    measured : dict
        Output of ``methods.measure``: needs ``rel_error``; uses ``eym_error`` / ``quant_error``
        (SVD), ``predicted_error`` (any method, takes precedence), ``method``, ``bytes``, ``ratio``.
    output_cosine : float, optional
        Output cosine on real activations; the gate is skipped when ``None``.
    cos_threshold, theory_gap_factor, quant_threshold : float
        Thresholds (see module docstring for the defaults and why).

    Returns
    -------
    list of GateResult
        ``rel_error`` always; ``theory_vs_actual`` when a prediction exists; ``quant_error`` when
        the measurement has one; ``output_cosine`` when given.
    """
    if "rel_error" not in measured:
        raise ValueError("the measurement has no 'rel_error'; pass the dict that methods.measure returns.")
    if not 0.0 < cos_threshold <= 1.0:
        raise ValueError(f"cos_threshold must be in (0, 1], got {cos_threshold}.")
    if theory_gap_factor < 1.0:
        raise ValueError(f"theory_gap_factor must be >= 1, got {theory_gap_factor}.")
    if quant_threshold <= 0:
        raise ValueError(f"quant_threshold must be > 0, got {quant_threshold}.")
    base = {k: measured[k] for k in ("method", "bytes", "ratio", "bits_per_weight", "config") if k in measured}
    err = float(measured["rel_error"])
    out = [GateResult("rel_error", name, err, REL_ERROR_THRESHOLD, bool(err < REL_ERROR_THRESHOLD),
                      {**base, "note": "a zero matrix has relative error 1.0"})]

    eym, quant, predicted = _num(measured, "eym_error"), _num(measured, "quant_error"), _num(measured, "predicted_error")
    basis = measured.get("prediction")
    if predicted is None and eym is not None:
        predicted = math.sqrt(eym**2 + (quant or 0.0) ** 2)
        basis = "EYM error of the kept rank (+ factor quantization error in quadrature)"
    if predicted is not None:
        r = _ratio(err, predicted)
        out.append(GateResult("theory_vs_actual", name, r, theory_gap_factor, bool(r <= theory_gap_factor),
                              {**base, "measured_error": err, "predicted_error": predicted, "eym_error": eym,
                               "quant_error": quant, "basis": basis}))
    if quant is not None:
        out.append(GateResult("quant_error", name, quant, quant_threshold, bool(quant <= quant_threshold),
                              {**base, "note": "error due to quantization alone, relative to ||W||_F"}))
    if output_cosine is not None:
        out.append(cosine_gate(name, output_cosine, cos_threshold, evidence=base))
    return out


def cosine_gate(name: str, value: float, threshold: float = COS_THRESHOLD, gate: str = "output_cosine",
                evidence: Mapping | None = None) -> GateResult:
    """Forward smoke test: an output cosine on real activations must reach ``threshold``.

    ``gate`` names the output compared (``output_cosine`` for the layer itself, ``block_output_cosine``
    for the attention / MLP block around it, ``lm_head_output_cosine`` for logits).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"the cosine threshold must be in (0, 1], got {threshold}.")
    c = float(value)
    return GateResult(gate, name, c, threshold, bool(c >= threshold),
                      {**dict(evidence or {}), "note": "cosine of outputs with W vs W_hat on real calibration activations"})


def shape_gate(expected: Mapping[str, tuple], actual: Mapping[str, tuple]) -> GateResult:
    """Every tensor of ``expected`` is present in ``actual`` with the same shape (value = matched/total)."""
    total = len(expected)
    bad = sorted(n for n, s in expected.items() if tuple(actual.get(n, ())) != tuple(s))
    matched = total - len(bad)
    value = matched / total if total else 1.0
    return GateResult("shape_match", "*", value, 1.0, not bad,
                      {"matched": matched, "total": total, "mismatched": bad[:20]})


def coverage_gate(model_tensors: Iterable[str], planned: Iterable[str]) -> GateResult:
    """Every tensor of the model is accounted for in the plan (value = covered/total)."""
    model_set, plan_set = set(model_tensors), set(planned)
    missing = sorted(model_set - plan_set)
    total = len(model_set)
    value = (total - len(missing)) / total if total else 1.0
    return GateResult("plan_coverage", "*", value, 1.0, not missing,
                      {"covered": total - len(missing), "total": total, "missing": missing[:20],
                       "unknown_in_plan": sorted(plan_set - model_set)[:20]})


def ppl_gate(ppl: float, evidence: Mapping | None = None) -> GateResult:
    """Perplexity is finite (the study's first pipeline reported a ratio while its ppl was inf)."""
    v = float(ppl)
    return GateResult("ppl_finite", "*", v, math.inf, bool(math.isfinite(v)), dict(evidence or {}))


def log_gates(cache: Cache, model_fp: str, gates: list[GateResult], run_id: str | None = None) -> None:
    """Append gate decisions to the ``audit_log`` table (one row each, uuid4 id, naive UTC time).

    Parameters
    ----------
    cache : Cache
        The DuckDB store.
    model_fp : str
        ``ModelSource.fingerprint`` of the model the gates were computed on.
    gates : list of GateResult
        Decisions to record (nothing happens for an empty list).
    run_id : str, optional
        The run (assembly job) the decisions belong to; ``None`` for interactive what-if checks.
    """
    if not gates:
        return
    now = utcnow()
    rows = [(str(uuid.uuid4()), now, model_fp, run_id, g.tensor, g.gate, float(g.value), float(g.threshold),
             bool(g.passed), to_json(_evidence(g.evidence))) for g in gates]
    # DOUBLE keeps inf/NaN, so a diverged value is logged as it was measured.
    cache.executemany(
        "INSERT INTO audit_log (id, time, model_fp, run_id, tensor, gate, value, threshold, passed, evidence) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def audit_log(cache: Cache, model_fp: str | None = None, run_id: str | None = None) -> pd.DataFrame:
    """The audit log as a DataFrame (newest first), optionally filtered by model and run.

    Columns: id, time, model_fp, run_id, tensor, gate, value, threshold, passed, evidence (JSON str).
    """
    where, params = [], []
    if model_fp is not None:
        where.append("model_fp = ?")
        params.append(model_fp)
    if run_id is not None:
        where.append("run_id = ?")
        params.append(run_id)
    sql = ("SELECT id, time, model_fp, run_id, tensor, gate, value, threshold, passed, CAST(evidence AS VARCHAR) "
           "AS evidence FROM audit_log" + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY time DESC, tensor, gate")
    return cache.query_df(sql, params)
