"""Sweeps over one tensor: the error-vs-bytes Pareto of int-k / SVD / TT, and the study's TT table.

Every point is a cached :func:`sahc_core.whatif.measure.measure_tensor`, so a repeated sweep is a lookup and
the What-if page, the report and the CLI ``sweep`` command share results.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from sahc_core.cache import Cache
from sahc_core.methods.lowrank import SVDConfig
from sahc_core.methods.registry import projected_bytes
from sahc_core.io.source import ModelSource
from sahc_core.methods.quant import QuantConfig
from sahc_core.methods.tt import TTConfig
from sahc_core.whatif.measure import measure_tensor

#: The study's TT sweep (section 4), smallest to largest ranks.
DEFAULT_TT_RANKS: tuple[tuple[int, ...], ...] = (
    (1, 8, 8, 1), (1, 16, 16, 1), (1, 32, 32, 1), (1, 64, 64, 1), (1, 128, 128, 1), (1, 256, 256, 1))
_PARETO_RANK_FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)
_PARETO_GROUPS = (32, 64, 128, None)


def _label(cfg_dict: dict) -> str:
    d = cfg_dict
    g = "row" if d.get("group_size") is None else f"g{d['group_size']}"
    if d["method"] == "int":
        return f"int{d['bits']}-{g}"
    if d["method"] == "svd":
        bits = "fp16" if d.get("bits") is None else f"int{d['bits']}-{g}"
        return f"svd r{d.get('rank', d.get('rank_fraction'))} {bits}"
    if d["method"] == "tt":
        return f"tt {list(d['tt_ranks'])}" + ("" if d.get("bits") is None else f" int{d['bits']}")
    return d["method"]


def pareto_configs(shape: Sequence[int], component: str | None = None) -> list[Any]:
    """The grid :func:`pareto` measures: int bits 2..8 × group sizes, SVD ranks × factor bits, TT ranks.

    Group sizes that do not divide the dimension they group are skipped; TT only for ``component ==
    "embedding"``; TT ranks above what the reshaping allows are skipped.
    """
    m, n = math.prod(shape[:-1]), int(shape[-1])
    cfgs: list[Any] = [QuantConfig(b, g) for b in range(2, 9) for g in _PARETO_GROUPS if g is None or n % g == 0]
    if len(shape) >= 2:
        k = min(m, n)
        ranks = sorted({max(1, round(f * k)) for f in _PARETO_RANK_FRACTIONS})
        g_svd = next((g for g in (128, 64, 32) if m % g == 0 and n % g == 0), None)
        cfgs += [SVDConfig(rank=r, bits=b, group_size=g_svd) for r in ranks for b in (4, 8, None)]
        if component == "embedding":
            cfgs += _valid_tt(shape, DEFAULT_TT_RANKS, None)
    return cfgs


def tt_rank_options(shape: Sequence[int], r1: int | None = None, cap: int = 1024) -> list[int]:
    """Powers of two the 3-core TT layout of ``shape`` allows: for ``r1`` (``r1=None``) or for ``r2``."""
    out = []
    for p in (2**i for i in range(cap.bit_length())):
        try:
            projected_bytes(tuple(shape), TTConfig(ranks=(1, p, 1, 1) if r1 is None else (1, r1, p, 1)))
        except ValueError:
            break
        out.append(p)
    return out


def _valid_tt(shape: Sequence[int], ranks_list: Sequence[Sequence[int]], bits: int | None) -> list[TTConfig]:
    """TT configs of ``ranks_list`` that the reshaping of ``shape`` can hold (the others are skipped)."""
    out = []
    for ranks in ranks_list:
        cfg = TTConfig(ranks=tuple(int(r) for r in ranks), bits=bits)
        try:
            projected_bytes(tuple(shape), cfg)
        except ValueError:
            continue
        out.append(cfg)
    return out


def _frontier(df: pd.DataFrame) -> pd.Series:
    """True for points no other point beats on both bytes (<=) and relative error (<, or = with fewer bytes)."""
    order = df.sort_values(["bytes", "rel_error"]).index
    best, flags = math.inf, pd.Series(False, index=df.index)
    for i in order:
        if df.at[i, "rel_error"] < best:
            flags[i], best = True, df.at[i, "rel_error"]
    return flags


def pareto(source: ModelSource, name: str, cache: Cache | None = None, device: str = "auto",
           progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Relative error and weight cosine against bytes for every method over its parameter grid.

    One row per setting (see :func:`pareto_configs`): ``method``, ``label``, ``config`` (plan JSON
    string), ``bytes``, ``ratio``, ``bits_per_weight``, ``rel_error``, ``weight_cosine``, ``passed``
    (all gates), ``frontier`` (on the error-vs-bytes Pareto front over all methods). Each point is a
    cached :func:`measure_tensor`, so a second call is a lookup. ``progress(done, total)``.
    """
    from sahc_core.io.components import classify

    info = source.info(name)
    comp = classify(name, source.architecture).component.value
    cfgs = pareto_configs(info.shape, comp)
    rows = []
    for i, cfg in enumerate(cfgs):
        m = measure_tensor(source, name, cfg, cache=cache, device=device, log=False)
        rows.append({"method": m["method"], "label": _label(m["config"]), "config": json.dumps(m["config"]),
                     "bytes": m["bytes"], "ratio": m["ratio"], "bits_per_weight": m["bits_per_weight"],
                     "rel_error": m["rel_error"], "weight_cosine": m["weight_cosine"],
                     "passed": all(g["passed"] for g in m["gates"])})
        if progress is not None:
            progress(i + 1, len(cfgs))
    df = pd.DataFrame(rows)
    df["frontier"] = _frontier(df)
    return df


def tt_sweep(source: ModelSource, name: str, ranks_list: Sequence[Sequence[int]] = DEFAULT_TT_RANKS,
             bits: int | None = None, cos_threshold: float = 0.95,
             progress: Callable[[int, int], None] | None = None, cache: Cache | None = None,
             device: str = "auto") -> pd.DataFrame:
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
        cfgs = _valid_tt(shape, ranks_list, bits)
    else:
        cfgs = [TTConfig(ranks=tuple(int(r) for r in ranks), bits=bits) for ranks in ranks_list]
        for cfg in cfgs:
            projected_bytes(shape, cfg)  # validate every rank tuple up front (one clear ValueError)
    rows = []
    for i, cfg in enumerate(cfgs):
        m = measure_tensor(source, name, cfg, cache=cache, device=device)
        rows.append({"tt_ranks": str(list(cfg.ranks)), "tt_shape": json.dumps(m.get("tt_shape")),
                     "bytes": m["bytes"], "ratio": m["ratio"], "bits_per_weight": m["bits_per_weight"],
                     "cosine": m["weight_cosine"], "rel_error": m["rel_error"],
                     "passed": bool(m["weight_cosine"] >= cos_threshold), "seconds": m["seconds"],
                     "cached": m["cached"]})
        if progress is not None:
            progress(i + 1, len(cfgs))
    return pd.DataFrame(rows)
