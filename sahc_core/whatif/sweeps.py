"""Sweeps over one tensor: the error-vs-bytes Pareto of every registered method, and the study's TT table.

Every point is a cached :func:`sahc_core.whatif.measure.measure_tensor`, so a repeated sweep is a
lookup and the What-if page, the report and the CLI ``sweep`` command share results. The settings
swept come from each method's ``candidates`` in the registry; calibration-aware methods join when
calibration statistics are given.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from sahc_core.cache import Cache
from sahc_core.gates import failed_gate_names, gate_info
from sahc_core.io.source import ModelSource
from sahc_core.methods import registry
from sahc_core.methods.tt import STUDY_TT_RANKS, TTConfig, fitting
from sahc_core.whatif.measure import measure_tensor
from sahc_core.workspace import Workspace

#: The study's TT sweep (section 4), smallest to largest ranks (re-exported for callers).
DEFAULT_TT_RANKS = STUDY_TT_RANKS


def pareto_configs(shape: Sequence[int], component: str | None = None, with_calibration: bool = False) -> list[Any]:
    """The grid :func:`pareto` measures: every registered method's ``candidates`` for this shape.

    Methods that cannot take the tensor (its component or number of dimensions) are left out, and
    so are calibration-aware ones unless ``with_calibration``; settings that do not fit the shape
    (a group size that does not divide, a TT rank the reshaping cannot hold) are skipped.
    """
    shape = tuple(int(s) for s in shape)
    out: list[Any] = []
    for spec in registry.methods():
        if spec.candidates is None or not registry.applicable(spec, shape, component):
            continue
        if spec.needs_calibration and not with_calibration:
            continue
        out += [c for c in spec.candidates(shape, component) if registry.incompatibility(shape, component, c) is None]
    return out


def _frontier(df: pd.DataFrame, metric: str = "rel_error") -> pd.Series:
    """True for points no other point beats on both bytes (<=) and ``metric`` (<, or = with fewer bytes)."""
    order = df.sort_values(["bytes", metric]).index
    best, flags = math.inf, pd.Series(False, index=df.index)
    for i in order:
        if df.at[i, metric] < best:
            flags[i], best = True, df.at[i, metric]
    return flags


def pareto(source: ModelSource, name: str, cache: Cache | None = None, device: str = "auto",
           progress: Callable[[int, int], None] | None = None, workspace: Workspace | None = None,
           calib: Any = None) -> pd.DataFrame:
    """Relative error (and output error with ``calib``) against bytes for every method over its grid.

    One row per setting (see :func:`pareto_configs`): ``method``, ``label``, ``config`` (plan JSON
    string), ``bytes``, ``ratio``, ``bits_per_weight``, ``rel_error``, ``weight_cosine``,
    ``output_error`` (NaN without calibration statistics), ``failed_gates`` (names of the gates this
    setting fails, empty when it passes them all), ``weak_only`` (every gate checked is a weak one,
    :func:`sahc_core.gates.gate_info`: a pass then says nothing about quality), ``frontier`` (on the error-vs-bytes Pareto front
    over all methods; ``frontier_output``: the same for the output error). Each point is a cached
    :func:`measure_tensor`. ``progress(done, total)``.
    """
    from sahc_core.io.components import classify

    info = source.info(name)
    comp = classify(name, source.architecture).component.value
    ws = workspace if workspace is not None else Workspace()
    cfgs = pareto_configs(info.shape, comp, with_calibration=calib is not None)
    rows = []
    for i, cfg in enumerate(cfgs):
        m = measure_tensor(source, name, cfg, cache=cache, device=device, workspace=ws, log=False, calib=calib)
        rows.append({"method": m["method"], "label": m.get("label") or registry.label(cfg),
                     "config": json.dumps(m["config"]), "bytes": m["bytes"], "ratio": m["ratio"],
                     "bits_per_weight": m["bits_per_weight"], "rel_error": m["rel_error"],
                     "weight_cosine": m["weight_cosine"], "output_error": m.get("output_error", math.nan),
                     "failed_gates": failed_gate_names(m["gates"]),
                     "weak_only": all(gate_info(g["gate"]).weak for g in m["gates"])})
        if progress is not None:
            progress(i + 1, len(cfgs))
    df = pd.DataFrame(rows)
    df["frontier"] = _frontier(df)
    df["frontier_output"] = _frontier(df, "output_error")
    return df


def tt_sweep(source: ModelSource, name: str, ranks_list: Sequence[Sequence[int]] = DEFAULT_TT_RANKS,
             bits: int | None = None, cos_threshold: float = 0.95,
             progress: Callable[[int, int], None] | None = None, cache: Cache | None = None,
             device: str = "auto", workspace: Workspace | None = None) -> pd.DataFrame:
    """The study's Tensor-Train table for one (embedding-like) tensor.

    Returns
    -------
    DataFrame
        One row per TT rank tuple: ``tt_ranks``, ``tt_shape``, ``bytes``, ``ratio``,
        ``bits_per_weight``, ``cosine`` (mean per-token row cosine), ``rel_error``, ``passed``
        (``cosine >= cos_threshold``), ``seconds``, ``cached``. Given rank tuples the tensor's
        reshaping cannot hold raise ``ValueError`` before anything is computed; from the default
        list they are skipped.
    """
    if not 0 < cos_threshold <= 1:
        raise ValueError(f"cos_threshold must be in (0, 1], got {cos_threshold}.")
    shape = source.info(name).shape
    if ranks_list is DEFAULT_TT_RANKS:  # the study's list, minus ranks this shape cannot hold
        cfgs = fitting(shape, ranks_list, bits)
    else:
        cfgs = [TTConfig(ranks=tuple(int(r) for r in ranks), bits=bits) for ranks in ranks_list]
        for cfg in cfgs:
            registry.projected_bytes(shape, cfg)  # validate every rank tuple up front (one clear ValueError)
    ws = workspace if workspace is not None else Workspace()
    rows = []
    for i, cfg in enumerate(cfgs):
        m = measure_tensor(source, name, cfg, cache=cache, device=device, workspace=ws)
        rows.append({"tt_ranks": str(list(cfg.ranks)), "tt_shape": json.dumps(m.get("tt_shape")),
                     "bytes": m["bytes"], "ratio": m["ratio"], "bits_per_weight": m["bits_per_weight"],
                     "cosine": m["weight_cosine"], "rel_error": m["rel_error"],
                     "passed": bool(m["weight_cosine"] >= cos_threshold), "seconds": m["seconds"],
                     "cached": m["cached"]})
        if progress is not None:
            progress(i + 1, len(cfgs))
    return pd.DataFrame(rows)
