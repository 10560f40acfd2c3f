"""Which tensors a spectrum view shows: a component's layers, one layer's tensors, one projection across layers.

Plain functions of :func:`sahc_core.spectra.scan.matrix_table` (the Spectrum page's pickers): a view is
``"tensor"`` (the picked tensor), ``"layer"`` (every tensor of its layer) or ``"across"`` (the tensors of
its kind in every layer, ordered by depth). Tensors outside the decoder layers (embedding, head) share
the layer :data:`NO_LAYER`.
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

#: The "layer" of tensors outside the decoder layers.
NO_LAYER = "—"
VIEWS = ("tensor", "layer", "across")


def layer_choices(table: pd.DataFrame, component: str) -> list:
    """The layers of ``component``: layer indices ascending, then :data:`NO_LAYER` when some tensor has none."""
    comp = table[table["component"] == component]
    return sorted(int(v) for v in comp["layer"].dropna().unique()) + ([NO_LAYER] if comp["layer"].isna().any() else [])


def layer_tensors(table: pd.DataFrame, component: str, layer) -> list[str]:
    """Names of the tensors of ``component`` in ``layer`` (:data:`NO_LAYER`: those without a layer)."""
    comp = table[table["component"] == component]
    here = comp[comp["layer"].isna()] if layer == NO_LAYER else comp[comp["layer"] == layer]
    return here["name"].tolist()


def shown_tensors(table: pd.DataFrame, component: str, layer, name: str, view: str) -> list[str]:
    """The tensors a ``view`` (one of :data:`VIEWS`) of the picked tensor ``name`` shows."""
    if view not in VIEWS:
        raise ValueError(f"unknown spectrum view {view!r}; use one of {', '.join(VIEWS)}.")
    if view == "layer":
        return layer_tensors(table, component, layer)
    if view == "across":
        comp = table[table["component"] == component]
        kind = comp.set_index("name")["kind"].get(name)
        return comp[comp["kind"] == kind].sort_values("layer")["name"].tolist()
    return [name]


def depths(table: pd.DataFrame, names: Sequence[str]) -> list[int] | None:
    """The layer index of each of ``names`` (figures colour by depth), ``None`` when one has no layer."""
    depth = table.set_index("name")["layer"].reindex(list(names))
    return [int(v) for v in depth] if depth.notna().all() else None
