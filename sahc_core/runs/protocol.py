"""The perplexity protocol of a run, and baselines per protocol (design.md, "Perplexity").

Two perplexities are comparable only when they were measured the same way: the same test text
(its sha256 fingerprint), the same number of scored tokens, window, stride and dtype. A run's
result records that ``protocol`` (see :func:`sahc_core.runs.pipeline.execute_run`), and its
``baseline_ppl`` was measured by the same code path under exactly that protocol. A comparison of
several runs therefore has one baseline per protocol (:func:`baselines`), and Δppl is always
relative to the run's own baseline, never to another protocol's.

Runs stored before the corpus fingerprint was recorded fall back to the corpus name plus its files.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

#: Columns :func:`protocol_columns` adds to a runs table.
PROTOCOL_COLUMNS = ("protocol", "protocol_key", "corpus", "corpus_fp", "tokens", "window", "stride", "dtype")


def text_fingerprint(text: str) -> str:
    """sha256 hex digest of a test text (the corpus fingerprint a protocol records)."""
    return hashlib.sha256(text.encode()).hexdigest()


def _int(v: Any) -> int | None:
    try:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
    except (TypeError, ValueError):
        return None


def protocol_of(result: Mapping | None) -> dict:
    """The comparable part of a run's protocol: corpus, corpus_fp, tokens, window, stride, dtype.

    Every value is None for a run without a result (queued, running, failed before perplexity).
    """
    p = dict((result or {}).get("protocol") or {})
    fp = p.get("text_sha256")
    if not fp and p.get("text_files"):
        fp = "files:" + ",".join(map(str, p["text_files"]))
    return {"corpus": p.get("text"), "corpus_fp": fp, "tokens": _int(p.get("tokens")),
            "window": _int(p.get("window")), "stride": _int(p.get("stride")), "dtype": p.get("dtype")}


def protocol_key(p: Mapping) -> str | None:
    """Identity of a protocol (None when the run has none): equal keys = comparable perplexities."""
    if p.get("tokens") is None:
        return None
    return "|".join(str(p.get(k)) for k in ("corpus", "corpus_fp", "tokens", "window", "stride", "dtype"))


def protocol_label(p: Mapping) -> str | None:
    """Short human text, e.g. ``"shakespeare #3f2a9c · 64,021 tokens · window 2048 · stride 2048 · float32"``."""
    if p.get("tokens") is None:
        return None
    fp = str(p.get("corpus_fp") or "")
    tag = "" if not fp else (f" #{fp[:6]}" if not fp.startswith("files:") else "")
    window, stride = p.get("window"), p.get("stride")
    parts = [f"{p.get('corpus') or 'corpus'}{tag}", f"{int(p['tokens']):,} tokens",
             f"window {window}" if window is not None else "",
             f"stride {stride}" if stride is not None and stride != window else ("non-overlapping" if stride else ""),
             str(p.get("dtype") or "")]
    return " · ".join(x for x in parts if x)


def protocol_columns(result: Mapping | None) -> dict:
    """The :data:`PROTOCOL_COLUMNS` values of one run (what :func:`jobs.list_runs` adds per row)."""
    p = protocol_of(result)
    return {"protocol": protocol_label(p), "protocol_key": protocol_key(p), **p}


def baselines(runs: pd.DataFrame) -> pd.DataFrame:
    """One baseline per protocol among ``runs`` (rows with a protocol and a finite baseline).

    Parameters
    ----------
    runs : DataFrame
        A runs table with the :data:`PROTOCOL_COLUMNS`, ``run_id`` and ``baseline_ppl``.

    Returns
    -------
    DataFrame
        ``protocol_key``, ``protocol``, ``tokens``, ``baseline_ppl``, ``n_runs``, ``run_ids`` (comma
        separated), ``consistent`` (every run of that protocol recorded the same baseline, to 1e-9
        relative), in order of first appearance.
    """
    cols = ["protocol_key", "protocol", "tokens", "baseline_ppl", "n_runs", "run_ids", "consistent"]
    if runs.empty or "protocol_key" not in runs:
        return pd.DataFrame(columns=cols)
    base = pd.to_numeric(runs["baseline_ppl"], errors="coerce")
    ok = runs[runs["protocol_key"].notna() & base.notna()].assign(_b=base)
    rows = []
    for key, g in ok.groupby("protocol_key", sort=False):
        b = g["_b"].to_numpy(dtype=float)
        rows.append({"protocol_key": key, "protocol": g["protocol"].iloc[0], "tokens": g["tokens"].iloc[0],
                     "baseline_ppl": float(b[0]), "n_runs": len(g), "run_ids": ", ".join(map(str, g["run_id"])),
                     "consistent": bool(abs(b.max() - b.min()) <= 1e-9 * max(1.0, abs(b[0])))})
    return pd.DataFrame(rows, columns=cols)


def mixed_protocols(runs: pd.DataFrame) -> bool:
    """True when the runs with a protocol were measured under more than one."""
    return "protocol_key" in runs and runs["protocol_key"].dropna().nunique() > 1


def mixed_warning(runs: pd.DataFrame) -> str | None:
    """One sentence when ``runs`` mix protocols (their perplexities are not comparable), else None."""
    b = baselines(runs)
    if len(b) < 2:
        return None
    listed = "; ".join(f"{r.protocol}: baseline {r.baseline_ppl:.2f}" for r in b.itertuples())
    return (f"These runs use {len(b)} different perplexity protocols ({listed}); compare each run only with "
            "the baseline of its own protocol (Δppl does), not with another protocol's perplexities.")
