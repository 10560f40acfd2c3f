"""Plotly figures of the report and the Runs page (shares, budget, Pareto and heatmap builders are reused
from figures_model, figures_budget, figures_whatif and figures_spectrum)."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go


_LABELS = {"ffn": "FFN", "attention_full": "Full attention", "attention_linear": "Linear attention",
           "embedding": "Embedding / LM head", "vision": "Vision", "mtp": "MTP", "norm_other": "Norms & other"}


def label(component: str) -> str:
    """Human label of a component value (``"ffn"`` -> ``"FFN"``); unknown values pass through."""
    return _LABELS.get(str(component), str(component))


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
