"""Human-readable numbers and tables, one wording for the pages, the report and its HTML export.

:func:`display_table` turns a tidy result frame (snake_case columns, raw bytes, fractions, ``None``,
JSON strings) into the table a reader sees: a header per column with its unit ("Size (MB)",
"Share (%)", "Ratio (×)"), thousands separators, "—" for a missing value, shapes as ``576 × 1536``
and JSON lists/dicts as short text. The kind of a column comes from :data:`HEADERS` when it is
listed there, else from its name (``*_bytes`` -> MB, ``ratio*`` -> ×, ``*share*`` -> %, ``*_pct``
-> %, ``*_s`` -> a duration, ``n_*`` / ``params`` / ``tokens`` -> a count). CSV exports keep the raw
numbers; this module is for reading.
"""
from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

MISSING = "—"

_COMPONENT_LABELS = {"ffn": "FFN", "attention_full": "Full attention", "attention_linear": "Linear attention",
                     "embedding": "Embedding / LM head", "vision": "Vision", "mtp": "MTP",
                     "norm_other": "Norms & other"}


def short_name(name: str) -> str:
    """A tensor name without the common ``model.``/``.weight`` decorations (legends, pickers, captions)."""
    return name.removeprefix("model.").removesuffix(".weight")


def component_label(component: str) -> str:
    """Human label of a component value (``"ffn"`` -> ``"FFN"``); unknown values pass through."""
    return _COMPONENT_LABELS.get(str(component), str(component))

#: column -> (header, kind). Kinds: count, mb (value in MB), bytes, ratio, pct (value in %), frac
#: (0..1 shown as %), signed_pct, ppl, delta, error (4 decimals), duration, bool, passfail, shape,
#: json, time, component (its human label), text, float.
HEADERS: dict[str, tuple[str, str]] = {
    "run_id": ("Run", "text"), "plan_name": ("Plan", "text"), "plan": ("Plan", "text"),
    "status": ("Status", "text"), "stage": ("Stage", "text"), "error": ("Error", "text"),
    "component": ("Component", "component"), "name": ("Tensor", "text"), "tensor": ("Tensor", "text"),
    "kind": ("Kind", "text"), "layer": ("Layer", "count"), "dtype": ("Dtype", "text"), "shape": ("Shape", "shape"),
    "method": ("Method", "text"), "label": ("Setting", "text"), "gate": ("Gate", "text"),
    "params": ("Parameters", "count"), "n_tensors": ("Tensors", "count"), "tokens": ("Tokens scored", "count"),
    "window": ("Window", "count"), "stride": ("Stride", "count"), "corpus": ("Corpus", "text"),
    "protocol": ("Protocol", "text"),
    "ratio": ("Ratio (×)", "ratio"), "ratio_projected": ("Ratio projected (×)", "ratio"),
    "ratio_actual": ("Ratio actual (×)", "ratio"), "ratio_payload": ("Ratio payload (×)", "ratio"),
    "ppl": ("Perplexity", "ppl"), "baseline_ppl": ("Baseline perplexity (same protocol)", "ppl"),
    "delta_ppl": ("Δppl vs own baseline", "delta"), "delta_ppl_pct": ("Δppl vs own baseline (%)", "signed_pct"),
    "gates_passed": ("Gates passed", "count"), "gates_failed": ("Gates failed", "count"),
    "failed_gates": ("Fails gates", "text"), "gates": ("Gates", "text"), "bytes": ("Stored (MB)", "bytes"), "passed": ("Result", "passfail"),
    "value": ("Value", "float"), "threshold": ("Threshold", "float"), "evidence": ("Evidence", "json"),
    "duration_s": ("Duration", "duration"), "elapsed_s": ("Elapsed", "duration"), "seconds": ("Time", "duration"),
    "checkpoint_mb": ("On disk (MB)", "mb"), "started_at": ("Started (UTC)", "time"), "time": ("Time (UTC)", "time"),
    "bits": ("Bits", "count"), "bits_per_weight": ("Bits per weight", "float"),
    "rel_error": ("Relative error", "error"), "max_rel_error": ("Max relative error", "error"),
    "weight_cosine": ("Weight cosine", "error"), "min_weight_cosine": ("Min weight cosine", "error"),
    "cosine": ("Cosine", "error"), "frontier": ("On Pareto front", "bool"), "pareto": ("On Pareto front", "bool"),
    "saves_bytes": ("Truncation saves bytes", "bool"), "cached": ("From cache", "bool"),
    "full_rank": ("Full rank", "count"), "min_rank": ("Min rank", "count"),
    "tt_ranks": ("TT ranks", "json"), "tt_shape": ("TT cores", "json"), "config": ("Setting", "json"),
    "min_rank_pct_median": ("Min rank for 0.1 error, median (% of full rank)", "pct"),
    "min_rank_pct_min": ("Min rank, lowest (% of full rank)", "pct"),
    "min_rank_pct_max": ("Min rank, highest (% of full rank)", "pct"),
    "break_even_pct_median": ("Break-even rank, median (% of full rank)", "pct"),
    "n_saving": ("Tensors where truncation saves bytes", "count"),
    "original_mb": ("Original 16-bit (MB)", "mb"), "compressed_mb": ("Compressed (MB)", "mb"),
    "share_of_compressed_pct": ("Share of compressed bytes (%)", "pct"), "share_pct": ("Share (%)", "pct"),
}

HEADERS.update({
    "rows": ("Rows", "count"), "cols": ("Columns", "count"), "sigma_max": ("σ max", "float"),
    "sigma_min": ("σ min", "float"), "condition_number": ("Condition number σmax / σmin", "float"),
    "frobenius_norm": ("Frobenius norm ‖W‖F", "float"), "stable_rank": ("Stable rank ‖W‖F² / σmax²", "float"),
    "effective_rank": ("Effective rank (entropy)", "float"), "numerical_rank": ("Numerical rank", "count"),
    "mp_variance": ("Entry variance", "float"), "mp_lo": ("MP bulk lower edge", "float"),
    "mp_hi": ("MP bulk upper edge", "float"), "n_above_mp": ("σ above MP bulk", "count"),
    "n_below_mp": ("σ below MP bulk", "count"), "n_outside_mp": ("σ outside MP bulk", "count"),
    "frac_outside_mp": ("Outside MP bulk (%)", "frac"), "note": ("Note", "text"), "device": ("Device", "text"),
    "compute_seconds": ("Compute time", "duration"), "n_runs": ("Runs", "count"), "run_ids": ("Run ids", "text"),
    "n_failed": ("Failed", "count"), "n": ("Decisions", "count"),
})
#: (regex on the column name, header template with the groups, kind) for families of columns.
PATTERNS: tuple[tuple[str, str, str], ...] = (
    (r"sigma_at_(\d+)", "σ at rank {0}", "float"), (r"energy_at_(\d+)", "Energy kept at rank {0} (%)", "frac"),
    (r"min_rank_frac_([\d.]+)", "Min rank for error {0} (% of full rank)", "frac"),
    (r"min_rank_([\d.]+)", "Min rank for error {0}", "count"),
)


def _pattern(col: str) -> tuple[str, str] | None:
    for rx, template, kind in PATTERNS:
        m = re.fullmatch(rx, col)
        if m:
            return template.format(*m.groups()), kind
    return None


_UNIT_HEADERS = {"mb": "MB", "bytes": "MB", "ratio": "×", "pct": "%", "frac": "%", "signed_pct": "%"}


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 tensor"``, ``"3 tensors"``, ``"1,024 tokens"``."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def is_missing(v: Any) -> bool:
    """True for None, NaN, NaT and pandas' NA."""
    if v is None:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def fmt_count(n: Any) -> str:
    """Integer with thousands separators (``28,311,552``)."""
    return MISSING if is_missing(n) else f"{int(round(float(n))):,}"


def fmt_mb(nbytes: Any, digits: int = 1) -> str:
    """Bytes as megabytes (10⁶ bytes) with separators, unit included (``"56.6 MB"``)."""
    return MISSING if is_missing(nbytes) else f"{float(nbytes) / 1e6:,.{digits}f} MB"


def fmt_ratio(x: Any) -> str:
    """Compression ratio with the multiplication sign (``"3.59×"``)."""
    return MISSING if is_missing(x) or not math.isfinite(float(x)) else f"{float(x):,.2f}×"


def fmt_pct(frac: Any, digits: int = 1) -> str:
    """A fraction 0..1 as a percentage (``"21.0 %"``)."""
    return MISSING if is_missing(frac) else f"{100 * float(frac):,.{digits}f} %"


def fmt_duration(seconds: Any) -> str:
    """``"< 1 s"``, ``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    if is_missing(seconds) or not math.isfinite(float(seconds)):
        return MISSING
    if 0 < float(seconds) < 0.5:
        return "< 1 s"
    s = max(0, int(round(float(seconds))))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def fmt_params(n: Any) -> str:
    """A parameter count the way the Model page's metric shows it (``"134.5 M"``, ``"28.3 M"``)."""
    if is_missing(n):
        return MISSING
    n = float(n)
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{int(n):,}"


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or is_missing(v):
        return None
    if isinstance(v, numbers.Number):
        return float(v)
    return None


def _compact(obj: Any) -> str:
    """Short text of a JSON value: flat number lists as ``a × b``, nested lists joined, dicts as k=v."""
    if isinstance(obj, Mapping):
        return ", ".join(f"{k}={_compact(v)}" for k, v in obj.items() if not is_missing(v)) or MISSING
    if isinstance(obj, (list, tuple)):
        if all(isinstance(x, numbers.Number) and not isinstance(x, bool) for x in obj):
            return " × ".join(str(x) if isinstance(x, int) else f"{x:g}" for x in obj) or MISSING
        return "; ".join(_compact(x) for x in obj) or MISSING
    if isinstance(obj, float):
        return f"{obj:.4g}"
    return MISSING if obj is None else str(obj)


def _json(v: Any) -> str:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return v
    return _compact(v)


def column_kind(col: str) -> str:
    """The kind of a column (see :data:`HEADERS`), inferred from its name when it is not listed."""
    if col in HEADERS:
        return HEADERS[col][1]
    if (hit := _pattern(col)) is not None:
        return hit[1]
    c = col.lower()
    rules = (
        (c.endswith("_mb"), "mb"), ("bytes" in c, "bytes"), (c.startswith("ratio") or c.endswith("_ratio"), "ratio"),
        (c.endswith("_pct"), "pct"), ("share" in c or "fraction" in c or c.startswith("break_even"), "frac"),
        (c.endswith("_s") or c.endswith("_seconds"), "duration"),
        (c.startswith("n_") or c in ("matched", "total", "rank") or c.endswith("_rank"), "count"),
        ("error" in c or "cosine" in c, "error"), ("ppl" in c, "ppl"),
    )
    return next((kind for hit, kind in rules if hit), "auto")


def header(col: str) -> str:
    """Human header of a column with its unit (``"checkpoint_mb"`` -> ``"On disk (MB)"``)."""
    if col in HEADERS:
        return HEADERS[col][0]
    if (hit := _pattern(col)) is not None:
        return hit[0]
    kind = column_kind(col)
    words = col
    for suffix in ("_mb", "_bytes", "_pct", "_seconds", "_s"):
        if words.lower().endswith(suffix) and words.lower() != suffix:
            words = words[: -len(suffix)]
            break
    words = words.removeprefix("n_").replace("_", " ").strip()
    words = (words[:1].upper() + words[1:]) if words else col
    words = words.replace("Min rank ", "Min rank for error ").replace(" ppl", " perplexity")
    unit = _UNIT_HEADERS.get(kind)
    return f"{words} ({unit})" if unit else words



#: Column kind -> (format spec, scale): MB columns, bytes shown in MB, ratios, percentages, errors.
_NUMBER_FORMATS = {"mb": (",.1f", 1), "bytes": (",.2f", 1e-6), "ratio": (",.2f", 1), "pct": (",.1f", 1),
                   "frac": (",.1f", 100), "signed_pct": ("+,.1f", 1), "error": (".4f", 1)}
#: Column kind -> (spec below 1e6, spec above).
_BOUNDED_FORMATS = {"ppl": (",.2f", ".3g"), "delta": ("+,.3f", "+.3g")}

def format_value(col: str, v: Any, kind: str | None = None) -> str:
    """One cell as text, by the column's kind (see :func:`column_kind`)."""
    kind = kind or column_kind(col)
    if kind == "json":
        return MISSING if is_missing(v) else _json(v)
    if isinstance(v, (list, tuple, dict)):
        return _compact(v)
    if is_missing(v):
        return MISSING
    if kind in ("bool", "passfail"):
        yes = bool(v)
        return ("pass" if yes else "fail") if kind == "passfail" else ("yes" if yes else "no")
    if kind == "component":
        return component_label(v)
    if kind == "time":
        return pd.Timestamp(v).strftime("%Y-%m-%d %H:%M")
    x = _num(v)
    if x is None:
        return _json(v) if isinstance(v, str) and v[:1] in "[{" else str(v)
    if not math.isfinite(x):
        return "∞" if x > 0 else ("−∞" if x < 0 else "NaN")
    if kind == "count":
        return fmt_count(x)
    if kind in _NUMBER_FORMATS:
        spec, scale = _NUMBER_FORMATS[kind]
        return format(x * scale, spec)
    if kind in _BOUNDED_FORMATS:  # a huge value (a diverged perplexity) in 3 significant digits
        spec, big = _BOUNDED_FORMATS[kind]
        return format(x, spec if abs(x) < 1e6 else big)
    if kind == "duration":
        return fmt_duration(x)
    if float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:,.4g}" if 1e-3 <= abs(x) < 1e6 else f"{x:.3g}"


def display_table(df: pd.DataFrame, columns: Sequence[str] | None = None,
                  headers: Mapping[str, str] | None = None, kinds: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The table as a reader sees it: human headers with units, every cell formatted text.

    Parameters
    ----------
    df : DataFrame
        A tidy result frame.
    columns : sequence of str, optional
        Columns to keep, in this order (default: all; missing ones are skipped).
    headers, kinds : mapping, optional
        Per-column header text or kind overriding :data:`HEADERS` and the name rules.

    Returns
    -------
    DataFrame
        Same rows, string cells, renamed columns (unique: a clash gets the raw name appended).
    """
    cols = [c for c in (columns if columns is not None else df.columns) if c in df.columns]
    out, seen = {}, set()
    for c in cols:
        kind = (kinds or {}).get(c) or column_kind(c)
        h = (headers or {}).get(c) or header(c)
        if h in seen:
            h = f"{h} [{c}]"
        seen.add(h)
        out[h] = [format_value(c, v, kind) for v in df[c].tolist()]
    return pd.DataFrame(out, index=range(len(df)))


def no_raw_cells(df: pd.DataFrame) -> list[str]:
    """Cells a reader should never see (``None``, ``nan``, JSON brackets, snake_case headers); for tests."""
    bad = [f"header {h!r}" for h in df.columns if "_" in str(h)]
    for h in df.columns:
        for v in map(str, df[h].tolist()):
            if v in ("None", "nan", "NaN", "<NA>", "NaT") or v[:1] in "[{":
                bad.append(f"{h}: {v!r}")
    return bad


def join_nonempty(parts: Iterable[str], sep: str = " · ") -> str:
    """Join the non-empty strings of ``parts``."""
    return sep.join(p for p in parts if p)
