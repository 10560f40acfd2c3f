"""Plotly figures for the Spectrum page and the report: spectra, rank-vs-error, energy, heatmaps.

Every builder takes :class:`~sahc_core.spectra.spectrum.SpectrumResult` objects (or the tidy scan frame)
and returns a ``plotly.graph_objects.Figure``; nothing here computes a spectrum.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from sahc_core.spectra.spectrum import ERROR_LEVELS, SpectrumResult, rank_error_curve

_PALETTE = px.colors.qualitative.Plotly
_LEVEL_DASH = {0.1: "dot", 0.05: "dash", 0.01: "dashdot"}


def _label(name: str) -> str:
    """Short legend label: drop the common ``model.``/``.weight`` decorations."""
    return name.removeprefix("model.").removesuffix(".weight")


def _ranks(n: int) -> np.ndarray:
    return np.arange(1, n + 1)


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 360) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=height, margin=dict(t=40, l=10, r=10, b=10),
                      legend=dict(font=dict(size=10)), hovermode="x unified")
    return fig


def sigma_figure(results: Sequence[SpectrumResult], normalized: bool = False) -> go.Figure:
    """σ_i against rank i on a log scale; the Marchenko–Pastur bulk [σ-, σ+] shaded for each tensor.

    With ``normalized`` the curves are σ_i/σ_1 and the bulk edges are divided by σ_1 as well.
    """
    fig = go.Figure()
    for k, r in enumerate(results):
        s = r.singular_values
        scale = s[0] if normalized and s.size and s[0] > 0 else 1.0
        color = _PALETTE[k % len(_PALETTE)]
        lo, hi = r.stats["mp_lo"] / scale, r.stats["mp_hi"] / scale
        positive = s[s > 0] / scale
        if lo <= 0 and positive.size:  # square: the bulk reaches 0, which a log axis cannot show
            lo = float(positive.min())
        # the bulk as a filled band (a legend entry; shapes with annotations distort a log autorange)
        fig.add_trace(go.Scatter(x=[1, s.size, s.size, 1, 1], y=[lo, lo, hi, hi, lo], fill="toself", mode="none",
                                 fillcolor=color, opacity=0.12, name=f"MP bulk {_label(r.tensor)}",
                                 hoverinfo="skip", legendgroup=r.tensor))
        fig.add_trace(go.Scatter(x=_ranks(s.size), y=s / scale, mode="lines", name=_label(r.tensor),
                                 line=dict(color=color), legendgroup=r.tensor))
    fig.update_yaxes(type="log", exponentformat="power")
    return _layout(fig, "σ / σ₁ (normalised)" if normalized else "Singular values (MP bulk shaded)",
                   "rank i", "σ_i / σ_1" if normalized else "σ_i")


def rank_error_figure(results: Sequence[SpectrumResult]) -> go.Figure:
    """EYM relative error e(r) with the 0.10 / 0.05 / 0.01 levels and each tensor's minimum ranks."""
    fig = go.Figure()
    for k, r in enumerate(results):
        e = rank_error_curve(r.singular_values)
        color = _PALETTE[k % len(_PALETTE)]
        fig.add_trace(go.Scatter(x=np.arange(e.size), y=e, mode="lines", name=_label(r.tensor), line=dict(color=color)))
        mins = [r.stats[f"min_rank_{eps}"] for eps in ERROR_LEVELS]
        fig.add_trace(go.Scatter(x=mins, y=[e[m] for m in mins], mode="markers", marker=dict(color=color, size=8),
                                 name=f"min ranks {_label(r.tensor)}", showlegend=False,
                                 hovertext=[f"ε={eps}: r={m}" for eps, m in zip(ERROR_LEVELS, mins)]))
    for eps in ERROR_LEVELS:
        fig.add_hline(y=eps, line_dash=_LEVEL_DASH[eps], line_color="grey", annotation_text=f"{eps:g}",
                      annotation_position="right")
    return _layout(fig, "Rank vs relative error (Eckart–Young–Mirsky)", "rank r", "‖W − W_r‖_F / ‖W‖_F")


def energy_figure(results: Sequence[SpectrumResult]) -> go.Figure:
    """Cumulative energy Σ_{i≤r} σ_i² / Σ σ_i² against rank r."""
    fig = go.Figure()
    for k, r in enumerate(results):
        e = 1.0 - rank_error_curve(r.singular_values) ** 2
        fig.add_trace(go.Scatter(x=np.arange(e.size), y=e, mode="lines", name=_label(r.tensor),
                                 line=dict(color=_PALETTE[k % len(_PALETTE)])))
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    return _layout(fig, "Cumulative energy", "rank r", "energy kept")


def layer_heatmap(scan_df: pd.DataFrame, value: str, title: str, percent: bool = False) -> go.Figure:
    """Heatmap of one statistic over layer index (x) × projection kind (y), from a scan frame.

    Rows without a layer index (embeddings, heads) are left out.
    """
    df = scan_df.dropna(subset=["layer"])
    grid = df.pivot_table(index="kind", columns="layer", values=value, aggfunc="mean")
    if percent:
        grid = grid * 100.0
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[int(c) for c in grid.columns], y=list(grid.index),
                               colorscale="Viridis", colorbar=dict(title="%" if percent else ""),
                               hovertemplate="layer %{x} · %{y}<br>" + value + " = %{z:.3g}<extra></extra>"))
    return _layout(fig, title, "layer", "projection", height=max(240, 40 * len(grid.index) + 120))


def output_rank_figure(curves: Sequence[dict]) -> go.Figure:
    """Per tensor: the plain rank-vs-weight-error curve (solid) beside the whitened rank-vs-output-error
    curve on calibration activations (dashed), from :func:`sahc_core.spectra.whitened.output_rank_curve`."""
    fig = go.Figure()
    for k, c in enumerate(curves):
        color = _PALETTE[k % len(_PALETTE)]
        w, o = np.asarray(c["weight_error"]), np.asarray(c["output_error"])
        fig.add_trace(go.Scatter(x=np.arange(w.size), y=w, mode="lines", line=dict(color=color),
                                 name=f"{_label(c['tensor'])}: weight error"))
        fig.add_trace(go.Scatter(x=np.arange(o.size), y=o, mode="lines", line=dict(color=color, dash="dash"),
                                 name=f"{_label(c['tensor'])}: output error (whitened)"))
    for eps in ERROR_LEVELS:
        fig.add_hline(y=eps, line_dash=_LEVEL_DASH[eps], line_color="grey", annotation_text=f"{eps:g}",
                      annotation_position="right")
    return _layout(fig, "Rank vs error: weights (EYM) and outputs on calibration activations (whitened EYM)",
                   "rank r", "relative error")
