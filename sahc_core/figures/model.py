"""Plotly figures for the Model page and the report: where the parameters live."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

COMPONENT_COLORS = {
    "ffn": "#4C78A8", "attention_full": "#F58518", "attention_linear": "#E45756", "embedding": "#72B7B2",
    "vision": "#54A24B", "mtp": "#EECA3B", "norm_other": "#B279A2",
}


def shares_treemap(table: pd.DataFrame) -> go.Figure:
    """Treemap component -> kind -> tensor, area = parameters (tied weights counted once).

    ``table`` is ``components.tensor_table(source)``.
    """
    df = table.assign(kind=table["kind"].fillna("other").astype(str), params=table["params"].astype("int64"))
    fig = px.treemap(df, path=[px.Constant("model"), "component", "kind", "name"], values="params",
                     color="component", color_discrete_map={"(?)": "#ddd", **COMPONENT_COLORS})
    fig.update_traces(texttemplate="%{label}<br>%{value:,.0f} params<br>%{percentRoot:.1%}",
                      hovertemplate="%{id}<br>%{value:,.0f} params (%{percentRoot:.2%} of model)<extra></extra>")
    fig.update_layout(margin=dict(t=10, l=0, r=0, b=0), height=520)
    return fig


def shares_bar(shares: pd.DataFrame) -> go.Figure:
    """Horizontal bar of component shares (``components.component_shares``)."""
    fig = px.bar(shares.sort_values("share"), x="share", y="component", orientation="h", text="share",
                 color="component", color_discrete_map=COMPONENT_COLORS)
    fig.update_traces(texttemplate="%{text:.1%}")
    fig.update_layout(showlegend=False, xaxis_tickformat=".0%", height=300, margin=dict(t=10, b=10))
    return fig
