"""Whole-model plans: resolution per tensor, projected bytes, the embedding wall, assembly of a checkpoint."""
from sahc_core._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "plan": ("CompressionPlan", "Override", "resolve", "summarize", "project", "embedding_wall", "example_plans",
             "load_plans", "save_plan"),
    "assemble": ("read_manifest", "iter_assembled", "load_assembled"),
    "export": ("export_checkpoint", "export_run", "ExportRefused"),
})
