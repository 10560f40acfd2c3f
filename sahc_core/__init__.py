"""SAHC Explorer core library: spectrum-aware compression analysis of LLM weights.

Importing this package does nothing but define names; submodules are imported lazily by the
caller (``from sahc_core.spectrum import tensor_spectrum``) so that ``import sahc_core`` stays cheap.
"""
from sahc_core.errors import CacheError, CorpusError, JobError, ModelError, PlanError, SahcError

__all__ = ["SahcError", "ModelError", "CacheError", "PlanError", "CorpusError", "JobError"]
__version__ = "0.1.0"
