"""Runs: background jobs, one run end to end (assembly, gates, perplexity against the baseline), Ray scans."""
from sahc_core._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "jobs": ("JobReporter", "start_run", "run_status", "cancel_run", "list_runs", "delete_run_files"),
    "pipeline": ("execute_run", "compare_runs", "measure_checkpoint"),
    "distributed": ("ray_scan",),
})
