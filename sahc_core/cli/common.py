"""Helpers every sub-command shares: the model directory, the cache, the workspace, a progress bar.

Kept apart from :mod:`sahc_core.cli.main` so that sub-command modules (``cli.report``) import them
without importing the parser that imports them (no import circle).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model).expanduser().resolve()
    from sahc_core.io.default_model import default_model_dir

    return default_model_dir()


def _source(args: argparse.Namespace):
    from sahc_core.io.source import ModelSource

    return ModelSource.open(_model_dir(args))


def _cache(args: argparse.Namespace):
    from sahc_core.cache import Cache

    return None if getattr(args, "no_cache", False) else Cache(args.cache)


def _tqdm_progress(desc: str, unit: str) -> tuple[Callable[..., None], Callable[[], None]]:
    """A progress callback ``(done, total, *rest)`` drawing a tqdm bar on stderr, and its closer."""
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int, *rest: Any, **__: Any) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        b = bar["bar"]
        b.total = total
        b.n = done
        if rest and isinstance(rest[0], str):  # (name) or (name, eta_s): what was just done and what is left
            eta = rest[1] if len(rest) > 1 and isinstance(rest[1], int | float) else None
            b.set_postfix_str(rest[0].removesuffix(".weight")[-40:] + ("" if eta is None else f" · ETA {eta:.0f} s"),
                             refresh=False)
        b.refresh()

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return update, close


def _workspace():
    """The CLI process's workspace (it owns the process, so computations may tune torch's threads)."""
    from sahc_core.workspace import Workspace

    return Workspace(adaptive_threads=True)



def _calib_config(args: argparse.Namespace) -> Any:
    """``CalibConfig`` of ``--calib-tokens`` / ``--calib-heldout-tokens`` / ``--calib-window`` (defaults where not given)."""
    from sahc_core.calib.stats import CalibConfig

    given = {k: getattr(args, f"calib_{k}", None) for k in ("tokens", "heldout_tokens", "window")}
    return CalibConfig(**{k: v for k, v in given.items() if v is not None})


def _calib(args: argparse.Namespace, source: Any):
    """Calibration statistics of ``source`` (captured once, then read from the cache folder), or None
    when ``--calib`` was not given."""
    if not getattr(args, "calib", False):
        return None
    from sahc_core.cache import Cache
    from sahc_core.calib.store import calibration_stats
    from sahc_core.io.corpus import load_corpus

    if args.no_cache:
        raise ValueError("--calib keeps its statistics beside the cache; drop --no-cache to use it.")
    text = load_corpus(args.corpus).calib_text if getattr(args, "corpus", None) else None
    update, close = _tqdm_progress("calibration", "layer")
    try:
        return calibration_stats(source, Cache(args.cache), text, _calib_config(args), progress=update,
                                 device=args.device)
    finally:
        close()
