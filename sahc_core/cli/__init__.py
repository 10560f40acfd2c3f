"""The command line: ``python -m sahc_core COMMAND ...``, one thin sub-command per library entry point."""
from sahc_core._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "main": ("main", "build_parser"),
})
