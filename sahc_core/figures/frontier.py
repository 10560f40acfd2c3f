"""Plotly figures of the plan optimizer: the ratio-vs-perplexity frontier, predicted vs measured, the choice map.

Inputs are :func:`sahc_core.runs.frontier.run_points` rows and an optimizer choice table
(:mod:`sahc_core.plans.optimize`); nothing here computes a number.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

_KIND_STYLE = {"uniform": ("uniform RTN int-k", "#4C78A8"), "optimized": ("optimised plans", "#E45756"),
               "hand": ("hand plans (study style)", "#54A24B")}


def frontier_figure(points: pd.DataFrame, frontier: pd.DataFrame | None = None) -> go.Figure:
    """Ratio (x) vs perplexity (y, log) of every run, coloured by plan kind; a run with a failed gate
    is drawn as an open symbol; the measured frontier (:func:`runs.frontier.measured_frontier`) is a line."""
    fig = go.Figure()
    for kind, (name, color) in _KIND_STYLE.items():
        pts = points[points["kind"] == kind]
        if pts.empty:
            continue
        failed = pts["gates_failed"].fillna(0).astype(int) > 0
        fig.add_trace(go.Scatter(
            x=pts["ratio"], y=pts["ppl"], mode="markers+text", name=name, text=pts["label"],
            textposition="top center", customdata=np.stack([pts["gates_failed"].fillna(0).astype(int),
                                                            pts["run_id"]], axis=-1),
            marker=dict(size=12, color=color, symbol=np.where(failed, "circle-open", "circle"), line=dict(width=2)),
            hovertemplate="%{text}<br>%{x:.2f}x, ppl %{y:.3f}<br>gates failed: %{customdata[0]}<br>"
                          "run %{customdata[1]}<extra></extra>"))
    if frontier is not None and len(frontier) > 1:
        fig.add_trace(go.Scatter(x=frontier["ratio"], y=frontier["ppl"], mode="lines", name="measured frontier",
                                 line=dict(color="#333", dash="dot"), hoverinfo="skip"))
    if len(points):
        base = float(points["baseline_ppl"].iloc[-1])
        fig.add_hline(y=base, line=dict(color="#888", dash="dash"), annotation_text=f"baseline ppl {base:.2f}")
    fig.update_layout(xaxis_title="compression ratio (actual, vs 16-bit)", yaxis_title="perplexity (log scale)",
                      yaxis_type="log", height=440, margin=dict(t=30, b=40), legend=dict(orientation="h", y=-0.2))
    return fig


def prediction_figure(points: pd.DataFrame, rho: float) -> go.Figure:
    """Predicted Δloss (x) vs measured Δ log ppl (y), both log scale, with the y = x line and Spearman ρ."""
    fig = go.Figure()
    for kind, (name, color) in _KIND_STYLE.items():
        pts = points[points["kind"] == kind]
        if len(pts):
            fig.add_trace(go.Scatter(x=pts["predicted_dloss"], y=pts["delta_log_ppl"], mode="markers", name=name,
                                     text=pts["label"], marker=dict(size=11, color=color),
                                     hovertemplate="%{text}<br>predicted %{x:.4f}<br>measured %{y:.4f}<extra></extra>"))
    vals = pd.concat([points["predicted_dloss"], points["delta_log_ppl"]]).astype(float)
    vals = vals[np.isfinite(vals) & (vals > 0)]
    if len(vals):
        lo, hi = float(vals.min()) / 1.5, float(vals.max()) * 1.5
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="measured = predicted",
                                 line=dict(color="#888", dash="dash"), hoverinfo="skip"))
    title = "Spearman ρ = n/a (fewer than 3 runs)" if not math.isfinite(rho) else f"Spearman ρ = {rho:.2f}"
    fig.update_layout(title=title, xaxis_title="predicted Δloss (nats/token)", yaxis_title="measured Δ log ppl",
                      xaxis_type="log", yaxis_type="log", height=400, margin=dict(t=50, b=40))
    return fig




def choice_heatmap(choice: pd.DataFrame, value: str = "bits_per_weight") -> go.Figure:
    """Layer (y) x projection (x) map of an optimizer choice: colour = stored bits per weight, text =
    the setting's label. Tensors outside the layers (embedding) are listed as layer "-"."""
    rows = choice[choice["ndim"] >= 2].copy() if "ndim" in choice else choice.copy()
    rows["layer_"] = [str(int(v)) if pd.notna(v) else "-" for v in rows["layer"]]
    rows["bits_per_weight"] = 8.0 * rows["bytes"].astype(float) / (rows["orig_bytes"].astype(float) / 2.0)
    order = sorted(rows["layer_"].unique(), key=lambda s: (s != "-", int(s) if s.isdigit() else -1))
    z = rows.pivot_table(index="layer_", columns="kind", values=value, aggfunc="first").reindex(order)
    text = rows.pivot_table(index="layer_", columns="kind", values="label", aggfunc="first").reindex(order)
    text = text.reindex(columns=z.columns)
    fig = go.Figure(go.Heatmap(z=z.to_numpy(dtype=float), x=list(z.columns), y=list(z.index),
                               text=text.fillna("").to_numpy(), texttemplate="%{text}", textfont=dict(size=9),
                               colorscale="Viridis", colorbar=dict(title="bits/weight"),
                               hovertemplate="layer %{y} %{x}<br>%{text}<br>%{z:.2f} bits/weight<extra></extra>"))
    fig.update_layout(xaxis_title="projection", yaxis_title="layer", height=max(360, 22 * len(order) + 120),
                      margin=dict(t=30, b=40), yaxis=dict(autorange="reversed"))
    return fig
