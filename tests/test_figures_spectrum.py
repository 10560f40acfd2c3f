"""Spectrum figures: proper math labels, decades on log axes, the across-layers view coloured by depth."""
from __future__ import annotations

import numpy as np
import plotly.express as px
import pytest

from sahc_core.figures.spectrum import energy_figure, layer_heatmap, rank_error_figure, sigma_figure
from sahc_core.spectra.spectrum import SpectrumResult, spectrum_stats


def _result(layer: int, seed: int = 0) -> SpectrumResult:
    W = np.random.default_rng(seed + layer).standard_normal((48, 32)) * (1 + layer)
    s = np.linalg.svd(W, compute_uv=False)
    return SpectrumResult(tensor=f"model.layers.{layer}.self_attn.k_proj.weight", shape=(48, 32), note=None,
                          device="cpu", seconds=0.0, cached=False, singular_values=s,
                          stats=spectrum_stats(s, (48, 32), float(W.mean())))


def _texts(fig) -> list[str]:
    lay = fig.layout
    return [t for t in (lay.title.text, lay.xaxis.title.text, lay.yaxis.title.text) if t]


@pytest.mark.parametrize("builder", [sigma_figure, rank_error_figure, energy_figure])
def test_labels_use_math_typography(builder):
    fig = builder([_result(0)])
    assert _texts(fig) and all("_" not in t for t in _texts(fig)), _texts(fig)


def test_few_tensors_keep_a_legend_and_one_band_each():
    fig = sigma_figure([_result(0), _result(1)])
    assert fig.layout.showlegend is not False
    assert sum(t.fill == "toself" for t in fig.data) == 2
    assert fig.layout.yaxis.dtick == 1 and fig.layout.yaxis.type == "log"  # decades only


def test_across_layers_depth_colormap_and_the_median_band():
    results = [_result(k) for k in range(30)]
    fig = sigma_figure(results, layers=list(range(30)))
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(bands) == 1
    lo, hi = np.median([r.stats["mp_lo"] for r in results]), np.median([r.stats["mp_hi"] for r in results])
    assert min(bands[0].y) == pytest.approx(lo) and max(bands[0].y) == pytest.approx(hi)
    assert fig.layout.showlegend is False
    curves = [t for t in fig.data if t.mode == "lines"]
    viridis = px.colors.sample_colorscale("Viridis", [0.0, 1.0])
    assert curves[0].line.color == viridis[0] and curves[-1].line.color == viridis[1]  # shallow -> deep
    bar = [t for t in fig.data if t.marker is not None and t.marker.showscale]
    assert len(bar) == 1 and bar[0].marker.colorbar.title.text == "layer"
    assert rank_error_figure(results, layers=list(range(30))).layout.showlegend is False


def test_layer_heatmap_ticks_whole_layers():
    import pandas as pd

    df = pd.DataFrame({"layer": [0, 1, 0, 1], "kind": ["q", "q", "k", "k"], "v": [0.1, 0.2, 0.3, 0.4]})
    fig = layer_heatmap(df, "v", "t")
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tickformat == "d"


def test_captions_and_the_output_rank_table():
    from dataclasses import replace

    from sahc_core.figures.spectrum import note_captions, output_rank_table, results_caption

    a, b = _result(0), replace(_result(1), cached=True, note="conv1d weight (8, 1, 4) reshaped", seconds=0.5)
    assert results_caption([a, b]) == ("Device: **cpu** · 2 tensor(s) in 0.500 s (1 from cache; "
                                       "computing took 0.00 s)")
    assert note_captions([a, b]) == ["`layers.1.self_attn.k_proj`: conv1d weight (8, 1, 4) reshaped"]
    table = output_rank_table([{"tensor": "model.layers.0.mlp.up_proj.weight", "min_rank": {0.1: 3, 0.01: 9},
                                "min_rank_output": {0.1: 2, 0.01: 7}}])
    assert table.to_dict("records") == [{"tensor": "layers.0.mlp.up_proj", "weight r@0.1": 3, "weight r@0.01": 9,
                                         "output r@0.1": 2, "output r@0.01": 7}]
