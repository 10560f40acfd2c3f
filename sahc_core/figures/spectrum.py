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

from sahc_core.figures.format import short_name
from sahc_core.figures.style import tidy_figure
from sahc_core.spectra.spectrum import ERROR_LEVELS, SpectrumResult, rank_error_curve

_PALETTE = px.colors.qualitative.Plotly
_LEVEL_DASH = {0.1: "dot", 0.05: "dash", 0.01: "dashdot"}
#: Sequential colormap of the across-layers view (WeightWatcher-style: colour = depth).
DEPTH_SCALE = "Viridis"
#: More overlaid tensors than this are coloured by depth without a legend even when no layers are given.
MAX_LEGEND = 8
SIGMA_I, SIGMA_1 = "σ<sub>i</sub>", "σ<sub>1</sub>"
FRO_ERROR = "‖W − W<sub>r</sub>‖<sub>F</sub> / ‖W‖<sub>F</sub>"
STABLE_RANK = "‖W‖<sub>F</sub><sup>2</sup> / σ<sub>max</sub><sup>2</sup>"


def _ranks(n: int) -> np.ndarray:
    return np.arange(1, n + 1)


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 360, legend: bool = True) -> go.Figure:
    # the legend goes under the plot (clear of the x title), so long tensor names do not squeeze the plot
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=height + (60 if legend else 0),
                      margin=dict(t=50, l=10, r=10, b=10), showlegend=legend,
                      legend=dict(font=dict(size=10), orientation="h", yanchor="top", y=-0.3, x=0),
                      hovermode="x unified" if legend else "closest")
    return tidy_figure(fig)


def _colors(results: Sequence[SpectrumResult], layers: Sequence[int] | None) -> tuple[list[str], tuple | None]:
    """One colour per result: qualitative for a few tensors, by depth (``layers``) for many.

    Returns ``(colors, depth)`` where ``depth`` is ``(layers, lo, hi)`` when coloured by depth, else None.
    """
    n = len(results)
    if layers is None and n <= MAX_LEGEND:
        return [_PALETTE[k % len(_PALETTE)] for k in range(n)], None
    depth = [float(x) for x in (layers if layers is not None else range(n))]
    lo, hi = min(depth), max(depth)
    pos = [(d - lo) / (hi - lo) if hi > lo else 0.5 for d in depth]
    return px.colors.sample_colorscale(DEPTH_SCALE, pos), (depth, lo, hi)


def _depth_colorbar(fig: go.Figure, depth: tuple, x: float, y: float) -> None:
    """An invisible marker carrying the depth colour scale, so the figure shows a 'layer' colorbar."""
    _, lo, hi = depth
    fig.add_trace(go.Scatter(x=[x], y=[y], mode="markers", showlegend=False, hoverinfo="skip",
                             marker=dict(size=0.1, opacity=0, color=[lo], cmin=lo, cmax=hi, colorscale=DEPTH_SCALE,
                                         showscale=True, colorbar=dict(title="layer", thickness=14))))


def _band(fig: go.Figure, n: int, lo: float, hi: float, color: str, name: str, group: str | None) -> None:
    # the bulk as a filled band (a legend entry; shapes with annotations distort a log autorange)
    fig.add_trace(go.Scatter(x=[1, n, n, 1, 1], y=[lo, lo, hi, hi, lo], fill="toself", mode="none", fillcolor=color,
                             opacity=0.12, name=name, hoverinfo="skip", legendgroup=group))


def _mp_edges(r: SpectrumResult, scale: float) -> tuple[float, float]:
    s = r.singular_values
    lo, hi = r.stats["mp_lo"] / scale, r.stats["mp_hi"] / scale
    positive = s[s > 0] / scale
    if lo <= 0 and positive.size:  # square: the bulk reaches 0, which a log axis cannot show
        lo = float(positive.min())
    return lo, hi


def sigma_figure(results: Sequence[SpectrumResult], normalized: bool = False,
                 layers: Sequence[int] | None = None) -> go.Figure:
    """σᵢ against rank i on a log scale with the Marchenko–Pastur bulk [σ₋, σ₊] shaded.

    With ``normalized`` the curves are σᵢ/σ₁ and the bulk edges are divided by σ₁ as well. With
    ``layers`` (one decoder layer index per result, the across-layers view) or more than
    :data:`MAX_LEGEND` tensors, curves are coloured by depth with a colorbar instead of a legend, and
    ONE band is drawn: the median of the tensors' bulk edges.
    """
    fig = go.Figure()
    colors, depth = _colors(results, layers)
    scales = [r.singular_values[0] if normalized and r.singular_values.size and r.singular_values[0] > 0 else 1.0
              for r in results]
    if depth is not None and results:
        edges = np.array([_mp_edges(r, sc) for r, sc in zip(results, scales)])
        n = max(r.singular_values.size for r in results)
        _band(fig, n, float(np.median(edges[:, 0])), float(np.median(edges[:, 1])), "#888888",
              f"MP bulk (median of {len(results)})", None)
    for r, sc, color in zip(results, scales, colors):
        s = r.singular_values
        if depth is None:
            _band(fig, s.size, *_mp_edges(r, sc), color, f"MP bulk {short_name(r.tensor)}", r.tensor)
        fig.add_trace(go.Scatter(x=_ranks(s.size), y=s / sc, mode="lines", name=short_name(r.tensor),
                                 line=dict(color=color, width=1.5 if depth else 2), legendgroup=r.tensor,
                                 hovertemplate=f"{short_name(r.tensor)}<br>i=%{{x}}: %{{y:.4g}}<extra></extra>"))
    if depth is not None and results:
        _depth_colorbar(fig, depth, 1, float(results[0].singular_values[0] / scales[0]) if
                        results[0].singular_values.size else 1.0)
    fig.update_yaxes(type="log")
    return _layout(fig, f"{SIGMA_I} / {SIGMA_1} (normalised)" if normalized else "Singular values (MP bulk shaded)",
                   "rank i", f"{SIGMA_I} / {SIGMA_1}" if normalized else SIGMA_I, legend=depth is None)


def rank_error_figure(results: Sequence[SpectrumResult], layers: Sequence[int] | None = None) -> go.Figure:
    """EYM relative error e(r) with the 0.10 / 0.05 / 0.01 levels and each tensor's minimum ranks."""
    fig = go.Figure()
    colors, depth = _colors(results, layers)
    for r, color in zip(results, colors):
        e = rank_error_curve(r.singular_values)
        fig.add_trace(go.Scatter(x=np.arange(e.size), y=e, mode="lines", name=short_name(r.tensor),
                                 line=dict(color=color, width=1.5 if depth else 2),
                                 hovertemplate=f"{short_name(r.tensor)}<br>r=%{{x}}: %{{y:.4f}}<extra></extra>"))
        mins = [r.stats[f"min_rank_{eps}"] for eps in ERROR_LEVELS]
        fig.add_trace(go.Scatter(x=mins, y=[e[m] for m in mins], mode="markers", marker=dict(color=color, size=8),
                                 name=f"min ranks {short_name(r.tensor)}", showlegend=False,
                                 hovertext=[f"ε={eps}: r={m}" for eps, m in zip(ERROR_LEVELS, mins)]))
    for eps in ERROR_LEVELS:
        fig.add_hline(y=eps, line_dash=_LEVEL_DASH[eps], line_color="grey", annotation_text=f"{eps:g}",
                      annotation_position="right")
    if depth is not None and results:
        _depth_colorbar(fig, depth, 0, 1.0)
    return _layout(fig, "Rank vs relative error (Eckart–Young–Mirsky)", "rank r", FRO_ERROR, legend=depth is None)


def energy_figure(results: Sequence[SpectrumResult], layers: Sequence[int] | None = None) -> go.Figure:
    """Cumulative energy Σ_{i≤r} σᵢ² / Σ σᵢ² against rank r."""
    fig = go.Figure()
    colors, depth = _colors(results, layers)
    for r, color in zip(results, colors):
        e = 1.0 - rank_error_curve(r.singular_values) ** 2
        fig.add_trace(go.Scatter(x=np.arange(e.size), y=e, mode="lines", name=short_name(r.tensor),
                                 line=dict(color=color, width=1.5 if depth else 2),
                                 hovertemplate=f"{short_name(r.tensor)}<br>r=%{{x}}: %{{y:.1%}}<extra></extra>"))
    if depth is not None and results:
        _depth_colorbar(fig, depth, 0, 0.0)
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    return _layout(fig, "Cumulative energy kept", "rank r", "energy kept", legend=depth is None)


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
                               hovertemplate="layer %{x} · %{y}<br>%{z:.3g}<extra></extra>"))
    fig.update_xaxes(dtick=max(1, len(grid.columns) // 12), tickformat="d")  # whole layer indices
    return _layout(fig, title, "layer", "projection", height=max(240, 40 * len(grid.index) + 120), legend=False)


def output_rank_figure(curves: Sequence[dict]) -> go.Figure:
    """Per tensor: the plain rank-vs-weight-error curve (solid) beside the whitened rank-vs-output-error
    curve on calibration activations (dashed), from :func:`sahc_core.spectra.whitened.output_rank_curve`."""
    fig = go.Figure()
    for k, c in enumerate(curves):
        color = _PALETTE[k % len(_PALETTE)]
        w, o = np.asarray(c["weight_error"]), np.asarray(c["output_error"])
        fig.add_trace(go.Scatter(x=np.arange(w.size), y=w, mode="lines", line=dict(color=color),
                                 name=f"{short_name(c['tensor'])}: weight error"))
        fig.add_trace(go.Scatter(x=np.arange(o.size), y=o, mode="lines", line=dict(color=color, dash="dash"),
                                 name=f"{short_name(c['tensor'])}: output error (whitened)"))
    for eps in ERROR_LEVELS:
        fig.add_hline(y=eps, line_dash=_LEVEL_DASH[eps], line_color="grey", annotation_text=f"{eps:g}",
                      annotation_position="right")
    return _layout(fig, "Rank vs error: weights (EYM) and outputs on calibration activations (whitened EYM)",
                   "rank r", "relative error")


def output_rank_table(curves: Sequence[dict]) -> pd.DataFrame:
    """One row per curve of :func:`sahc_core.spectra.whitened.output_rank_curve`: the minimum rank for each
    error level on the weights (``weight r@e``) and on the outputs (``output r@e``)."""
    return pd.DataFrame([{"tensor": short_name(c["tensor"]), **{f"weight r@{e}": c["min_rank"][e] for e in c["min_rank"]},
                          **{f"output r@{e}": c["min_rank_output"][e] for e in c["min_rank_output"]}}
                         for c in curves])


def results_caption(results: Sequence[SpectrumResult]) -> str:
    """``Device: **cpu** · n tensor(s) in x s (k from cache; computing took y s)`` of the spectra shown."""
    devices = sorted({r.device for r in results})
    return (f"Device: **{', '.join(devices)}** · {len(results)} tensor(s) in {sum(r.seconds for r in results):.3f} s "
            f"({sum(r.cached for r in results)} from cache; computing took "
            f"{sum(r.compute_seconds for r in results):.2f} s)")


def note_captions(results: Sequence[SpectrumResult]) -> list[str]:
    """How each reshaped tensor was viewed as a matrix (``conv1d weight ... reshaped to ...``)."""
    return [f"`{short_name(r.tensor)}`: {r.note}" for r in results if r.note]
