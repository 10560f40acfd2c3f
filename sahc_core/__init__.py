"""SAHC Explorer core library: spectrum-aware compression analysis of LLM weights.

The public API, by concept (``from sahc_core import ModelSource, tensor_spectrum, QuantConfig``).
Names resolve lazily (PEP 562), so ``import sahc_core`` imports neither torch nor any submodule
and changes nothing. Functions named like their module (``scan``, ``lowrank``, ``assemble``) are
reached through the module (``from sahc_core.assemble import assemble``).
"""
from __future__ import annotations

import importlib
from typing import Any

from sahc_core.errors import CacheError, CorpusError, JobError, ModelError, PlanError, SahcError

__version__ = "0.1.0"

_API: dict[str, tuple[str, ...]] = {
    "model_io": ("ModelSource", "TensorInfo"),
    "components": ("Component", "classify", "tensor_table", "component_shares"),
    "cache": ("Cache", "default_cache_path"),
    "defaults": ("default_model_dir",),
    "corpus": ("Corpus", "default_corpus", "load_corpus"),
    "spectrum": ("singular_values", "rank_error_curve", "min_rank", "spectrum_stats", "tensor_spectrum"),
    "methods": ("KeepConfig", "compress", "projected_bytes", "measure", "config_from_dict"),
    "quant": ("QuantConfig", "quantize", "dequantize", "fake_quantize"),
    "lowrank": ("SVDConfig", "svd_factors"),
    "tt": ("TTConfig", "tt_decompose"),
    "whatif": ("measure_tensor", "output_cosine_for"),
    "sweeps": ("pareto", "tt_sweep"),
    "gates": ("tensor_gates", "audit_log"),
    "plan": ("CompressionPlan", "project", "embedding_wall"),
    "assemble": ("load_assembled", "shape_gate"),
    "evaluate": ("PplConfig", "load_model", "perplexity"),
    "pipeline": ("execute_run",),
    "jobs": ("start_run", "cancel_run", "list_runs"),
}
_WHERE = {name: module for module, names in _API.items() for name in names}

__all__ = ["SahcError", "ModelError", "CacheError", "PlanError", "CorpusError", "JobError", *_WHERE]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"sahc_core.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'sahc_core' has no attribute {name!r}")
