"""Human-readable numbers and tables (sahc_core.figures.format) and the figure polish (figures.style)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from sahc_core.figures import format as fm
from sahc_core.figures.style import axis_type, decade_range, slide_figure, tidy_figure


@pytest.mark.parametrize("seconds,text", [(0, "0 s"), (0.4, "< 1 s"), (42, "42 s"), (1745, "29 min 05 s"), (3725, "1 h 02 min")])
def test_durations(seconds, text):
    assert fm.fmt_duration(seconds) == text


def test_numbers_with_separators_and_units():
    assert fm.fmt_count(28311552) == "28,311,552"
    assert fm.fmt_mb(56_623_104) == "56.6 MB"
    assert fm.fmt_ratio(3.5934) == "3.59×" and fm.fmt_ratio(float("nan")) == fm.MISSING
    assert fm.fmt_pct(0.2105) == "21.1 %"
    assert fm.fmt_params(134_515_008) == "134.5 M" and fm.fmt_params(90_432) == "90.4 k"
    assert fm.plural(1, "tensor") == "1 tensor" and fm.plural(1024, "token") == "1,024 tokens"


def test_display_table_reads_like_a_report():
    raw = pd.DataFrame({
        "run_id": ["a", "b"], "ratio_projected": [3.5934, None], "checkpoint_mb": [1234.56, float("nan")],
        "params": [28311552, 10], "share": [0.2105, 0.5], "bytes_payload": [43_960_000, 0],
        "tt_shape": [json.dumps([[1, 8, 8, 64], [64, 6, 9, 1]]), None], "shape": [(576, 1536), (3,)],
        "passed": [True, False], "duration_s": [1745.0, 3.2], "delta_ppl": [0.04, -1.2],
        "component": ["attention_full", "norm_other"], "ppl": [float("inf"), 29.2834]})
    t = fm.display_table(raw)
    assert fm.no_raw_cells(t) == []
    row = t.iloc[0]
    assert row["Run"] == "a" and row["Ratio projected (×)"] == "3.59" and row["On disk (MB)"] == "1,234.6"
    assert row["Parameters"] == "28,311,552" and row["Share (%)"] == "21.1" and row["Bytes payload (MB)"] == "43.96"
    assert row["TT cores"] == "1 × 8 × 8 × 64; 64 × 6 × 9 × 1" and row["Shape"] == "576 × 1536"
    assert row["Result"] == "pass" and row["Duration"] == "29 min 05 s" and row["Δppl vs own baseline"] == "+0.040"
    assert row["Component"] == "Full attention" and row["Perplexity"] == "∞"
    assert t.iloc[1]["Ratio projected (×)"] == fm.MISSING and t.iloc[1]["TT cores"] == fm.MISSING


def test_no_raw_cells_catches_what_a_reader_should_not_see():
    raw = pd.DataFrame({"ratio_projected": [None], "tt_shape": ['[[1, 8]]']}).astype(object)
    assert {"header 'ratio_projected'", "ratio_projected: 'None'", "tt_shape: '[[1, 8]]'"} <= set(fm.no_raw_cells(raw))


def test_headers_of_column_families():
    assert fm.header("sigma_at_512") == "σ at rank 512" and fm.column_kind("energy_at_64") == "frac"
    assert fm.header("min_rank_frac_0.1") == "Min rank for error 0.1 (% of full rank)"
    assert fm.header("some_new_thing_mb") == "Some new thing (MB)" and fm.header("n_widgets") == "Widgets"
    assert "_" not in fm.header("stable_rank")


@pytest.mark.parametrize("values,kind", [([30, 46218], "log"), ([1, 50], "linear"), ([-1, 1000], "linear"),
                                         ([5], "linear"), ([0.001, 1.0], "log")])
def test_axis_type_from_the_data(values, kind):
    assert axis_type(values) == kind


def test_decade_range_covers_the_data_in_whole_decades():
    assert decade_range([0.05, 3.0]) == [-2.0, 1.0]
    assert decade_range([20.0, 30.0]) == [1.0, 2.0]  # inside one decade: still two labelled ticks
    assert decade_range([0.0, -1.0]) is None


def test_tidy_figure_decades_and_line_labels_on_log_axes():
    s = np.geomspace(40.0, 0.02, 50)
    fig = go.Figure(go.Scatter(x=np.arange(1, 51), y=s)).update_yaxes(type="log")
    fig.add_hline(y=33.07, annotation_text="baseline")
    out = tidy_figure(fig)
    assert out.layout.yaxis.dtick == 1 and tuple(out.layout.yaxis.range) == (-2.0, 2.0)
    assert out.layout.annotations[0].y == pytest.approx(math.log10(33.07))  # plotly.js reads log units
    assert tidy_figure(out).layout.annotations[0].y == pytest.approx(math.log10(33.07))  # idempotent
    assert out.layout.xaxis.automargin and out.layout.yaxis.automargin
    big = slide_figure(fig.update_layout(title="t"))
    assert big.layout.font.size == 18 and big.layout.height >= 480 and big.layout.title.automargin
