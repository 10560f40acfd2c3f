"""Singular-value spectra: values (GPU/CPU), statistics, rank-vs-error curves, the Marchenko-Pastur reference, scans."""
from sahc_core._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "spectrum": ("SpectrumResult", "as_matrix", "singular_values", "rank_error_curve", "min_rank", "spectrum_stats",
                 "marchenko_pastur_edges", "tensor_spectrum"),
    "scan": ("matrix_table", "cached_scan"),
})
