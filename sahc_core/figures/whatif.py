"""Plotly figures for the What-if page: error against bytes per method, and the TT sweep."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from sahc_core.figures.style import axis_type, tidy_figure
from sahc_core.methods import registry

METRICS = {"rel_error": "relative error ‖W−Ŵ‖<sub>F</sub> / ‖W‖<sub>F</sub>",
           "output_error": "output error ‖X(W−Ŵ)ᵀ‖<sub>F</sub> / ‖XWᵀ‖<sub>F</sub> (held-out)",
           "weight_cosine": "weight cosine"}


def _spec(method: str):
    """The registry entry of a method name (its title and colour), or None for a name no longer registered."""
    try:
        return registry.get(method)
    except ValueError:
        return None


def pareto_figure(df: pd.DataFrame, current: dict | None = None, metric: str = "rel_error") -> go.Figure:
    """Error (or weight cosine) against stored bytes, one colour per method, Pareto front as a line.

    Parameters
    ----------
    df : DataFrame
        ``sweeps.pareto`` output (``method``, ``label``, ``bytes``, ``ratio``, ``bits_per_weight``,
        ``rel_error``, ``weight_cosine``, ``frontier``).
    current : dict, optional
        The setting on the sliders (``bytes`` and ``metric`` keys): drawn as a star.
    metric : {"rel_error", "output_error", "weight_cosine"}
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}.")
    fig = go.Figure()
    for method, part in df.groupby("method", sort=False):
        fig.add_trace(go.Scatter(
            x=part["bytes"], y=part[metric], mode="markers", name=spec.title if (spec := _spec(method)) else method,
            marker=dict(color=spec.color if spec else None, size=8, opacity=0.85),
            customdata=part[["label", "ratio", "bits_per_weight", "rel_error", "weight_cosine"]].to_numpy(),
            hovertemplate="%{customdata[0]}<br>%{x:,.0f} bytes · ratio %{customdata[1]:.2f}x · "
                          "%{customdata[2]:.2f} bits/weight<br>rel. error %{customdata[3]:.4f} · "
                          "weight cosine %{customdata[4]:.4f}<extra></extra>"))
    col = "frontier_output" if metric == "output_error" else "frontier"
    front = df[df[col]].sort_values("bytes") if col in df else df.iloc[:0]
    if not front.empty:
        fig.add_trace(go.Scatter(x=front["bytes"], y=front[metric], mode="lines", name="Pareto front",
                                 line=dict(color="#333", dash="dot", width=1), hoverinfo="skip"))
    if current is not None and metric in current:
        fig.add_trace(go.Scatter(x=[current["bytes"]], y=[current[metric]], mode="markers", name="current setting",
                                 marker=dict(symbol="star", size=16, color="#E45756", line=dict(color="#000", width=1))))
    if metric in ("rel_error", "output_error"):
        fig.add_hline(y=1.0, line=dict(color="#E45756", dash="dash", width=1),
                      annotation_text="zero matrix (error 1.0)", annotation_position="top left")
    fig.update_layout(xaxis=dict(title="stored bytes (log)", type="log"),
                      yaxis=dict(title=METRICS[metric], type=axis_type(df[metric]) if metric != "weight_cosine"
                                 else "linear"),
                      height=420, margin=dict(t=30, b=10), legend=dict(orientation="h", y=1.12))
    return tidy_figure(fig)


def tt_sweep_figure(df: pd.DataFrame, cos_threshold: float = 0.95) -> go.Figure:
    """Cosine against compression ratio for each TT rank tuple (``sweeps.tt_sweep``), with the gate."""
    colors = ["#54A24B" if p else "#E45756" for p in df["passed"]]
    fig = go.Figure(go.Scatter(
        x=df["ratio"], y=df["cosine"], mode="markers+lines+text", text=df["tt_ranks"], textposition="top center",
        marker=dict(color=colors, size=10), line=dict(color="#bbb", width=1), name="TT",
        hovertemplate="%{text}<br>ratio %{x:.1f}x<br>cosine %{y:.4f}<extra></extra>"))
    fig.add_hline(y=cos_threshold, line=dict(color="#E45756", dash="dash", width=1),
                  annotation_text=f"gate cos ≥ {cos_threshold:g}", annotation_position="bottom right")
    fig.update_layout(xaxis=dict(title="compression ratio vs 16-bit (log)", type="log"),
                      yaxis=dict(title="mean per-token cosine"), height=380, margin=dict(t=30, b=10),
                      showlegend=False)
    return tidy_figure(fig)
