"""Plotly figures for the Model page and the report: where the parameters live."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from sahc_core.figures.format import component_label
from sahc_core.figures.style import tidy_figure

COMPONENT_COLORS = {
    "ffn": "#4C78A8", "attention_full": "#F58518", "attention_linear": "#E45756", "embedding": "#72B7B2",
    "vision": "#54A24B", "mtp": "#EECA3B", "norm_other": "#B279A2",
}


def shares_treemap(table: pd.DataFrame) -> go.Figure:
    """Treemap component -> kind -> tensor, area = parameters (tied weights counted once).

    ``table`` is ``components.tensor_table(source)``.
    """
    df = table.assign(kind=table["kind"].fillna("other").astype(str), params=table["params"].astype("int64"),
                      component=table["component"].map(component_label))
    colors = {component_label(c): v for c, v in COMPONENT_COLORS.items()}
    fig = px.treemap(df, path=[px.Constant("model"), "component", "kind", "name"], values="params",
                     color="component", color_discrete_map={"(?)": "#ddd", **colors})
    fig.update_traces(texttemplate="%{label}<br>%{value:,.0f} params<br>%{percentRoot:.1%}",
                      hovertemplate="%{id}<br>%{value:,.0f} params (%{percentRoot:.2%} of model)<extra></extra>")
    fig.update_layout(margin=dict(t=10, l=0, r=0, b=0), height=520)
    return fig


def shares_bar(shares: pd.DataFrame) -> go.Figure:
    """Horizontal bar of component shares (``components.component_shares``), human component labels."""
    df = shares.sort_values("share").assign(component=lambda d: d["component"].map(component_label))
    colors = {component_label(c): v for c, v in COMPONENT_COLORS.items()}
    fig = px.bar(df, x="share", y="component", orientation="h", text="share", color="component",
                 color_discrete_map=colors)
    fig.update_traces(texttemplate="%{text:.1%}", textposition="outside", cliponaxis=False)
    fig.update_layout(showlegend=False, xaxis=dict(tickformat=".0%", title="share of parameters",
                                                   range=[0, min(1.0, float(df["share"].max()) * 1.25 + 0.02)]),
                      yaxis_title=None, height=300, margin=dict(t=10, b=10, r=20))
    return tidy_figure(fig)
