"""Budget page support: per-component choices <-> plan JSON, the bytes breakdown and the embedding wall.

The page edits one method choice per component (method, bits, group size, rank fraction, TT
ranks); :func:`choice_to_config` turns one choice into the plan-JSON config dict and
:func:`config_to_choice` goes back (to load a saved plan into the widgets). The figures take a
:func:`sahc_core.plans.plan.project` result.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from sahc_core.figures.model import COMPONENT_COLORS
from sahc_core.plans.plan import embedding_wall

METHODS = ("keep", "int", "svd", "tt")
#: Plan-JSON fallback configs offered by the page (label -> config dict or None = error).
FALLBACKS: dict[str, dict | None] = {
    "keep 16-bit": {"method": "keep"},
    "int8 per row": {"method": "int", "bits": 8, "group_size": None},
    "int4 per row": {"method": "int", "bits": 4, "group_size": None},
    "error": None,
}
_MB = 1e6


def parse_tt_ranks(text: str | Sequence[int]) -> list[int]:
    """``"64, 64"`` (inner ranks) or ``[1, 64, 64, 1]`` -> the full TT rank list with boundary 1s."""
    if isinstance(text, str):
        try:
            inner = [int(t) for t in text.replace(";", ",").split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"TT ranks must be comma-separated integers like '64, 64', got {text!r}.") from None
    else:
        inner = [int(t) for t in text]
    if inner[:1] == [1] and inner[-1:] == [1] and len(inner) >= 2:
        inner = inner[1:-1]
    if not inner or any(r < 1 for r in inner):
        raise ValueError(f"TT ranks need at least one positive inner rank, like '64, 64', got {text!r}.")
    return [1, *inner, 1]


def choice_to_config(method: str, bits: int = 4, group_size: int | None = 128, rank_fraction: float = 0.5,
                     tt_ranks: str | Sequence[int] = "64, 64") -> dict:
    """Plan-JSON config dict for one component choice (only the keys the method uses)."""
    if method == "keep":
        return {"method": "keep"}
    if method == "int":
        return {"method": "int", "bits": int(bits), "group_size": group_size, "scheme": "asym"}
    if method == "svd":
        return {"method": "svd", "rank_fraction": float(rank_fraction), "bits": int(bits), "group_size": group_size}
    if method == "tt":
        return {"method": "tt", "tt_ranks": parse_tt_ranks(tt_ranks), "bits": int(bits)}
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}.")


def config_to_choice(cfg: Mapping[str, Any]) -> dict:
    """Inverse of :func:`choice_to_config` for the widget values (defaults for keys a config lacks)."""
    out = {"method": cfg["method"], "bits": 4, "group_size": 128, "rank_fraction": 0.5, "tt_ranks": "64, 64"}
    if cfg.get("bits") is not None:
        out["bits"] = int(cfg["bits"])
    if "group_size" in cfg:
        out["group_size"] = cfg["group_size"]
    if cfg.get("rank_fraction") is not None:
        out["rank_fraction"] = float(cfg["rank_fraction"])
    if cfg.get("tt_ranks"):
        out["tt_ranks"] = ", ".join(str(r) for r in list(cfg["tt_ranks"])[1:-1])
    return out


def plan_dict(name: str, choices: Mapping[str, Mapping[str, Any]], overrides: Sequence[dict] = (),
              fallback: dict | None = None) -> dict:
    """Plan JSON with one config per component (no default: every component is chosen explicitly)."""
    out: dict[str, Any] = {"name": name, "default": None,
                           "components": {c: choice_to_config(**ch) for c, ch in choices.items()},
                           "overrides": list(overrides)}
    if fallback is not None:
        out["fallback"] = fallback
    return out


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
        fig.add_bar(x=g["side"], y=g["MB"], name=str(comp), marker_color=COMPONENT_COLORS.get(str(comp), "#999"),
                    hovertemplate=f"{comp}: %{{y:,.2f}} MB<extra></extra>")
    fig.update_layout(barmode="stack", yaxis_title="MB", height=380, margin=dict(t=30, b=10),
                      title=f"{result['bytes_original'] / _MB:,.1f} MB -> {result['bytes_projected'] / _MB:,.1f} MB "
                            f"({result['ratio_projected']:.2f}x)")
    return fig


def wall_curve(result: Mapping[str, Any], targets: Sequence[float] | None = None) -> pd.DataFrame:
    """Needed embedding ratio for a range of total target ratios (NaN where impossible)."""
    if targets is None:
        top = embedding_wall(result, 1e9)["max_total_ratio"]
        hi = top * 0.999 if math.isfinite(top) else 20.0 * result["ratio_projected"]
        targets = np.linspace(max(1.0, 0.5 * result["ratio_projected"]), hi, 60)
    rows = []
    for t in targets:
        w = embedding_wall(result, float(t))
        rows.append({"target_ratio": float(t),
                     "embedding_ratio_needed": w["embedding_ratio_needed"] if w["feasible"] else np.nan})
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
    if cur["feasible"]:
        fig.add_scatter(x=[target], y=[cur["embedding_ratio_needed"]], mode="markers", name="target",
                        marker=dict(size=11, color="#E45756"))
    fig.update_layout(xaxis_title="total ratio target (x)", yaxis_title="embedding / LM head ratio needed (x)",
                      yaxis_type="log", height=380, margin=dict(t=30, b=10), showlegend=False)
    return fig
