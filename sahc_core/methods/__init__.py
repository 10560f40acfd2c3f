"""Compression methods: the registry and one module per method (keep, int-k RTN, SVD, Tensor-Train, ...)."""
from sahc_core._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "registry": ("MethodSpec", "Param", "Compressed", "CalibrationRequired", "register", "methods", "get", "spec_of",
                 "compress", "projected_bytes", "load_compressed", "config_from_dict", "config_to_dict",
                 "config_from_values", "measure", "label", "fit_to_shape", "schema"),
    "keep": ("KeepConfig",),
    "quant": ("QuantConfig", "QuantizedTensor", "quantize", "dequantize", "fake_quantize", "quant_bytes"),
    "lowrank": ("SVDConfig", "LowRankTensor", "svd_factors", "lowrank_bytes"),
    "tt": ("TTConfig", "TTMatrix", "tt_decompose", "tt_bytes"),
})
