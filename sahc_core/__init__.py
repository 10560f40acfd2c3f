"""SAHC Explorer core library: spectrum-aware compression analysis of LLM weights.

The public API, by concept (``from sahc_core import ModelSource, tensor_spectrum, QuantConfig``).
Names resolve lazily (PEP 562), so ``import sahc_core`` imports neither torch nor any submodule
and changes nothing. The subpackages, each with a short ``__init__`` listing its own names:

- ``io``: model directories (``ModelSource``), the component map, the embedded model and corpus
- ``spectra``: singular values, statistics, rank-vs-error curves, scans
- ``methods``: the method registry and one module per method
- ``whatif``: one tensor, one setting, measured (and sweeps)
- ``plans``: whole-model plans, projection, assembly
- ``evaluate``: perplexity, activations, output agreement, the smoke test
- ``runs``: background jobs and the run pipeline
- ``report`` / ``figures``: the report, its exports, the plotly figures
- ``cli``: ``python -m sahc_core``
- ``cache`` (DuckDB), ``gates`` (quality gates, audit log), ``errors``, ``device``
"""
from __future__ import annotations

from sahc_core._lazy import lazy_exports
from sahc_core.errors import CacheError, CorpusError, JobError, ModelError, PlanError, SahcError

__version__ = "0.1.0"

__getattr__, _names = lazy_exports(__name__, {
    "io.source": ("ModelSource", "TensorInfo"),
    "io.components": ("Component", "classify", "tensor_table", "component_shares"),
    "io.default_model": ("default_model_dir",),
    "io.corpus": ("Corpus", "default_corpus", "load_corpus"),
    "cache": ("Cache", "default_cache_path"),
    "spectra.spectrum": ("singular_values", "rank_error_curve", "min_rank", "spectrum_stats", "tensor_spectrum"),
    "methods.registry": ("compress", "projected_bytes", "measure", "config_from_dict"),
    "methods.keep": ("KeepConfig",),
    "methods.quant": ("QuantConfig", "quantize", "dequantize", "fake_quantize"),
    "methods.lowrank": ("SVDConfig", "svd_factors"),
    "methods.tt": ("TTConfig", "tt_decompose"),
    "whatif.measure": ("measure_tensor", "output_cosine_for"),
    "whatif.sweeps": ("pareto", "tt_sweep"),
    "gates": ("tensor_gates", "audit_log"),
    "plans.plan": ("CompressionPlan", "project", "embedding_wall"),
    "plans.assemble": ("load_assembled", "shape_gate"),
    "evaluate.model": ("load_model",),
    "evaluate.perplexity": ("PplConfig", "perplexity"),
    "runs.pipeline": ("execute_run",),
    "runs.jobs": ("start_run", "cancel_run", "list_runs"),
})
__all__ = ["SahcError", "ModelError", "CacheError", "PlanError", "CorpusError", "JobError", *_names]
