"""Plotly figure builders shared by the pages and the report."""
from sahc_core._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "model": ("shares_treemap", "shares_bar"),
    "spectrum": ("sigma_figure", "rank_error_figure", "energy_figure", "layer_heatmap"),
    "whatif": ("pareto_figure", "tt_sweep_figure"),
    "budget": ("bytes_breakdown_figure", "wall_figure"),
    "report": ("runs_scatter",),
})
