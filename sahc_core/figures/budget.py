"""Budget page support: per-component configs -> plan JSON, the bytes breakdown and the embedding wall.

The page edits one method config per component (its widgets come from the method registry's
schemas); :func:`plan_dict` assembles the plan JSON. The figures take a
:func:`sahc_core.plans.plan.project` result.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from sahc_core.figures.format import component_label
from sahc_core.figures.model import COMPONENT_COLORS
from sahc_core.figures.style import tidy_figure
from sahc_core.methods import registry
from sahc_core.plans.plan import embedding_wall

#: Plan-JSON fallback configs offered by the page (label -> config dict or None = the methods adapt
#: themselves where they can, and a tensor nothing fits is an error).
FALLBACKS: dict[str, dict | None] = {
    "keep 16-bit": {"method": "keep"},
    "int8 per row": {"method": "int", "bits": 8, "group_size": None},
    "int4 per row": {"method": "int", "bits": 4, "group_size": None},
    "none (adapt, else error)": None,
}
_MB = 1e6


def plan_dict(name: str, components: Mapping[str, Mapping[str, Any]], overrides: Sequence[dict] = (),
              fallback: dict | None = None) -> dict:
    """Plan JSON with one config per component (no default: every component is chosen explicitly)."""
    out: dict[str, Any] = {"name": name, "default": None, "components": {c: dict(v) for c, v in components.items()},
                           "overrides": list(overrides)}
    if fallback is not None:
        out["fallback"] = fallback
    return out


def fallback_name(plan: Mapping[str, Any]) -> str:
    """The :data:`FALLBACKS` entry of a plan JSON's ``fallback`` (the first whose keys it holds; else "none")."""
    fb = plan.get("fallback")
    return next((k for k, v in FALLBACKS.items() if v and fb and v.items() <= fb.items()), "none (adapt, else error)")


def overrides_frame(overrides: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """A plan's per-tensor overrides as ``pattern`` and ``setting`` (the method's short label)."""
    return pd.DataFrame([{"pattern": o["pattern"], "setting": registry.label(registry.config_from_dict(
        {k: v for k, v in o.items() if k != "pattern"}))} for o in overrides])


def with_settings(tensors: pd.DataFrame) -> pd.DataFrame:
    """A projection's per-tensor rows with a ``setting`` label (``tied`` for a tensor stored once)."""
    return tensors.assign(setting=[registry.label(registry.config_from_dict(c)) if c else "tied"
                                   for c in tensors["config"]])


def fallback_sentence(result: Mapping[str, Any]) -> str | None:
    """How many tensors took a fallback or an adapted setting, with the first one's reason (``None``: none)."""
    if not result["n_fallback"]:
        return None
    fb = result["tensors"][result["tensors"]["fallback_reason"].notna()]
    return (f"{len(fb)} tensor(s) took a fallback or an adapted setting, e.g. {fb.iloc[0]['name']}: "
            f"{fb.iloc[0]['fallback_reason']}.")


def breakdown_frame(result: Mapping[str, Any]) -> pd.DataFrame:
    """Tidy bytes per component and side (``original``/``compressed``), in MB."""
    rows = []
    for c in result["components"]:
        rows.append({"component": c["component"], "side": "original (16-bit)", "MB": c["original_bytes"] / _MB})
        rows.append({"component": c["component"], "side": "compressed (plan)", "MB": c["bytes"] / _MB})
    return pd.DataFrame(rows, columns=["component", "side", "MB"])


def bytes_breakdown_figure(result: Mapping[str, Any]) -> go.Figure:
    """Stacked bars: original vs compressed bytes, one segment per component."""
    df = breakdown_frame(result)
    fig = go.Figure()
    for comp, g in df.groupby("component", sort=False):
        fig.add_bar(x=g["side"], y=g["MB"], name=component_label(str(comp)),
                    marker_color=COMPONENT_COLORS.get(str(comp), "#999"),
                    hovertemplate=f"{component_label(str(comp))}: %{{y:,.2f}} MB<extra></extra>")
    fig.update_layout(barmode="stack", yaxis_title="MB", height=380, margin=dict(t=30, b=10),
                      title=f"{result['bytes_original'] / _MB:,.1f} MB → {result['bytes_projected'] / _MB:,.1f} MB "
                            f"({result['ratio_projected']:.2f}x)")
    return tidy_figure(fig)


#: The wall chart stops where the embedding would need more than this ratio (near the asymptote the
#: needed ratio runs to 1e14, which says nothing more than "impossible" and wrecks the axis).
WALL_MAX_RATIO = 1000.0


def wall_curve(result: Mapping[str, Any], targets: Sequence[float] | None = None) -> pd.DataFrame:
    """Needed embedding ratio for a range of total target ratios (NaN where impossible or beyond
    :data:`WALL_MAX_RATIO`)."""
    if targets is None:
        top = embedding_wall(result, 1e9)["max_total_ratio"]
        hi = top * 0.999 if math.isfinite(top) else 20.0 * result["ratio_projected"]
        targets = np.linspace(max(1.0, 0.5 * result["ratio_projected"]), hi, 60)
    rows = []
    for t in targets:
        w = embedding_wall(result, float(t))
        need = w["embedding_ratio_needed"] if w["feasible"] else np.nan
        rows.append({"target_ratio": float(t), "embedding_ratio_needed": need if need <= WALL_MAX_RATIO else np.nan})
    return pd.DataFrame(rows)


def wall_figure(result: Mapping[str, Any], target: float) -> go.Figure:
    """The embedding wall: needed embedding ratio vs total target (log y), the current embedding
    ratio (horizontal) and the asymptote at the largest reachable total ratio (vertical)."""
    cur = embedding_wall(result, target)
    df = wall_curve(result)
    fig = go.Figure(go.Scatter(x=df["target_ratio"], y=df["embedding_ratio_needed"], mode="lines",
                               name="embedding ratio needed"))
    fig.add_hline(y=cur["embedding_ratio_now"], line_dash="dot",
                  annotation_text=f"embedding now {cur['embedding_ratio_now']:.1f}x")
    if math.isfinite(cur["max_total_ratio"]):
        fig.add_vline(x=cur["max_total_ratio"], line_dash="dash",
                      annotation_text=f"wall {cur['max_total_ratio']:.2f}x")
    if cur["feasible"] and cur["embedding_ratio_needed"] <= WALL_MAX_RATIO:
        fig.add_scatter(x=[target], y=[cur["embedding_ratio_needed"]], mode="markers", name="target",
                        marker=dict(size=11, color="#E45756"))
    fig.update_layout(xaxis_title="total ratio target (×)", yaxis_title="embedding / LM head ratio needed (×)",
                      yaxis_type="log", height=380, margin=dict(t=30, b=10), showlegend=False)
    return tidy_figure(fig)
