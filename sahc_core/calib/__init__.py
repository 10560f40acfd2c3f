"""Calibration statistics: per-linear input second moments ``XᵀX`` captured layer by layer, cached on disk."""
from sahc_core._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "stats": ("CalibConfig", "CalibStats", "LinearStats", "EXTRAS"),
    "store": ("calibration_stats", "stats_dir", "text_sha256"),
    "capture": ("capture_stats",),
})
