"""The report: the story of one model in five figures, each with a caption computed from the data.

Order (design.md, job 3): where the parameters live -> the spectrum verdict per component -> the
per-tensor Pareto of int-k vs SVD vs TT -> the byte budget with the embedding wall -> the runs.
Everything comes from the cache where it is already there (scan, measurements, runs); what is
missing is computed through the same library calls the pages and the CLI use.

Break-even rank (used by the spectrum verdict). A rank-r factorization of an ``m x n`` matrix stores
``r (m + n)`` values against ``m n`` for the dense matrix, at the same bits per value; it saves bytes
only when ``r < m n / (m + n)``, i.e. when ``r / min(m, n) < max(m, n) / (m + n)`` (50 % for a
square matrix). When the minimum rank for 10 % error is above that, truncation cannot save bytes at
that error, whatever the factors are quantized to (the dense matrix can be quantized the same way).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from sahc_core.figures import report as fr
from sahc_core.figures.format import plural

#: Error level of the verdict (the study's "min rank for error < 0.10").
ERROR_TARGET = 0.10
#: Total ratio the budget section aims at (the study's 5x target).
TARGET_RATIO = 5.0
#: Plan used for the budget when no run or saved plan exists: int4 per group, row-wise where
#: the group does not divide the row.
DEFAULT_PLAN = {"name": "int4-g64 (report default)",
                "default": {"method": "int", "bits": 4, "group_size": 64, "scheme": "asym"},
                "fallback": {"method": "int", "bits": 4, "group_size": None, "scheme": "asym"}}

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ReportSection:
    """One step of the story: a figure, a one-line caption computed from the data, its table."""

    key: str
    title: str
    caption: str
    figures: tuple[Any, ...] = ()      # plotly Figures, shown in order
    table: pd.DataFrame | None = None
    notes: tuple[str, ...] = ()
    error: str | None = None           # one sentence when the section could not be computed
    warnings: tuple[str, ...] = ()     # shown as warnings: runs that mix protocols, tensors left out (NaN / Inf)


@dataclass(frozen=True)
class Report:
    """The whole report of one model (see :func:`build_report`)."""

    title: str
    subtitle: str
    model: str
    fingerprint: str
    sections: tuple[ReportSection, ...] = field(default_factory=tuple)

    def section(self, key: str) -> ReportSection:
        """The section with ``key`` (KeyError when absent)."""
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(key)


# -- pure numbers and captions --------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.0f} %" if x >= 0.01 else f"{100 * x:.1f} %"


def matrix_dims(shape: Sequence[int]) -> tuple[int, int]:
    """``(m, n)`` of the 2-D view the spectrum uses: first dimension by the product of the rest."""
    return int(shape[0]), int(math.prod(int(s) for s in shape[1:]))


def break_even_fraction(m: int, n: int) -> float:
    """Largest rank fraction ``r / min(m, n)`` at which ``r (m + n) < m n`` (see module docstring)."""
    return (m * n / (m + n)) / min(m, n)


def caption_shares(shares: pd.DataFrame) -> str:
    """E.g. "FFN holds 64 % of the parameters; the embedding / LM head 28 %"."""
    s = shares.sort_values("share", ascending=False)
    top = s.iloc[0]
    text = f"{fr.label(top['component'])} holds {_pct(top['share'])} of the {int(s['params'].sum()):,} parameters"
    emb = s[s["component"] == "embedding"]
    if len(emb) and top["component"] != "embedding":
        text += f"; the embedding / LM head {_pct(float(emb['share'].iloc[0]))}, a share int-k alone must carry"
    return text + "."


def spectrum_verdict(scan: pd.DataFrame, eps: float = ERROR_TARGET) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per tensor and per component: min rank for ``eps`` as a fraction of full rank vs break-even.

    Parameters
    ----------
    scan : DataFrame
        ``spectra.scan.scan`` rows merged with the tensor table: name, component, kind, layer, shape and
        ``min_rank_{eps}``; rows with an ``error`` (no spectrum) are left out.

    Returns
    -------
    (per_tensor, per_component)
        per_tensor adds full_rank, min_rank, rank_fraction, break_even, saves_bytes.
        per_component: component, n_tensors, median / min / max rank_fraction, median break_even,
        n_saving (tensors where truncation saves bytes), params.
    """
    col = f"min_rank_{eps:g}"
    if col not in scan:
        raise ValueError(f"the scan table has no {col!r} column; rescan with the current spectrum module.")
    df = scan[scan["error"].isna()].copy() if "error" in scan else scan.copy()  # tensors without a spectrum: out
    if df.empty:
        raise ValueError("no tensor of this model has a spectrum (see the scan's error column for why).")
    if {"rows", "cols"} <= set(df.columns):  # the matrix view the spectrum used (conv1d reshaped)
        dims = pd.Series(list(zip(df["rows"].astype(int), df["cols"].astype(int))), index=df.index)
    else:
        dims = df["shape"].map(matrix_dims)
    df["full_rank"] = dims.map(min)
    df["min_rank"] = df[col].astype(int)
    df["rank_fraction"] = df["min_rank"] / df["full_rank"]
    df["break_even"] = dims.map(lambda d: break_even_fraction(*d))
    df["saves_bytes"] = df["rank_fraction"] < df["break_even"]
    df["params"] = dims.map(lambda d: d[0] * d[1])
    g = df.groupby("component", sort=False)
    comp = pd.DataFrame({
        "n_tensors": g.size(), "params": g["params"].sum(),
        "rank_fraction_median": g["rank_fraction"].median(), "rank_fraction_min": g["rank_fraction"].min(),
        "rank_fraction_max": g["rank_fraction"].max(), "break_even_median": g["break_even"].median(),
        "n_saving": g["saves_bytes"].sum().astype(int),
    }).reset_index().sort_values("params", ascending=False, ignore_index=True)
    keep = ["name", "component", "kind", "layer", "shape", "full_rank", "min_rank", "rank_fraction", "break_even",
            "saves_bytes"]
    return df[[c for c in keep if c in df]], comp


def component_sentence(row: pd.Series, eps: float = ERROR_TARGET) -> str:
    """One component's verdict, e.g. "FFN needs 93 % of full rank for 10 % error: ... cannot save bytes here"."""
    need, be = float(row["rank_fraction_median"]), float(row["break_even_median"])
    head = f"{fr.label(row['component'])} needs {_pct(need)} of full rank for {_pct(eps)} error"
    n, k = int(row["n_tensors"]), int(row["n_saving"])
    if k == 0:
        return f"{head} (break-even {_pct(be)}): low-rank truncation cannot save bytes here."
    if k == n:
        where = "its only tensor" if n == 1 else f"all {plural(n, 'tensor')}"
        return f"{head} (break-even {_pct(be)}): low-rank truncation saves bytes on {where}."
    return f"{head} (break-even {_pct(be)}): truncation saves bytes on only {k:,} of {plural(n, 'tensor')}."


def caption_pareto(points: pd.DataFrame, tensor: str) -> str:
    """Which method gives the most ratio at the error of int4 on ``tensor``."""
    ref = points[(points["method"] == "int") & (points["bits"] == 4)].sort_values("ratio", ascending=False)
    if ref.empty:
        best = points.loc[points["ratio"].idxmax()]
        return f"On {tensor}, the highest ratio is {best['ratio']:.1f}× ({best['label']}, error {best['rel_error']:.3f})."
    r = ref.iloc[0]
    err = float(r["rel_error"])
    others = points[(points["method"] != "int") & (points["rel_error"] <= err * 1.0001)]
    base = f"On {tensor}, {r['label']} gives {r['ratio']:.2f}× at error {err:.3f}"
    if others.empty:
        worse = points[points["method"] != "int"]
        if worse.empty:
            return base + "."
        closest = worse.loc[worse["rel_error"].idxmin()]
        return (f"{base}; no SVD/TT setting reaches that error (best {closest['label']}: error "
                f"{closest['rel_error']:.3f} at {closest['ratio']:.2f}×): int-k dominates.")
    best = others.loc[others["ratio"].idxmax()]
    verdict = "beats" if best["ratio"] > r["ratio"] else "does not beat"  # at equal or lower error
    return (f"{base}; the best {best['method'].upper()} at that error or less ({best['label']}) gives "
            f"{best['ratio']:.2f}×, so it {verdict} int4.")


def caption_budget(project: dict, wall: dict) -> str:
    """Total projected ratio, the component that holds most compressed bytes, and the wall."""
    comps = sorted(project["components"], key=lambda c: -c["bytes"])
    big = comps[0]
    return (f"Plan {project['plan']!r} projects {project['ratio_projected']:.2f}×; "
            f"{fr.label(big['component'])} keeps {_pct(big['bytes'] / project['bytes_projected'])} of the bytes. "
            f"{wall['message']}")


def caption_runs(runs: pd.DataFrame) -> str:
    """Best finished run that passed every gate (highest actual ratio, finite perplexity) vs ITS baseline.

    A run with a failed gate is never "best", however high its ratio; the caption counts those runs.
    The baseline quoted is the run's own (same perplexity protocol); when the runs mix protocols the
    caption says so (their perplexities are not comparable across protocols).
    """
    from sahc_core.runs.protocol import baselines

    done = runs[runs["status"] == "done"] if "status" in runs else runs
    done = done[pd.to_numeric(done["ppl"], errors="coerce").map(math.isfinite)]
    if done.empty:
        return "No finished run with a finite perplexity yet: launch one on the Runs page."
    failed = pd.to_numeric(done["gates_failed"], errors="coerce").fillna(0) > 0 if "gates_failed" in done \
        else pd.Series(False, index=done.index)
    tail = f"; {plural(len(done), 'finished run')} in total, {int(failed.sum())} with failed gates."
    n_protocols = len(baselines(done)) if "protocol_key" in done else 1
    if n_protocols > 1:
        tail += f" The runs use {n_protocols} perplexity protocols: each is compared with its own baseline."
    ok = done[~failed]
    if ok.empty:
        return "Every finished run failed a quality gate" + tail
    best = ok.loc[ok["ratio"].idxmax()]
    text = f"Best run passing every gate {best['plan_name']!r}: {best['ratio']:.2f}× at perplexity {best['ppl']:,.2f}"
    base = float(best["baseline_ppl"]) if pd.notna(best["baseline_ppl"]) else math.nan
    if math.isfinite(base) and base > 0:
        text += f" (its baseline {base:.2f}, {100 * (best['ppl'] / base - 1):+,.0f} %)"
    return text + tail


# -- data gathering (library calls; cached underneath) ----------------------------------------------
#: Columns of :func:`runs_table` (the report's runs section).
RUNS_COLUMNS = ["run_id", "plan_name", "status", "ratio", "ratio_projected", "ratio_actual", "ppl", "baseline_ppl",
                "delta_ppl", "delta_ppl_pct", "protocol", "protocol_key", "tokens", "window", "stride", "dtype",
                "gates_passed", "gates_failed", "started_at"]


def runs_table(cache, model_fp: str | None = None) -> pd.DataFrame:
    """One row per run of the model (:data:`RUNS_COLUMNS`): ratio (actual, else projected), perplexity,
    the baseline of the run's own protocol, Δppl against it, and the protocol itself."""
    from sahc_core.runs.jobs import list_runs

    if cache is None:
        return pd.DataFrame(columns=RUNS_COLUMNS)
    df = list_runs(cache)
    if model_fp is not None:
        df = df[df["model_fp"] == model_fp]
    ratio = df["ratio_actual"].where(df["ratio_actual"].notna(), df["ratio_projected"])
    return df.assign(ratio=ratio)[RUNS_COLUMNS].reset_index(drop=True)


def report_plan(cache, runs: pd.DataFrame):
    """The plan the budget section shows: the latest finished run's, else the newest saved, else int4."""
    from sahc_core.plans.plan import CompressionPlan

    if cache is not None and not runs.empty:
        done = runs[runs["status"] == "done"]
        if not done.empty:
            rid = done.sort_values("started_at").iloc[-1]["run_id"]
            rows = cache.execute("SELECT plan FROM runs WHERE run_id = ?", [rid])
            if rows and rows[0][0]:
                import json

                return CompressionPlan.from_dict(json.loads(rows[0][0]))
    if cache is not None:
        saved = cache.plans()
        if saved:
            return CompressionPlan.from_dict(next(iter(saved.values())))
    return CompressionPlan.from_dict(DEFAULT_PLAN)


def middle_tensor(table: pd.DataFrame, kind: str = "gate_proj", component: str = "ffn") -> str | None:
    """Name of the ``kind`` tensor of the middle decoder layer (the study's "FFN layer 15")."""
    rows = table[(table["component"] == component) & (table["kind"] == kind) & table["layer"].notna()]
    if rows.empty:
        return None
    layers = sorted(int(x) for x in rows["layer"].unique())
    mid = layers[(len(layers) - 1) // 2] if len(layers) % 2 else layers[len(layers) // 2]
    return str(rows[rows["layer"] == mid]["name"].iloc[0])


def pareto_points(source, name: str, cache=None, device: str = "auto",
                  progress: Progress | None = None) -> pd.DataFrame:
    """``sweeps.pareto`` on tensor ``name`` (cached measurements shared with the What-if page).

    Adds ``bits`` (from the config) and ``pareto`` (= ``frontier``: no other setting has fewer or
    equal bytes at a lower error).
    """
    import json

    from sahc_core.whatif.sweeps import pareto

    def prog(done, total, *_):
        if progress:
            progress(done, total, f"Pareto grid of {name}")
    df = pareto(source, name, cache=cache, device=device, progress=prog)
    return df.assign(bits=df["config"].map(lambda c: json.loads(c).get("bits")), pareto=df["frontier"])


def pareto_mask(ratio, error) -> list[bool]:
    """True for points no other point dominates (ratio >= and error <=, one strictly)."""
    out = []
    for i in range(len(ratio)):
        dominated = any((ratio[j] >= ratio[i] and error[j] <= error[i]) and (ratio[j] > ratio[i] or error[j] < error[i])
                        for j in range(len(ratio)) if j != i)
        out.append(not dominated)
    return out
