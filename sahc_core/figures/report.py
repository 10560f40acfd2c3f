"""Plotly figures of the report and the Runs page (shares, budget, Pareto and heatmap builders are reused
from figures.model, figures.budget, figures.whatif and figures.spectrum)."""
from __future__ import annotations

import math

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from sahc_core.figures.format import component_label as label  # noqa: F401  (fr.label in the report builders)
from sahc_core.figures.style import axis_type, decade_axis, tidy_figure

_PROTOCOL_COLORS = px.colors.qualitative.D3
NO_RUNS = "No finished run yet: launch one on the Runs page."


def empty_figure(message: str, height: int = 220) -> go.Figure:
    """A figure without axes that says what to do (an empty state, never empty axes)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=16, color="#666"))
    fig.update_layout(xaxis=dict(visible=False), yaxis=dict(visible=False), height=height,
                      margin=dict(t=10, b=10, l=10, r=10))
    return fig


def finished_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs with status ``done`` and a finite perplexity (what the scatter draws)."""
    if runs.empty:
        return runs
    ppl = pd.to_numeric(runs["ppl"], errors="coerce")
    return runs[(runs["status"] == "done") & ppl.map(lambda v: math.isfinite(v) if pd.notna(v) else False)]


def _axis(values: pd.Series, title: str) -> dict:
    return {**decade_axis(values), "title": title} if axis_type(values) == "log" else {"title": title}


def runs_scatter(runs: pd.DataFrame) -> go.Figure:
    """Ratio vs perplexity per finished run, one colour per perplexity protocol, one baseline per protocol.

    Each protocol's baseline perplexity is a dashed line in that protocol's colour, so a run is read
    against its own baseline only; when the runs mix protocols the title says so. Axes switch to log
    when the values span more than 100× (:func:`sahc_core.figures.style.axis_type`). Without a
    finished run the figure is an empty state that says what to do.
    """
    done = finished_runs(runs)
    if done.empty:
        return empty_figure(NO_RUNS)
    done = done.assign(protocol_key=done["protocol_key"].fillna("?") if "protocol_key" in done else "?",
                       protocol=done["protocol"].fillna("protocol not recorded") if "protocol" in done
                       else "protocol not recorded")
    fig = go.Figure()
    groups = list(done.groupby("protocol_key", sort=False))
    ys, lines = [done["ppl"].astype(float)], []
    for k, (_, g) in enumerate(groups):
        color = _PROTOCOL_COLORS[k % len(_PROTOCOL_COLORS)]
        name = g["protocol"].iloc[0] if len(groups) > 1 else "runs"
        delta = pd.to_numeric(g.get("delta_ppl_pct"), errors="coerce") if "delta_ppl_pct" in g else None
        custom = [[p, f"{d:+.1f} %" if d is not None and pd.notna(d) else "—"]
                  for p, d in zip(g["plan_name"], delta if delta is not None else [None] * len(g))]
        fig.add_trace(go.Scatter(x=g["ratio"].astype(float), y=g["ppl"].astype(float), mode="markers+text",
                                 text=g["plan_name"], textposition="top center", name=name, customdata=custom,
                                 marker=dict(size=12, color=color), cliponaxis=False,
                                 hovertemplate="%{customdata[0]}<br>%{x:.2f}×<br>perplexity %{y:.3f}<br>"
                                               "Δ vs own baseline %{customdata[1]}<extra></extra>"))
        base = pd.to_numeric(g["baseline_ppl"], errors="coerce").dropna()
        if len(base):
            lines.append((float(base.iloc[0]), color, f" ({k + 1})" if len(groups) > 1 else ""))
    # highest baseline labelled above its line, the others below, alternating sides: close lines stay legible
    for j, (b, color, tag) in enumerate(sorted(lines, reverse=True)):
        ys.append(pd.Series([b]))
        fig.add_hline(y=b, line=dict(color=color, dash="dash"), annotation_text=f"baseline {b:,.2f}{tag}",
                      annotation_font_color=color,
                      annotation_position=("top" if j == 0 else "bottom") + (" right" if j % 2 == 0 else " left"))
    title = None
    if len(groups) > 1:
        title = f"⚠ {len(groups)} perplexity protocols: read each run against the baseline in its colour"
    fig.update_layout(title=title, xaxis=_axis(done["ratio"].astype(float), "compression ratio (actual, ×)"),
                      yaxis=_axis(pd.concat(ys, ignore_index=True), "perplexity"), height=420,
                      margin=dict(t=60 if title else 20, b=40), showlegend=len(groups) > 1,
                      legend=dict(orientation="h", yanchor="top", y=-0.3, x=0))  # clear of the x title
    return tidy_figure(fig)
