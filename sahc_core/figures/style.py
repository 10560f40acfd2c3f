"""Figure polish shared by every builder: scales chosen from the data, decade-only log axes, no clipping.

* :func:`axis_type` picks a log axis when the positive values span more than :data:`LOG_SPAN` (100×).
* :func:`decade_axis` / :func:`tidy_figure`: a log axis gets one labelled tick per power of ten
  (``dtick=1`` in log units, shown as 10ⁿ), unlabelled minor grid lines, and a range rounded out to
  whole decades so at least two labelled ticks show; every axis and the title grow the margins
  (``automargin``) instead of being cut off.
* :func:`slide_figure`: the same figure in projector sizes (larger fonts, taller) for presentation mode.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import plotly.graph_objects as go

#: Values spanning more than this factor get a log axis (:func:`axis_type`).
LOG_SPAN = 100.0


def _positive(values: Iterable) -> np.ndarray:
    try:
        a = np.asarray(list(values), dtype=float).ravel()
    except (TypeError, ValueError):
        return np.empty(0)
    return a[np.isfinite(a) & (a > 0)]


def axis_type(values: Iterable, span: float = LOG_SPAN) -> str:
    """``"log"`` when every value is positive and max / min > ``span``, else ``"linear"``."""
    try:
        a = np.asarray(list(values), dtype=float).ravel()
    except (TypeError, ValueError):
        return "linear"
    a = a[np.isfinite(a)]
    if a.size < 2 or (a <= 0).any():
        return "linear"
    return "log" if a.max() / a.min() > span else "linear"


def decade_range(values: Iterable) -> list[float] | None:
    """``[floor(log10 min), ceil(log10 max)]`` of the positive values (at least one decade wide)."""
    a = _positive(values)
    if a.size == 0:
        return None
    lo, hi = math.floor(math.log10(a.min())), math.ceil(math.log10(a.max()))
    if hi <= lo:
        hi = lo + 1
    return [float(lo), float(hi)]


def decade_axis(values: Iterable | None = None) -> dict:
    """Layout dict of a log axis with labelled decades only (range rounded out to decades when given)."""
    d = dict(type="log", dtick=1, exponentformat="power", showexponent="all",
             minor=dict(showgrid=True, gridwidth=0.5, ticks=""))
    rng = decade_range(values) if values is not None else None
    if rng is not None:
        d["range"] = rng
    return d


def _axis_values(fig: go.Figure, axis: str) -> list[float]:
    """Every data value drawn against layout axis ``axis`` (``"xaxis"``, ``"yaxis2"``, ...)."""
    letter, suffix = axis[0], axis[5:]
    ref = letter + suffix
    vals: list[float] = []
    for tr in fig.data:
        if (getattr(tr, f"{letter}axis", None) or letter) != ref:
            continue
        arr = getattr(tr, letter, None)
        if arr is not None:
            vals += _positive(arr).tolist()
    for sh in fig.layout.shapes or ():  # add_hline / add_vline draw shapes the range must include
        if (getattr(sh, f"{letter}ref", None) or letter) == ref:
            vals += _positive([getattr(sh, f"{letter}0", None), getattr(sh, f"{letter}1", None)]).tolist()
    return vals


def _log_line_labels(fig: go.Figure, axis: str) -> None:
    """Labels of ``add_hline`` / ``add_vline`` on a log axis, moved to log units.

    plotly.py places such a label at the line's data value, but plotly.js reads annotation
    coordinates on a log axis as log10 values, so a label for y = 33 lands at 10³³, off the chart.
    """
    letter, ref = axis[0], axis[0] + axis[5:]
    lines = {getattr(sh, f"{letter}0") for sh in fig.layout.shapes or ()
             if (getattr(sh, f"{letter}ref", None) or letter) == ref and getattr(sh, f"{letter}0") is not None
             and getattr(sh, f"{letter}0") == getattr(sh, f"{letter}1")}
    for ann in fig.layout.annotations or ():
        v = getattr(ann, letter)
        if (getattr(ann, f"{letter}ref", None) or letter) == ref and v in lines and isinstance(v, (int, float)) and v > 0:
            setattr(ann, letter, math.log10(v))


def tidy_figure(fig: go.Figure) -> go.Figure:
    """Decade-only log axes sized to the data, automargins everywhere, the title clear of the plot.

    Works on any cartesian figure (a copy is returned); axes of other types are left as they are.
    Labels of horizontal / vertical lines on a log axis are put where the line is (:func:`_log_line_labels`).
    """
    fig = go.Figure(fig)
    layout = fig.layout.to_plotly_json()
    for axis in sorted({"xaxis", "yaxis", *(k for k in layout if k.startswith(("xaxis", "yaxis")))}):
        fig.layout[axis].automargin = True
        if fig.layout[axis].type == "log":
            upd = decade_axis(_axis_values(fig, axis))
            if fig.layout[axis].range is not None:
                upd.pop("range", None)  # a builder's explicit range wins
            fig.layout[axis].update(upd)
            _log_line_labels(fig, axis)
    if fig.layout.title.text:
        fig.update_layout(title=dict(automargin=True, yref="container", y=0.98, yanchor="top", x=0.01,
                                     xanchor="left"))
    return fig


def slide_figure(fig: go.Figure, font_size: int = 18, min_height: int = 480) -> go.Figure:
    """The figure for a projector: :func:`tidy_figure` plus larger fonts (title, axes, legend, labels), taller."""
    fig = tidy_figure(fig)
    height = max(min_height, int((fig.layout.height or 450) * 1.25))
    fig.update_layout(font=dict(size=font_size), height=height, title_font_size=font_size + 6,
                      margin=dict(l=20, r=30, t=90 if fig.layout.title.text else 30, b=20),
                      legend=dict(font=dict(size=font_size - 2)))
    for ann in fig.layout.annotations or ():
        ann.font = dict(size=font_size - 2)
    return fig
