"""The package's public API: importing it is cheap and side-effect free; every listed name resolves."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import sahc_core

REPO = Path(__file__).resolve().parents[1]


def test_import_is_cheap_and_side_effect_free():
    code = ("import logging, sys; before = len(logging.root.handlers); import sahc_core; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert not [m for m in sys.modules if m.startswith('sahc_core.') and m not in ('sahc_core.errors', 'sahc_core._lazy')]; "
            "assert len(logging.root.handlers) == before")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_every_public_name_resolves_to_a_function_or_class():
    for name in sahc_core.__all__:
        obj = getattr(sahc_core, name)
        assert not isinstance(obj, types.ModuleType), name
        assert callable(obj), name


def test_every_subpackage_lists_names_that_resolve():
    """Each subpackage's short __init__ names only things that exist (imported lazily on access)."""
    import importlib

    for pkg in ("io", "spectra", "methods", "whatif", "plans", "evaluate", "runs", "report", "figures", "cli"):
        mod = importlib.import_module(f"sahc_core.{pkg}")
        assert mod.__all__, pkg
        for name in mod.__all__:
            assert getattr(mod, name) is not None, f"sahc_core.{pkg}.{name}"
