"""Reproduce the reference study's tables (shared/reference/sahc-qwen35-9b-study.md) for any model.

Tables, in the study's order and form:

1. architecture breakdown (component, % of parameters);
2. singular values of the middle FFN layer's ``gate_proj``: σ₁, σ₅₁₂, σ₁₀₂₄, σ₂₀₄₈, σₘᵢₙ, each also
   as % of σ₁. The study's matrix has full rank 4096; on another model the index keeps the same
   *fraction* of full rank (σ₅₁₂ -> index round(512/4096 · k)), and the table says which index it used;
3. minimum rank for SVD error < 0.10 for gate / up / down of that layer (% of full rank);
4. SVD at rank 512 of 4096 (the same fraction, 1/8, of each tensor's full rank) with int4 factors,
   averaged over every FFN tensor: ratio, mean truncation error, mean total error, the EYM error of the
   kept rank, and how many tensors and layers end worse than zeros (error ≥ 1.0); direct row-wise int4
   alongside for contrast;
5. the Tensor-Train sweep of the embedding with the cosine gate (≥ 0.95);
6. the final per-component table with total ratio and perplexity of the latest finished run of this
   model in the cache, or "no run yet".

:func:`study_figures` gives the headline numbers (parameter shares, the FFN min-rank range, σ₁/σ_min)
that ``python -m sahc_core report --study --json`` prints and README quotes. A tensor whose spectrum
or error is undefined (NaN / Inf / no elements) is named in the notes and left out; the rest goes on.

Everything goes through the cached library calls (``spectrum.tensor_spectrum``,
``whatif.measure_tensor``, ``sweeps.tt_sweep``), so a second call reads the cache; missing values are
computed with ``progress(done, total, what)`` updates.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from sahc_core.errors import NumericalError
from sahc_core.io.components import embedding_tensor
from sahc_core.report.build import middle_tensor

STUDY_FULL_RANK = 4096          # full rank of the study's gate_proj [12288, 4096]
SIGMA_INDICES = (1, 512, 1024, 2048)
SVD_RANK_FRACTION = 512 / 4096  # the study's SVD-r512
COS_THRESHOLD = 0.95
ERROR_TARGET = 0.10
_SUB = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class StudyTables:
    """The study's tables for one model: title -> DataFrame, and one note per title."""

    model: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # the headline numbers, :func:`study_figures`


def scaled_index(study_index: int, full_rank: int, study_rank: int = STUDY_FULL_RANK) -> int:
    """1-based index at the same fraction of full rank as ``study_index`` of ``study_rank``."""
    if full_rank == study_rank:
        return study_index
    return min(full_rank, max(1, round(study_index / study_rank * full_rank)))


def architecture_table(table: pd.DataFrame) -> pd.DataFrame:
    """Component, % of params, params, tensors (tied weights counted once)."""
    from sahc_core.io.components import component_shares
    from sahc_core.figures.report import label

    s = component_shares(table)
    return pd.DataFrame({"Component": s["component"].map(label), "% of Params": (100 * s["share"]).round(1),
                         "Params": s["params"].astype(int), "Tensors": s["n_tensors"].astype(int)})


def sigma_table(s, shape) -> pd.DataFrame:
    """σ₁, σ₅₁₂, σ₁₀₂₄, σ₂₀₄₈, σₘᵢₙ of descending singular values ``s`` (indices scaled, see module)."""
    k = len(s)
    rows = []
    for i in SIGMA_INDICES:
        j = scaled_index(i, k)
        rows.append({"σ": f"σ{str(i).translate(_SUB)}", "index here": j, "value": float(s[j - 1]),
                     "% of σ₁": 100 * float(s[j - 1]) / float(s[0])})
    rows.append({"σ": "σₘᵢₙ", "index here": k, "value": float(s[-1]), "% of σ₁": 100 * float(s[-1]) / float(s[0])})
    return pd.DataFrame(rows).round(4)


def summarize_svd(rows: pd.DataFrame) -> pd.DataFrame:
    """Aggregate per-tensor SVD+int4 / int4 measurements into the study's summary (metric per column).

    ``rows``: one row per FFN tensor with layer, svd_ratio, svd_bytes, orig_bytes, trunc_error,
    total_error, eym_error, int4_bytes, int4_error; with calibration statistics also the whitened SVD
    and GPTQ columns (``wsvd_*``, ``gptq4_*``) and the output errors, which add two columns and two rows.
    """
    worse = rows["total_error"] >= 1.0
    layers = rows["layer"].nunique()
    bad_layers = rows.loc[worse, "layer"].nunique()
    int_worse = rows["int4_error"] >= 1.0
    base = _summary_rows(rows, worse, int_worse, layers, bad_layers)
    if "wsvd_error" not in rows:
        return base
    w_worse, g_worse = rows["wsvd_error"] >= 1.0, rows["gptq4_error"] >= 1.0
    twin = pd.DataFrame([
        {"whitened SVD + int4": rows["orig_bytes"].sum() / rows["wsvd_bytes"].sum(),
         "GPTQ int4": rows["orig_bytes"].sum() / rows["gptq4_bytes"].sum()},
        {"whitened SVD + int4": None, "GPTQ int4": 0.0},
        {"whitened SVD + int4": None, "GPTQ int4": 0.0},
        {"whitened SVD + int4": rows["wsvd_error"].mean(), "GPTQ int4": rows["gptq4_error"].mean()},
        {"whitened SVD + int4": f"{int(w_worse.sum())} of {len(rows)}", "GPTQ int4": f"{int(g_worse.sum())} of {len(rows)}"},
        {"whitened SVD + int4": f"{rows.loc[w_worse, 'layer'].nunique()} of {layers}",
         "GPTQ int4": f"{rows.loc[g_worse, 'layer'].nunique()} of {layers}"},
    ])
    out = pd.concat([base, twin], axis=1)
    extra = pd.DataFrame([
        {"metric": "mean output error (held-out calibration tokens)", "SVD + int4": rows["svd_output_error"].mean(),
         "direct int4": rows["int4_output_error"].mean(), "whitened SVD + int4": rows["wsvd_output_error"].mean(),
         "GPTQ int4": rows["gptq4_output_error"].mean()},
        {"metric": "tensors where the calibration-aware twin has the lower output error", "SVD + int4": "",
         "direct int4": "", "whitened SVD + int4": f"{int((rows['wsvd_output_error'] < rows['svd_output_error']).sum())} "
                                                     f"of {len(rows)} (vs SVD)",
         "GPTQ int4": f"{int((rows['gptq4_output_error'] < rows['int4_output_error']).sum())} of {len(rows)} (vs int4)"},
    ])
    return pd.concat([out, extra], ignore_index=True)


def _summary_rows(rows, worse, int_worse, layers, bad_layers) -> pd.DataFrame:
    return pd.DataFrame([
        {"metric": "compression ratio (projected)", "SVD + int4": rows["orig_bytes"].sum() / rows["svd_bytes"].sum(),
         "direct int4": rows["orig_bytes"].sum() / rows["int4_bytes"].sum()},
        {"metric": "mean SVD (truncation) error", "SVD + int4": rows["trunc_error"].mean(), "direct int4": 0.0},
        {"metric": "EYM error of the kept rank (mean)", "SVD + int4": rows["eym_error"].mean(), "direct int4": 0.0},
        {"metric": "mean total error", "SVD + int4": rows["total_error"].mean(), "direct int4": rows["int4_error"].mean()},
        {"metric": "tensors worse than zeros (error ≥ 1.0)", "SVD + int4": f"{int(worse.sum())} of {len(rows)}",
         "direct int4": f"{int(int_worse.sum())} of {len(rows)}"},
        {"metric": "layers with a tensor worse than zeros", "SVD + int4": f"{bad_layers} of {layers}",
         "direct int4": f"{rows.loc[int_worse, 'layer'].nunique()} of {layers}"},
    ])


def _svd_rows(source, table, cache, device, progress, skipped: list[str], calib=None) -> pd.DataFrame:
    """Per FFN tensor: SVD + int4 factors and direct int4 (the study's pair), and with calibration
    statistics also their calibration-aware twins at the same bytes (whitened SVD, GPTQ) and every
    setting's output error on held-out calibration tokens. A tensor that cannot be measured (NaN /
    Inf / empty) goes to ``skipped`` with its reason."""
    from sahc_core.methods.gptq import GPTQConfig
    from sahc_core.methods.lowrank import SVDConfig
    from sahc_core.methods.quant import QuantConfig
    from sahc_core.methods.wsvd import WSVDConfig
    from sahc_core.whatif.measure import measure_tensor
    from sahc_core.workspace import Workspace

    ffn = table[(table["component"] == "ffn") & table["shape"].map(len).eq(2)]
    svd_cfg = SVDConfig(rank_fraction=SVD_RANK_FRACTION, bits=4, group_size=None)
    int_cfg = QuantConfig(bits=4, group_size=None)
    twins = {"wsvd": WSVDConfig(rank_fraction=SVD_RANK_FRACTION, bits=4, group_size=None),
             "gptq4": GPTQConfig(bits=4, group_size=None)}
    ws, rows = Workspace(), []
    for i, rec in enumerate(ffn.itertuples()):
        if progress:
            progress(i, len(ffn), f"SVD + int4 on {rec.name}")
        try:
            sv = measure_tensor(source, rec.name, svd_cfg, cache=cache, device=device, workspace=ws, calib=calib)
            iq = measure_tensor(source, rec.name, int_cfg, cache=cache, device=device, workspace=ws, calib=calib)
        except NumericalError as exc:
            skipped.append(str(exc))
            continue
        row = {"tensor": rec.name, "layer": rec.layer, "kind": rec.kind, "rank": sv.get("rank"),
               "orig_bytes": 2 * math.prod(rec.shape), "svd_bytes": sv["bytes"], "svd_ratio": sv["ratio"],
               "trunc_error": sv["trunc_error"], "eym_error": sv["eym_error"], "total_error": sv["rel_error"],
               "int4_bytes": iq["bytes"], "int4_error": iq["rel_error"]}
        if calib is not None:
            row.update(svd_output_error=sv.get("output_error"), int4_output_error=iq.get("output_error"))
            for tag, cfg in twins.items():
                m = measure_tensor(source, rec.name, cfg, cache=cache, device=device, workspace=ws, calib=calib)
                row.update({f"{tag}_bytes": m["bytes"], f"{tag}_error": m["rel_error"],
                            f"{tag}_output_error": m.get("output_error")})
        rows.append(row)
    if progress:
        progress(len(ffn), len(ffn), "SVD + int4 done")
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=[
        "tensor", "layer", "kind", "rank", "orig_bytes", "svd_bytes", "svd_ratio", "trunc_error", "eym_error",
        "total_error", "int4_bytes", "int4_error"])


def tt_table(sweep: pd.DataFrame, threshold: float = COS_THRESHOLD) -> pd.DataFrame:
    """The study's TT table from a ``sweeps.tt_sweep`` frame (needs tt_ranks, ratio, weight cosine)."""
    ranks = sweep["tt_ranks"] if "tt_ranks" in sweep else sweep["ranks"]
    cos = sweep["weight_cosine"] if "weight_cosine" in sweep else sweep["cosine"]
    # tt_sweep gives "[1, 8, 8, 1]" strings; tuples/lists come from other callers
    return pd.DataFrame({"TT Config": ranks.map(lambda r: r if isinstance(r, str) else str([int(x) for x in r])),
                         "Comp. Ratio": sweep["ratio"].astype(float).round(2), "Cosine": cos.astype(float).round(3),
                         f"Quality Gate (cos ≥ {threshold:g})": cos.map(lambda c: "✅ PASS" if c >= threshold else "❌ FAIL")})


def final_table(source, cache, table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Per-component method and ratio of the latest finished run of this model, and a ppl line."""
    from sahc_core.figures.report import label
    from sahc_core.plans.plan import CompressionPlan, project
    from sahc_core.report.build import runs_table

    runs = runs_table(cache, source.fingerprint) if cache is not None else pd.DataFrame()
    done = runs[runs["status"] == "done"] if len(runs) else runs
    if done.empty:
        return pd.DataFrame([{"Component": "—", "Final Method": "no run yet", "Compression": None}]), \
            "No finished run of this model in the cache yet: launch one on the Runs page (or `python -m sahc_core run`)."
    last = done.sort_values("started_at").iloc[-1]
    plan_json = cache.execute("SELECT plan FROM runs WHERE run_id = ?", [last["run_id"]])[0][0]
    proj = project(CompressionPlan.from_dict(json.loads(plan_json)), source)
    shares = {r["component"]: r["share"] for r in architecture_share_rows(table)}
    methods = proj["tensors"].groupby("component")["method"].agg(lambda m: ", ".join(sorted(set(m) - {"tied"})))
    rows = [{"Component": f"{label(c['component'])} ({100 * shares.get(c['component'], 0):.1f}%)",
             "Final Method": methods.get(c["component"], ""), "Compression": round(c["ratio"], 2)}
            for c in proj["components"]]
    ratio = last["ratio_actual"] if last["ratio_actual"] is not None else proj["ratio_projected"]
    rows.append({"Component": "Total", "Final Method": f"run {last['run_id']}", "Compression": round(float(ratio), 2)})
    ppl, base = last["ppl"], last["baseline_ppl"]
    note = f"Perplexity: {float(ppl):.2f}" if ppl is not None else "Perplexity: not measured"
    if ppl is not None and base is not None and float(base) > 0:
        note += f" (baseline {float(base):.2f}, {100 * (float(ppl) / float(base) - 1):+.0f}%)"
    failed = last.get("gates_failed")
    gates = f", {int(failed)} quality gate(s) failed" if failed is not None and pd.notna(failed) and failed else ""
    return pd.DataFrame(rows), note + f"; plan {last['plan_name']!r}, run {last['run_id']}{gates}."


def architecture_share_rows(table: pd.DataFrame) -> list[dict]:
    from sahc_core.io.components import component_shares

    return component_shares(table).to_dict(orient="records")


def _range(values: pd.Series) -> dict:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {"n": int(v.size), "min": float(v.min()), "median": float(v.median()), "max": float(v.max())}


def study_figures(source, cache=None, device: str = "auto") -> dict:
    """The headline numbers README quotes, from one (cached, resumable) spectrum scan.

    Returns
    -------
    dict
        ``total_params``; ``component_share`` (component -> share of parameters);
        ``ffn_min_rank_frac_0.1`` and ``ffn_sigma_ratio`` (σ₁/σ_min): ``{n, min, median, max}`` over
        the FFN matrices; ``tensors_without_spectrum``: the reason for each left out (NaN / Inf / empty).
    """
    from sahc_core.io.components import component_shares, tensor_table
    from sahc_core.spectra.scan import failed, scan

    table = tensor_table(source)
    shares = component_shares(table)
    out: dict = {"total_params": int(table["params"].sum()),
                 "component_share": {r.component: float(r.share) for r in shares.itertuples()}}
    if not (table["component"] == "ffn").any():
        return {**out, "ffn_min_rank_frac_0.1": _range(pd.Series(dtype=float)),
                "ffn_sigma_ratio": _range(pd.Series(dtype=float)), "tensors_without_spectrum": []}
    df = scan(source, component="ffn", cache=cache, device=device)
    ok = df[df["error"].isna()] if "error" in df else df
    ratio = ok["sigma_max"] / ok["sigma_min"].where(ok["sigma_min"] > 0)
    return {**out, "ffn_min_rank_frac_0.1": _range(ok["min_rank_frac_0.1"]), "ffn_sigma_ratio": _range(ratio),
            "tensors_without_spectrum": failed(df)["error"].tolist()}



def _or_skip(skipped: list[str], fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or ``None`` with the reason appended to ``skipped`` when the tensor has
    NaN / Inf values or no elements (the study names it and goes on with the rest)."""
    try:
        return fn(*args, **kwargs)
    except NumericalError as exc:
        skipped.append(str(exc))
        return None

def reproduce_study(source, cache=None, device: str = "auto", progress: Progress | None = None,
                    with_tt: bool = True, calib=None) -> StudyTables:
    """Compute (or read from the cache) the study's tables for ``source``; see the module docstring.

    With calibration statistics (``calib``), the SVD tables gain the calibration-aware columns the
    study did not run: whitened SVD (SVD-LLM) beside SVD and GPTQ beside int4, at the same bytes, and
    every setting's output error on held-out calibration tokens.
    """
    from sahc_core.io.components import tensor_table
    from sahc_core.spectra.spectrum import min_rank, tensor_spectrum

    table = tensor_table(source)
    out = StudyTables(model=str(source.path))
    t, n = out.tables, out.notes

    t["Architecture breakdown"] = architecture_table(table)
    n["Architecture breakdown"] = "Share of stored parameters per component (a tied LM head is counted once)."

    out.figures.update(study_figures(source, cache, device))
    gate = middle_tensor(table, "gate_proj")
    skipped: list[str] = []  # tensors with NaN / Inf / no elements: named, left out, the rest goes on
    if gate is None:
        n["Architecture breakdown"] += " No FFN gate_proj found: the spectrum tables are skipped."
    else:
        if progress:
            progress(0, 3, f"spectrum of {gate}")
        sp = _or_skip(skipped, tensor_spectrum, source, gate, cache=cache, device=device)
        if sp is not None:
            title = f"Singular values of {gate} {list(sp.shape)}"
            t[title] = sigma_table(sp.singular_values, sp.shape)
            k = len(sp.singular_values)
            n[title] = (f"Condition number σₘₐₓ/σₘᵢₙ = {sp.singular_values[0] / sp.singular_values[-1]:.3g}; full "
                        f"rank {k}" + ("" if k == STUDY_FULL_RANK else
                                       f" (the study's indices scaled by {k}/{STUDY_FULL_RANK})") + ".")
        rows = []
        for kind in ("gate_proj", "up_proj", "down_proj"):
            name = middle_tensor(table, kind)
            if name is None:
                continue
            s = _or_skip(skipped, tensor_spectrum, source, name, cache=cache, device=device)
            if s is None:
                continue
            r = min_rank(s.singular_values, ERROR_TARGET)
            full = len(s.singular_values)
            rows.append({"tensor": kind, "name": name, "min rank (error < 0.10)": r, "full rank": full,
                         "% of full rank": round(100 * r / full, 1)})
        t["Minimum rank for SVD error < 0.10"] = pd.DataFrame(rows)
        n["Minimum rank for SVD error < 0.10"] = ("Eckart–Young–Mirsky: smallest r with √(Σ σᵢ² over i > r / Σ σᵢ² over all i) "
                                                     "≤ 0.10.")

        per = _svd_rows(source, table, cache, device, progress, skipped, calib)
        title = "SVD rank 1/8 of full (the study's r512) + int4 factors, over FFN tensors"
        t[title] = summarize_svd(per).round(4)
        t["SVD + int4 per FFN tensor"] = per.round(5)
        n[title] = (f"{len(per)} FFN tensors, rank {SVD_RANK_FRACTION:g} of each tensor's full rank, factors int4 "
                    "one scale per row; a zero matrix has error 1.0, so error ≥ 1.0 is worse than deleting the tensor."
                    + ("" if calib is None else f" Output errors on {calib.meta['heldout_tokens']:,} held-out "
                       "calibration tokens; whitened SVD and GPTQ use the fitting split's XᵀX."))

    emb = embedding_tensor(table)
    if with_tt and emb is not None:
        from sahc_core.whatif.sweeps import tt_sweep

        def prog(done, total, *_):
            if progress:
                progress(done, total, f"TT sweep of {emb}")
        sweep = _or_skip(skipped, tt_sweep, source, emb, progress=prog, cos_threshold=COS_THRESHOLD)
        if sweep is not None:
            title = f"Tensor-Train sweep of {emb} {list(source.info(emb).shape)}"
            t[title] = tt_table(sweep)
            n[title] = f"Weight cosine per token row; the gate is cos ≥ {COS_THRESHOLD:g} (study section 4)."
    if skipped:
        n["Architecture breakdown"] += " Left out of the tables: " + " ".join(dict.fromkeys(skipped))

    final, note = final_table(source, cache, table)
    t["Final results"] = final
    n["Final results"] = note
    return out
