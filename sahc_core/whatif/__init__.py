"""What-if measurements of one tensor (ratio, error, cosine, gates) and sweeps over settings."""
from sahc_core._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "measure": ("measure_tensor", "output_cosine_for", "projected"),
    "sweeps": ("pareto", "pareto_configs", "tt_sweep"),
})
