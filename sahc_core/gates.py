"""Quality gates (reference study, section 7) and their DuckDB audit log.

A gate turns one measured number into a pass/fail decision with the threshold and the evidence
that led to it. Nothing here computes a tensor: per-tensor gates read the dict that
``methods.measure`` (or ``whatif.measure_tensor``) returns, model-level gates read counts. Every
decision can be written to the ``audit_log`` table with :func:`log_gates`, so a failure is never
silent. Each gate tests something the others do not; :data:`GATE_INFO` says what (its kind, the
comparison, why it matters, and whether a pass is *weak*: it only rules out a broken result), and
:func:`gate_summary` counts decisions per gate, so "487 gates passed" cannot hide that 272 of them
are the same weak check.

Per-tensor gates
----------------
``rel_error``         ``||W - Ŵ||_F / ||W||_F < 1.0``; a zero matrix scores exactly 1.0, so an
                      approximation at or above 1.0 is worse than deleting the tensor. Weak: a pass
                      says nothing about quality.
``theory_vs_actual``  measured / predicted error in ``[1/f, f]``, ``f = theory_gap_factor`` (default 2).
                      The prediction never uses the measured error; the method computes it from what
                      it stores (``predicted_error`` and its ``prediction`` basis in the measurement):
                      int-k -> the rounding-noise model ``sqrt(Σ_g n_g Δ_g² / 12) / ||W||_F`` from the
                      stored steps Δ_g; SVD -> Eckart–Young–Mirsky error of the kept rank from σ, in
                      quadrature with the same noise model pushed through the factors (``‖v_k‖² =
                      σ_k``); TT -> the discarded energies of the TT-SVD sweep (Oseledets 2011, Thm 2.2)
                      in quadrature with the cores' noise model. ``keep`` has no prediction, so no gate.
                      Both directions: a measured error far above the model means a broken rank
                      assumption or quantizer (the study's 21x gap); far below it means the model does
                      not describe the tensor (e.g. weights that already lie on a coarser grid: a
                      GGUF-dequantized checkpoint re-quantized on the same blocks). Why f = 2: on the
                      default model's 211 matrices the ratio is 0.99-1.01 for int8 per row, 0.84-0.99
                      for int4 g64, 0.91-0.99 for int4 g128, 1.00 for SVD half rank + int4 factors and
                      1.00-1.06 for TT of the embedding (non-uniform rounding, the exact extremes of a
                      min-max grid), while the failures above move it 3x or more (int4 g32 on this
                      Q4_1-derived model: measured ~0, ratio < 0.01 on 210 of 211). A prediction that is
                      only an upper bound (a TT layout with zero padding, whose padded part the
                      measurement drops) is checked on the upper side only (``sides: "upper"``).
                      Errors below ``THEORY_FLOOR`` (1e-5, float32 arithmetic noise) count as the floor.
``output_cosine``     cos(W·x, Ŵ·x) on real activations >= ``cos_threshold`` (default 0.95); also
                      ``block_output_cosine`` (the attention / MLP block) and ``lm_head_output_cosine``.

Model-level gates: :func:`shape_gate` (every tensor shape matches, matched/total),
:func:`coverage_gate` (every tensor accounted for in the plan), :func:`ppl_increase_gate`
(``(ppl - baseline) / baseline <= threshold``, default +10 %; a non-finite perplexity fails it and,
in a run, fails the run with the reason).

The former ``quant_error`` gate (the int error against 1.0: the ``rel_error`` gate again) and
``ppl_finite`` gate (finiteness only: a 59 % perplexity rise passed) are no longer computed; their
:data:`GATE_INFO` entries stay so old audit-log rows still read correctly.
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
REL_ERROR_THRESHOLD = 1.0
#: Default largest relative perplexity increase over the baseline: +10 %.
PPL_THRESHOLD = 0.10
#: Relative errors below this are float32 arithmetic noise; the theory ratio clamps both sides to it.
THEORY_FLOOR = 1e-5


@dataclass(frozen=True)
class GateInfo:
    """How to read one gate: a human label, its kind, the comparison, why it matters, a weak pass.

    ``kind``: ``sanity`` (rules out a broken result), ``consistency`` (the error model holds),
    ``quality`` (the compressed model stays close to the original), ``integrity`` (the checkpoint is
    complete). ``weak``: a pass only rules out a broken result and says nothing about quality (a UI
    shows it grey, not green).
    """

    label: str
    kind: str
    op: str
    why: str
    weak: bool = False


GATE_INFO: dict[str, GateInfo] = {
    "rel_error": GateInfo("Relative error", "sanity", "<",
                          "‖W−Ŵ‖/‖W‖ < 1 only rules out an approximation worse than replacing W by zeros.", weak=True),
    "theory_vs_actual": GateInfo("Theory vs actual", "consistency", "within",
                                 "Measured / predicted error within [1/2, 2]: the error model (Eckart–Young from σ, "
                                 "rounding noise from the stored steps, the TT-SVD bound) describes this tensor; a "
                                 "gap means a broken rank assumption or quantizer, or weights already on a grid."),
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
    "ppl_increase": GateInfo("Perplexity increase", "quality", "≤",
                             "(ppl − baseline) / baseline on the same text and protocol must stay within the "
                             "threshold (default +10 %): the end-to-end quality of the compressed model."),
    # no longer computed; kept so audit-log rows of older runs still read correctly
    "quant_error": GateInfo("Quantization error (legacy)", "sanity", "≤",
                            "Repeated the relative-error check for int-k; no longer computed.", weak=True),
    "ppl_finite": GateInfo("Perplexity finite (legacy)", "sanity", "finite",
                           "Checked finiteness only; replaced by the perplexity-increase gate.", weak=True),
}


def gate_info(gate: str) -> GateInfo:
    """The :data:`GATE_INFO` entry of ``gate``, or a neutral default (its label = the gate name)."""
    info = GATE_INFO.get(gate)
    return info if info is not None else GateInfo(gate, "other", "vs", "No description recorded for this gate yet.")


def gate_verdict(gate: str, passed: bool) -> str:
    """``"fail"``, ``"weak pass"`` (a pass of a weak gate) or ``"pass"``: the colour a UI gives a decision."""
    if not passed:
        return "fail"
    return "weak pass" if gate_info(gate).weak else "pass"


def _worst(values: pd.Series, op: str) -> float | None:
    """The value farthest on the failing side: max for < / ≤, min for ≥, farthest from 1 (in log) for within."""
    v = pd.to_numeric(values, errors="coerce")
    if v.isna().all():
        return None
    if op in ("<", "≤"):
        return float(v.max())
    if op == "within":
        dist = v.map(lambda x: abs(math.log(x)) if x > 0 and math.isfinite(x) else math.inf)
        return float(v[dist.idxmax()])
    return float(v.min())


def gate_summary(gates: pd.DataFrame | Iterable[Mapping]) -> pd.DataFrame:
    """One row per gate name: how many decisions, how many failed, the worst value, and how to read it.

    Parameters
    ----------
    gates : DataFrame or iterable of dicts
        Decisions with ``gate``, ``value``, ``threshold``, ``passed`` (an audit log, a run result's
        ``gates`` or ``GateResult.to_dict()`` rows).

    Returns
    -------
    DataFrame
        ``gate``, ``label``, ``kind``, ``op``, ``why``, ``weak``, ``n``, ``n_failed``, ``worst``,
        ``threshold``, ``verdict`` ("fail" when any failed, else "weak pass" / "pass"); failures
        first, then meaningful passes, then weak passes.
    """
    df = gates.copy() if isinstance(gates, pd.DataFrame) else pd.DataFrame(list(gates))
    cols = ["gate", "label", "kind", "op", "why", "weak", "n", "n_failed", "worst", "threshold", "verdict"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for gate, g in df.groupby("gate", sort=False):
        info = gate_info(str(gate))
        n_failed = int((~g["passed"].astype(bool)).sum())
        thr = pd.to_numeric(g["threshold"], errors="coerce")
        rows.append({"gate": gate, "label": info.label, "kind": info.kind, "op": info.op, "why": info.why,
                     "weak": info.weak, "n": len(g), "n_failed": n_failed, "worst": _worst(g["value"], info.op),
                     "threshold": float(thr.iloc[0]) if thr.notna().any() else None,
                     "verdict": "fail" if n_failed else gate_verdict(str(gate), True)})
    out = pd.DataFrame(rows, columns=cols)
    order = out["verdict"].map({"fail": 0, "pass": 1, "weak pass": 2})
    return out.assign(_o=order).sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)


def summary_line(gates: pd.DataFrame | Iterable[Mapping]) -> str:
    """One sentence of :func:`gate_summary`, e.g. "2 of 487 gates failed: theory_vs_actual 2/211; passed: ...".

    Weak gates are marked "(weak)", so their passes are not read as quality.
    """
    summ = gate_summary(gates)
    if summ.empty:
        return "no gate decisions."

    def part(r) -> str:
        return f"{r.gate} {r.n_failed}/{r.n}" + (" (weak)" if r.weak else "")
    n, failed = int(summ["n"].sum()), int(summ["n_failed"].sum())
    bad = [part(r) for r in summ.itertuples() if r.n_failed]
    ok = [part(r) for r in summ.itertuples() if not r.n_failed]
    head = f"{failed} of {n} gates failed" + (": " + ", ".join(bad) if bad else "")
    return head + ("; passed: " + ", ".join(ok) if ok else "") + "."


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
    """measured / predicted, each clamped to :data:`THEORY_FLOOR` (float32 noise is no model failure)."""
    return max(measured_err, THEORY_FLOOR) / max(predicted, THEORY_FLOOR)


def theory_gate(name: str, measured: Mapping, factor: float = THEORY_GAP_FACTOR,
                evidence: Mapping | None = None) -> GateResult | None:
    """``theory_vs_actual``: measured / predicted error within ``[1/factor, factor]`` (module docstring).

    ``measured`` needs ``rel_error`` and the method's ``predicted_error`` (``None`` -> no gate);
    ``prediction`` names the basis and ``prediction_sides`` (``"two"`` default, ``"upper"`` for a
    bound) which sides are tested. A NaN measurement fails.
    """
    predicted = _num(measured, "predicted_error")
    if predicted is None:
        return None
    err = float(measured["rel_error"])
    sides = measured.get("prediction_sides", "two")
    r = _ratio(err, predicted) if math.isfinite(err) and math.isfinite(predicted) else math.nan
    ok = bool(r <= factor and (sides == "upper" or r >= 1.0 / factor))
    keys = ("eym_error", "trunc_error", "quant_error", "predicted_quant_error", "trunc_bound", "core_noise")
    return GateResult("theory_vs_actual", name, r, factor, ok,
                      {**dict(evidence or {}), "measured_error": err, "predicted_error": predicted,
                       "basis": measured.get("prediction"), "sides": sides, "lower": 1.0 / factor if sides == "two"
                       else None, **{k: measured[k] for k in keys if k in measured}})


def tensor_gates(
    name: str,
    measured: dict,
    output_cosine: float | None = None,
    cos_threshold: float = COS_THRESHOLD,
    theory_gap_factor: float = THEORY_GAP_FACTOR,
) -> list[GateResult]:
    """Evaluate the per-tensor gates on one measurement.

    Parameters
    ----------
    name : str
        Tensor name (goes into every result and the audit log).
    measured : dict
        Output of ``methods.measure``: needs ``rel_error``; uses the method's ``predicted_error``
        (with ``prediction``, ``prediction_sides``), ``method``, ``bytes``, ``ratio``.
    output_cosine : float, optional
        Output cosine on real activations; the gate is skipped when ``None``.
    cos_threshold, theory_gap_factor : float
        Thresholds (see module docstring for the defaults and why).

    Returns
    -------
    list of GateResult
        ``rel_error`` always; ``theory_vs_actual`` when the method predicts its error;
        ``output_cosine`` when given.
    """
    if "rel_error" not in measured:
        raise ValueError("the measurement has no 'rel_error'; pass the dict that methods.measure returns.")
    if not 0.0 < cos_threshold <= 1.0:
        raise ValueError(f"cos_threshold must be in (0, 1], got {cos_threshold}.")
    if not theory_gap_factor > 1.0:
        raise ValueError(f"theory_gap_factor must be > 1, got {theory_gap_factor}.")
    base = {k: measured[k] for k in ("method", "bytes", "ratio", "bits_per_weight", "config") if k in measured}
    err = float(measured["rel_error"])
    note = ("a zero matrix has relative error 1.0" if math.isfinite(err)
            else "the error is undefined (NaN / Inf values in W or Ŵ)")
    out = [GateResult("rel_error", name, err, REL_ERROR_THRESHOLD, bool(err < REL_ERROR_THRESHOLD),
                      {**base, "note": note})]
    theory = theory_gate(name, measured, theory_gap_factor, base)
    if theory is not None:
        out.append(theory)
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


def ppl_increase_gate(ppl: float, baseline_ppl: float, threshold: float = PPL_THRESHOLD,
                      evidence: Mapping | None = None) -> GateResult:
    """``ppl_increase``: ``(ppl - baseline) / baseline <= threshold`` (both on the same text and protocol).

    A non-finite ``ppl`` (or baseline) has value NaN / inf and fails. ``evidence`` should hold the
    protocol (tokens, window, stride, dtype, text); both perplexities are added.
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"the perplexity threshold must be a finite number >= 0 (0.10 = +10 %), got {threshold!r}.")
    p, b = float(ppl), float(baseline_ppl)
    if math.isfinite(p) and math.isfinite(b) and b > 0:
        value = (p - b) / b
    else:
        value = math.inf if (p == math.inf and math.isfinite(b)) else math.nan
    return GateResult("ppl_increase", "*", value, float(threshold), bool(value <= threshold),
                      {**dict(evidence or {}), "ppl": p, "baseline_ppl": b,
                       "note": f"relative perplexity increase over the baseline, at most {threshold:+.0%}"})


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
