"""sahc_core.spectra.selection (the Spectrum page's pickers) and the scan status line, on a hand-made table."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from sahc_core.spectra.scan import scan_status_line
from sahc_core.spectra.selection import NO_LAYER, depths, layer_choices, layer_tensors, shown_tensors

TABLE = pd.DataFrame({
    "name": ["emb", "l1.q", "l1.k", "l0.q", "l0.k", "head"],
    "component": ["embedding", "attn", "attn", "attn", "attn", "embedding"],
    "kind": ["embed", "q", "k", "q", "k", "head"],
    "layer": [math.nan, 1, 1, 0, 0, math.nan],
})


def test_layers_and_the_tensors_of_one_layer():
    assert layer_choices(TABLE, "attn") == [0, 1]
    assert layer_choices(TABLE, "embedding") == [NO_LAYER]
    assert layer_tensors(TABLE, "attn", 1) == ["l1.q", "l1.k"]
    assert layer_tensors(TABLE, "embedding", NO_LAYER) == ["emb", "head"]


def test_views_and_depths():
    assert shown_tensors(TABLE, "attn", 1, "l1.k", "tensor") == ["l1.k"]
    assert shown_tensors(TABLE, "attn", 1, "l1.k", "layer") == ["l1.q", "l1.k"]
    assert shown_tensors(TABLE, "attn", 1, "l1.k", "across") == ["l0.k", "l1.k"]  # by depth
    assert depths(TABLE, ["l0.k", "l1.k"]) == [0, 1]
    assert depths(TABLE, ["l0.k", "emb"]) is None
    with pytest.raises(ValueError, match="view"):
        shown_tensors(TABLE, "attn", 1, "l1.k", "all")


def test_scan_status_line():
    assert scan_status_line({"done": 3, "total": 3, "todo": [], "eta_seconds": None}) == "Scan: 3/3 tensors done"
    assert scan_status_line({"done": 1, "total": 3, "todo": ["a", "b"], "eta_seconds": 90.0}) == \
        "Scan: 1/3 tensors done · ETA 1.5 min"
    assert scan_status_line({"done": 0, "total": 3, "todo": ["a"], "eta_seconds": None}).endswith(
        "ETA unknown until a tensor is timed on this device")
