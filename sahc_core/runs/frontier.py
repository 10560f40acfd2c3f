"""The measured ratio-vs-perplexity frontier of finished runs, and how well predictions ranked them.

:func:`run_points` turns every finished run in the cache into one point (ratio, perplexity, gates,
the plan's kind, and the predicted Δloss its plan's ``provenance`` carries, if any);
:func:`measured_frontier` keeps the points no other point beats (a higher ratio with a perplexity
no worse); :func:`prediction_check` compares predicted Δloss with the measured
``Δ log ppl = log(ppl / baseline ppl)`` (the same quantity: mean next-token loss, nats per token)
by Spearman's rank correlation. Runs of different perplexity protocols (text, window, tokens) are
not comparable: points carry a ``protocol`` label to filter on.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from sahc_core.cache import Cache, from_json

#: Kinds of plan a point can be.
KINDS = ("uniform", "optimized", "hand")
COLUMNS = ("run_id", "plan_name", "kind", "label", "ratio", "ppl", "baseline_ppl", "delta_log_ppl", "predicted_dloss",
           "gates_passed", "gates_failed", "protocol", "model_fp", "started_at")


def plan_kind(plan: dict) -> tuple[str, str]:
    """``(kind, label)`` of a plan dict: ``optimized`` (its provenance says so), ``uniform`` (one
    default config, nothing else but keep overrides/components), else ``hand``."""
    prov = plan.get("provenance") or {}
    if prov.get("kind") == "optimized":
        return "optimized", plan.get("name", "")
    default = plan.get("default") or {}
    rest = list((plan.get("components") or {}).values()) + list(plan.get("overrides") or [])
    if default.get("method") not in (None, "keep") and all(c.get("method") == "keep" for c in rest):
        from sahc_core.methods import registry

        try:
            return "uniform", registry.label(registry.config_from_dict(default))
        except ValueError:
            pass
    return (prov.get("kind") if prov.get("kind") in KINDS else "hand"), plan.get("name", "")


def run_points(cache: Cache, model_fp: str | None = None) -> pd.DataFrame:
    """One row per finished run with a finite perplexity (columns :data:`COLUMNS`), oldest first."""
    sql = "SELECT run_id, plan_name, plan, result, model_fp, started_at FROM runs WHERE status = 'done'"
    params: list = []
    if model_fp is not None:
        sql += " AND model_fp = ?"
        params.append(model_fp)
    rows = []
    for rec in cache.query_df(sql + " ORDER BY started_at", params).to_dict(orient="records"):
        res = from_json(rec["result"]) if isinstance(rec.get("result"), str) else {}
        plan = from_json(rec["plan"]) if isinstance(rec.get("plan"), str) else {}
        ppl, base = (res or {}).get("ppl"), (res or {}).get("baseline_ppl")
        if ppl is None or base is None or not (math.isfinite(float(ppl)) and float(base) > 0):
            continue
        kind, label = plan_kind(plan or {})
        proto = res.get("protocol") or {}
        pred = ((plan or {}).get("provenance") or {}).get("predicted_dloss")
        rows.append({"run_id": rec["run_id"], "plan_name": rec["plan_name"], "kind": kind, "label": label,
                     "ratio": float(res.get("ratio_actual") or res.get("ratio_projected") or math.nan),
                     "ppl": float(ppl), "baseline_ppl": float(base), "delta_log_ppl": math.log(float(ppl) / float(base)),
                     "predicted_dloss": math.nan if pred is None else float(pred),
                     "gates_passed": res.get("gates_passed"), "gates_failed": res.get("gates_failed"),
                     "protocol": f"{proto.get('text', '?')}, {proto.get('tokens', '?')} tokens, window "
                                 f"{proto.get('window', '?')}",
                     "model_fp": rec["model_fp"], "started_at": rec["started_at"]})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def measured_frontier(points: pd.DataFrame) -> pd.DataFrame:
    """The points no other point beats: for each, no other has a ratio >= and a perplexity <=, one of
    them strictly. Sorted by ratio (the line the frontier chart draws)."""
    if points.empty:
        return points
    pts = points.sort_values(["ratio", "ppl"], ascending=[False, True])
    best, keep = math.inf, []
    for idx, ppl in zip(pts.index, pts["ppl"]):
        if ppl < best:  # walking from the highest ratio down, a point survives if it beats every higher one
            keep.append(idx)
            best = ppl
    return points.loc[keep].sort_values("ratio")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (ties share the mean rank); NaN below 3 points."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return math.nan
    return float(spearmanr(x[ok], y[ok]).statistic)


def prediction_check(points: pd.DataFrame) -> dict:
    """Predicted Δloss vs measured Δ log ppl over the points that carry a prediction.

    Returns
    -------
    dict
        ``n``, ``spearman`` (rank correlation), ``pearson_log`` (Pearson of the logarithms of the
        positive pairs), ``median_ratio`` (median measured / predicted), ``points`` (the rows used).
    """
    used = points[np.isfinite(points["predicted_dloss"].astype(float))]
    x, y = used["predicted_dloss"].to_numpy(float), used["delta_log_ppl"].to_numpy(float)
    pos = (x > 0) & (y > 0)
    pearson = float(np.corrcoef(np.log(x[pos]), np.log(y[pos]))[0, 1]) if pos.sum() >= 3 else math.nan
    return {"n": int(len(used)), "spearman": spearman(x, y), "pearson_log": pearson,
            "median_ratio": float(np.median(y[pos] / x[pos])) if pos.any() else math.nan, "points": used}


def to_records(points: pd.DataFrame) -> list[dict]:
    """JSON-ready rows (bench output)."""
    return json.loads(points.drop(columns=["started_at"], errors="ignore").to_json(orient="records"))
