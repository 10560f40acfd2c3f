"""Plotly figures of the report page (the Model page's share bar is reused from figures_model)."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go


METHOD_COLORS = {"int": "#4C78A8", "svd": "#E45756", "tt": "#54A24B", "keep": "#999999"}
_LABELS = {"ffn": "FFN", "attention_full": "Full attention", "attention_linear": "Linear attention",
           "embedding": "Embedding / LM head", "vision": "Vision", "mtp": "MTP", "norm_other": "Norms & other"}


def label(component: str) -> str:
    """Human label of a component value (``"ffn"`` -> ``"FFN"``); unknown values pass through."""
    return _LABELS.get(str(component), str(component))


def pareto_scatter(points: pd.DataFrame, tensor: str) -> go.Figure:
    """Ratio (log x) vs relative error per method; Pareto-optimal points are outlined and joined."""
    fig = go.Figure()
    for method, g in points.groupby("method", sort=False):
        fig.add_trace(go.Scatter(
            x=g["ratio"], y=g["rel_error"], mode="markers+text", name=method.upper(),
            text=g["label"].where(g["pareto"], ""), customdata=g["label"], textposition="top center", marker=dict(size=11, color=METHOD_COLORS.get(method, "#333"),
                                                   line=dict(width=[2 if p else 0 for p in g["pareto"]],
                                                             color="black")),
            hovertemplate="%{customdata}<br>ratio %{x:.2f}x<br>error %{y:.4f}<extra></extra>"))
    front = points[points["pareto"].astype(bool)].sort_values("ratio")
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=front["ratio"], y=front["rel_error"], mode="lines", name="Pareto front",
                                 line=dict(color="black", dash="dot", width=1), hoverinfo="skip"))
    fig.add_hline(y=1.0, line=dict(color="#B00", dash="dash"), annotation_text="zeros (error 1.0)")
    fig.update_layout(xaxis=dict(title="compression ratio vs 16-bit", type="log"), yaxis_title="relative error",
                      title=dict(text=tensor, font=dict(size=13)), height=460, margin=dict(t=40, b=40))
    return fig


def runs_scatter(runs: pd.DataFrame) -> go.Figure:
    """Ratio vs perplexity per finished run, with each run's baseline perplexity as a dashed line."""
    done = runs[(runs["status"] == "done") & runs["ppl"].notna()] if len(runs) else runs
    fig = go.Figure()
    if len(done):
        fig.add_trace(go.Scatter(x=done["ratio"].astype(float), y=done["ppl"].astype(float), mode="markers+text",
                                 text=done["plan_name"], textposition="top center", name="runs",
                                 marker=dict(size=12, color="#4C78A8"),
                                 hovertemplate="%{text}<br>%{x:.2f}x<br>ppl %{y:.3f}<extra></extra>"))
        base = pd.to_numeric(done["baseline_ppl"], errors="coerce").dropna()
        if len(base):
            fig.add_hline(y=float(base.iloc[-1]), line=dict(color="#555", dash="dash"),
                          annotation_text=f"baseline ppl {float(base.iloc[-1]):.2f}")
    fig.update_layout(xaxis_title="compression ratio (actual)", yaxis_title="perplexity", height=400,
                      margin=dict(t=20, b=40))
    return fig
