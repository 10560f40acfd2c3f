"""Plan optimizer: for a target ratio, the mixed plan of least predicted damage under the quality gates.

Pipeline (:func:`prepare` once per model, then :func:`optimize` for any list of targets in seconds):

1. **Candidates** (:mod:`sahc_core.plans.candidates`): per tensor, every (method, config) of the
   grid, with exact bytes, the held-out output error and the predicted gates, cached in DuckDB.
2. **Damage model** (stated; tested in ``tests/test_optimize.py`` and measured against real runs
   on the Runs page): the predicted increase of the mean next-token loss (= of log-perplexity),

       damage_t = Σ_u s_u · e_u²,       predicted Δloss(plan) = Σ_t damage_t,

   with ``s_u`` the Fisher sensitivity of each module u using tensor t
   (:mod:`sahc_core.plans.sensitivity`, measured once per model and text) and ``e_u`` u's relative
   output error on HELD-OUT calibration tokens (a linear: ``‖X(W − Ŵ)ᵀ‖/‖XWᵀ‖``; an embedding: the
   looked-up rows weighted by held-out token counts). Without calibration statistics the weight
   error ``‖W − Ŵ‖/‖W‖`` stands in for ``e_u`` (inputs taken as isotropic) and calibration-aware
   methods are left out; the result says so. The quality gates (``rel_error < 1``, theory vs
   actual, quantization error, output cosine ≥ 0.95 on the run's smoke tokens) are hard
   constraints: an option that fails one is never chosen.
3. **Solver** (:mod:`sahc_core.plans._solver`): exact multiple-choice knapsack with optional
   constraints; ``frontier`` solves many budgets in one pass.
4. **Plan** (:func:`plan_from_choice`): the plan JSON with the most common choice as ``default`` and
   one exact-name override per other tensor, plus a ``provenance`` block (damage model, candidates,
   predicted Δloss, solver status) that a run keeps with its plan, so predictions can be checked
   against measured perplexity (:mod:`sahc_core.runs.frontier`).
"""
from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sahc_core.cache import Cache
from sahc_core.errors import CorpusError, PlanError
from sahc_core.io.components import Component
from sahc_core.io.source import ModelSource
from sahc_core.methods import registry
from sahc_core.plans import _solver
from sahc_core.plans.candidates import CandidateGrid, GateSource, candidate_table, grid_dict
from sahc_core.plans.plan import TIED, CompressionPlan, Override, project
from sahc_core.plans.sensitivity import SensitivityConfig, sensitivities
from sahc_core.plans.smoke_gate import model_loader
from sahc_core.workspace import Workspace

#: Name of the damage model recorded in a plan's provenance.
DAMAGE_MODEL = "fisher-weighted output error v2"
REFERENCES = ("Martens & Grosse 2015 (K-FAC)", "Kunstner et al. 2019 (empirical vs true Fisher)",
              "Dong et al. 2019/2020 (HAWQ, HAWQ-V2)", "Kim et al. 2023 (SqueezeLLM)",
              "Sinha & Zoltners 1979 (multiple-choice knapsack)")
Constraints = _solver.Constraints


# ----------------------------------------------------------------------------------- damage
def damage_table(candidates: pd.DataFrame, sens: pd.DataFrame) -> pd.DataFrame:
    """``candidates`` with ``damage`` (predicted Δloss, nats/token) and ``error_basis`` filled.

    A tensor used by no module of the forward pass (e.g. an MTP head transformers does not run)
    gets damage 0; tied and 1-D keep rows have no error, hence 0.
    """
    out = candidates.copy()

    def s_of(kind: str) -> pd.Series:  # per row: the summed sensitivity of the modules of this kind using it
        return out["tensor"].map(sens[sens["kind"] == kind].groupby("weight")["sensitivity"].sum()).fillna(0.0)

    rel = out["rel_error"].astype(float)
    e_lin = out["output_error"].astype(float).where(lambda e: np.isfinite(e), rel)
    e_emb = out["lookup_output_error"].astype(float).where(lambda e: np.isfinite(e), rel)
    out["damage"] = s_of("linear") * e_lin**2 + s_of("embedding") * e_emb**2
    held = np.isfinite(out["output_error"].astype(float)) | np.isfinite(out["lookup_output_error"].astype(float))
    out["error_basis"] = np.where(held, "held-out output error", "weight error")
    return out


def _escape(name: str) -> str:
    """An fnmatch pattern that matches exactly ``name`` (``*``, ``?``, ``[`` bracketed)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def plan_from_choice(choice: pd.DataFrame, name: str, provenance: dict | None = None,
                     description: str = "") -> CompressionPlan:
    """The plan JSON form of a per-tensor choice: the commonest config as default, exact overrides for the rest.

    1-D tensors (plans keep them in 16 bits) and tied heads need no entry.
    """
    rows = choice[(choice["method"] != TIED) & (choice["ndim"] >= 2)]
    cfgs = {r.tensor: (r.config if isinstance(r.config, dict) else json.loads(r.config)) for r in rows.itertuples()}
    counts = Counter(json.dumps(c, sort_keys=True) for c in cfgs.values())
    default = json.loads(counts.most_common(1)[0][0]) if counts else {"method": "keep"}
    overrides = tuple(Override(_escape(t), registry.config_from_dict(c)) for t, c in cfgs.items() if c != default)
    return CompressionPlan(name=name, default=registry.config_from_dict(default), overrides=overrides,
                           description=description, provenance=provenance)


# ------------------------------------------------------------------------------- constraints
def parse_constraints(texts: Sequence[str]) -> Constraints:
    """Constraints from words like ``keep=embedding``, ``only=int,gptq``, ``max-bits=embedding:8``,
    ``min-bits=ffn:3``, ``one-group-size`` (the CLI's ``--constraints``)."""
    comps = {c.value for c in Component}
    keep: set[str] = set()
    only: set[str] | None = None
    widths: dict[str, dict[str, float]] = {"max-bits": {}, "min-bits": {}}
    one_group = False
    for text in texts:
        word, _, value = str(text).strip().partition("=")
        items = [v.strip() for v in value.split(",") if v.strip()]
        if word == "one-group-size" and not value:
            one_group = True
        elif word == "keep" and items:
            bad = sorted(set(items) - comps)
            if bad:
                raise ValueError(f"keep={','.join(bad)}: unknown component; use {', '.join(sorted(comps))}.")
            keep |= set(items)
        elif word == "only" and items:
            for m in items:
                registry.get(m)
            only = (only or set()) | set(items)
        elif word in widths and items:
            for item in items:
                comp, _, bits = item.partition(":")
                if comp not in comps or not re.fullmatch(r"\d+(\.\d+)?", bits):
                    raise ValueError(f"{word}={item}: give COMPONENT:BITS with a component of "
                                     f"{', '.join(sorted(comps))}, e.g. {word}=embedding:8.")
                widths[word][comp] = float(bits)
        else:
            raise ValueError(f"unknown constraint {text!r}; use keep=COMP, only=METHOD[,METHOD], max-bits=COMP:BITS, "
                             "min-bits=COMP:BITS or one-group-size.")
    return Constraints(keep_components=frozenset(keep), only_methods=None if only is None else frozenset(only),
                       max_bits=widths["max-bits"], min_bits=widths["min-bits"], one_group_size=one_group)


def constraints_dict(c: Constraints) -> dict:
    """JSON form of the constraints (provenance)."""
    return {"keep_components": sorted(c.keep_components),
            "only_methods": None if c.only_methods is None else sorted(c.only_methods),
            "max_bits": dict(c.max_bits), "min_bits": dict(c.min_bits), "one_group_size": c.one_group_size}


# --------------------------------------------------------------------------------- prepare
@dataclass
class Prepared:
    """Everything :func:`optimize` needs for one model: candidates with damage, and where they came from.

    Attributes
    ----------
    source, cache, calib, gate, grid, sens_cfg
        The inputs (``calib`` None: calibration-free candidates, weight-error damage).
    candidates : DataFrame
        :func:`damage_table` of the candidate table.
    sensitivity : DataFrame
        :func:`sensitivity.sensitivities`.
    original_bytes : int
        16-bit bytes of the model (a tied head counted once).
    notes : list of str
        What the user should know (fallbacks).
    seconds : dict
        Time of each stage (cached stages are fast).
    """

    source: ModelSource
    cache: Cache | None
    calib: Any
    gate: GateSource
    grid: CandidateGrid
    sens_cfg: SensitivityConfig
    candidates: pd.DataFrame
    sensitivity: pd.DataFrame
    original_bytes: int
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    workspace: Workspace | None = None
    device: str = "auto"


def prepare(source: ModelSource, cache: Cache | None, *, calibration: bool = True, grid: CandidateGrid = CandidateGrid(),
            text: str | None = None, calib_cfg: Any = None, sens_cfg: SensitivityConfig = SensitivityConfig(),
            smoke_tokens: int | None = None, ray: str | None = None, device: str = "auto",
            workspace: Workspace | None = None, tensors: Sequence[str] | None = None,
            load: Callable[[], tuple[Any, Any]] | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> Prepared:
    """Calibration statistics, sensitivities and the candidate table of ``source`` (all cached).

    Parameters
    ----------
    calibration : bool
        Use calibration statistics (captured once beside the cache). Without them (not asked for,
        no cache to keep them beside, or a calibration text too short for them) calibration-aware
        methods are left out and the weight error stands in for the output error; ``notes`` says
        so, with the reason.
    text : str, optional
        Calibration text (statistics, sensitivity, smoke tokens); default the embedded corpus's
        calibration split, which is what a run on the default corpus uses for its smoke test.
    calib_cfg : CalibConfig, optional
        How the statistics are captured (default ``CalibConfig()``, the runs' setting).
    smoke_tokens : int, optional
        Tokens of the predicted smoke gate (default: the run's, ``pipeline.SMOKE_TOKENS``).
    ray : str, optional
        Measure the missing candidates on a Ray cluster (``candidate_table``'s ``ray``).
    load : callable, optional
        ``load() -> (model, tokenizer)``; default ``evaluate.load_model`` on ``device`` (once).
    progress : callable, optional
        ``progress(stage, done, total)`` with stage ``calibration`` / ``sensitivity`` / ``candidates``.
    """
    from sahc_core.runs.pipeline import SMOKE_TOKENS

    if text is None:
        from sahc_core.io.corpus import default_corpus

        text = default_corpus().calib_text
    load = load or model_loader(source.path, device)
    notes: list[str] = []
    seconds: dict[str, float] = {}
    step = (lambda stage: (lambda d, t, *_: progress(stage, d, t))) if progress is not None else (lambda stage: None)
    calib = None
    t0 = time.perf_counter()
    if calibration and cache is None:
        notes.append("calibration statistics live beside the cache, and there is none")
    elif calibration:
        from sahc_core.calib.stats import CalibConfig
        from sahc_core.calib.store import calibration_stats

        try:
            calib = calibration_stats(source, cache, text, calib_cfg or CalibConfig(), device=device,
                                      progress=step("calibration"))  # loads the model only to capture
        except CorpusError as exc:  # e.g. a calibration text shorter than the statistics need
            notes.append(str(exc).rstrip("."))
    seconds["calibration"] = time.perf_counter() - t0
    if calib is None:
        dropped = sorted(m.name for m in registry.methods() if m.needs_calibration
                         and (grid.methods is None or m.name in grid.methods))
        notes.append("no calibration statistics: the optimisation fell back to calibration-free candidates"
                     + (f" ({', '.join(dropped)} left out)" if dropped else "")
                     + " and the weight error stands in for the held-out output error")
    t0 = time.perf_counter()
    sens = sensitivities(source, cache, text, sens_cfg, load=load, device=device, progress=step("sensitivity"))
    seconds["sensitivity"] = time.perf_counter() - t0
    gate = GateSource(load=load, text=text, n_tokens=smoke_tokens or SMOKE_TOKENS)
    t0 = time.perf_counter()
    cands = candidate_table(source, gate, cache, calib, grid, workspace=workspace, device=device, tensors=tensors,
                            progress=step("candidates"), ray=ray)
    seconds["candidates"] = time.perf_counter() - t0
    original = int(cands.drop_duplicates("tensor")["orig_bytes"].sum())
    return Prepared(source=source, cache=cache, calib=calib, gate=gate, grid=grid, sens_cfg=sens_cfg,
                    candidates=damage_table(cands, sens), sensitivity=sens, original_bytes=original, notes=notes,
                    seconds=seconds, workspace=workspace, device=device)


def damage_model(prep: Prepared) -> dict:
    """The damage model as recorded in a plan's provenance."""
    return {"name": DAMAGE_MODEL,
            "formula": "dloss = sum_t sum_u s_u * e_u^2; s_u = sum_p |g_p|^2 |y_p|^2 / (2 m N)",
            "error": "held-out output error" if prep.calib is not None else "weight error (no calibration statistics)",
            "sensitivity": {"estimator": "Monte-Carlo Fisher (labels sampled from the model), one backward pass",
                            "tokens": prep.sens_cfg.tokens, "window": prep.sens_cfg.window, "seed": prep.sens_cfg.seed},
            "gates": {"cos_threshold": prep.grid.cos_threshold, "smoke_tokens": prep.gate.n_tokens},
            "calibration": getattr(prep.calib, "key", None), "references": list(REFERENCES)}


# -------------------------------------------------------------------------------- optimize
@dataclass(frozen=True)
class Optimized:
    """One target's answer: the solver's solution and, when feasible, the plan with its provenance."""

    target_ratio: float
    solution: _solver.Solution
    plan: CompressionPlan | None

    @property
    def feasible(self) -> bool:
        return self.plan is not None

    def to_json(self) -> dict:
        """The CLI's ``optimize --json`` keys (design.md contract plus detail)."""
        s = self.solution
        out = {"target_ratio": self.target_ratio, "status": s.status, "message": s.message,
               "ratio_projected": s.ratio, "bytes_projected": s.bytes if self.feasible else None,
               "budget_bytes": s.budget_bytes, "predicted": s.damage, "lower_bound": s.lower_bound,
               "solver": s.solver, "seconds": s.seconds, "plan": None}
        if self.plan is not None:
            out["plan"] = self.plan.to_dict()
            out["methods"] = dict(Counter(s.choice["method"]))
        return out


def _check_targets(targets: Sequence[float]) -> list[float]:
    out = []
    for r in targets:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"a target ratio must be a positive number like 4.5, got {r!r}.")
        out.append(float(r))
    if not out:
        raise ValueError("give at least one target ratio, e.g. --target-ratio 4.5.")
    return out


def optimize(prep: Prepared, targets: Sequence[float], constraints: Constraints = Constraints(),
             name: str | None = None, time_limit: float = 30.0) -> list[Optimized]:
    """The optimal plan for every target ratio, in one solver pass (the frontier mode).

    An unreachable target is not an error here: its :class:`Optimized` has ``plan`` None and the
    solver's message names the best reachable ratio (or the contradictory constraints).
    """
    targets = _check_targets(targets)
    budgets = [max(1, int(prep.original_bytes // r)) for r in targets]
    sols = _solver.frontier(prep.candidates, budgets, prep.original_bytes, constraints, time_limit=time_limit)
    n_feasible = int(prep.candidates["feasible"].sum())
    out = []
    for r, sol in zip(targets, sols):
        plan = None
        if sol.status != "infeasible":
            prov = {"kind": "optimized", "target_ratio": r, "predicted_dloss": sol.damage,
                    "predicted_ppl_ratio": math.exp(sol.damage), "model_fp": prep.source.fingerprint,
                    "damage_model": damage_model(prep),
                    "candidates": {"grid": grid_dict(prep.grid), "n_candidates": int(len(prep.candidates)),
                                   "n_feasible": n_feasible, "n_tensors": int(prep.candidates["tensor"].nunique())},
                    "solver": {"status": sol.status, "solver": sol.solver, "lower_bound": sol.lower_bound,
                               "gap": sol.gap, "seconds": sol.seconds, "budget_bytes": sol.budget_bytes,
                               "message": sol.message},
                    "constraints": constraints_dict(constraints), "notes": list(prep.notes)}
            plan = plan_from_choice(sol.choice, name or f"optimized-{r:g}x", prov,
                                    f"least predicted damage at {r:g}x ({sol.status}); "
                                    f"predicted Δloss {sol.damage:.4g} nats/token")
            _check_plan(prep, plan, sol)
        out.append(Optimized(target_ratio=r, solution=sol, plan=plan))
    return out


def _check_plan(prep: Prepared, plan: CompressionPlan, sol: _solver.Solution) -> None:
    """The plan resolves to exactly the solver's choice (bytes and per-tensor configs)."""
    df = project(plan, prep.source)["tensors"]
    chosen = {r.tensor: json.dumps(r.config, sort_keys=True) for r in sol.choice.itertuples() if r.method != TIED}
    got = {r.name: json.dumps(r.config, sort_keys=True) for r in df.itertuples() if r.method != TIED}
    assert int(df["bytes"].sum()) == sol.bytes, (int(df["bytes"].sum()), sol.bytes)
    assert all(got[t] == c for t, c in chosen.items() if t in got), "plan and solver choice differ"


def optimize_plan(prep: Prepared, target_ratio: float, constraints: Constraints = Constraints(),
                  name: str | None = None, time_limit: float = 30.0) -> Optimized:
    """:func:`optimize` for one target; an unreachable target is a :class:`PlanError` (one sentence)."""
    res = optimize(prep, [target_ratio], constraints, name, time_limit)[0]
    if res.plan is None:
        raise PlanError(res.solution.message)
    return res


# ------------------------------------------------------------------------------ predictions
def predict_plan(prep: Prepared, plan: CompressionPlan) -> dict:
    """Predicted Δloss of any plan (a hand plan, a uniform int-k) under the same damage model.

    Settings outside the candidate grid are measured (and cached) first.

    Returns
    -------
    dict
        ``predicted_dloss``, ``feasible`` (every tensor passes its gates), ``failed_tensors``,
        ``bytes``, ``ratio``, ``tensors`` (DataFrame: the candidate row of each tensor's setting).
    """
    df = project(plan, prep.source)["tensors"]
    cands = prep.candidates
    keyed = cands.assign(_k=cands["tensor"] + "\0" + cands["config"].map(lambda c: json.dumps(json.loads(c), sort_keys=True)))
    want = {r.name: r.config for r in df.itertuples() if r.method != TIED}
    keys = {t: t + "\0" + json.dumps(c, sort_keys=True) for t, c in want.items()}
    missing = {t: [registry.config_from_dict(want[t])] for t, k in keys.items() if k not in set(keyed["_k"])}
    if missing:
        more = candidate_table(prep.source, prep.gate, prep.cache, prep.calib, CandidateGrid(methods=()),
                               workspace=prep.workspace, device=prep.device, tensors=list(missing), extra=missing)
        more = damage_table(more, prep.sensitivity)
        keyed = pd.concat([keyed, more.assign(_k=more["tensor"] + "\0" + more["config"].map(
            lambda c: json.dumps(json.loads(c), sort_keys=True)))], ignore_index=True)
    rows = keyed.drop_duplicates("_k").set_index("_k").loc[[keys[t] for t in want]].reset_index(drop=True)
    failed = sorted(rows.loc[~rows["feasible"].astype(bool), "tensor"])
    nbytes = int(df["bytes"].sum())
    return {"predicted_dloss": float(rows["damage"].sum()), "feasible": not failed, "failed_tensors": failed,
            "bytes": nbytes, "ratio": int(df["orig_bytes"].sum()) / nbytes if nbytes else math.nan, "tensors": rows}


def with_prediction(plan: CompressionPlan, prep: Prepared, kind: str = "hand") -> CompressionPlan:
    """``plan`` with a provenance block holding its :func:`predict_plan` Δloss (runs keep it for the
    predicted-vs-measured check)."""
    from dataclasses import replace

    p = predict_plan(prep, plan)
    prov = {**dict(plan.provenance or {}), "kind": (plan.provenance or {}).get("kind", kind),
            "predicted_dloss": p["predicted_dloss"], "predicted_ppl_ratio": math.exp(p["predicted_dloss"]),
            "predicted_feasible": p["feasible"], "model_fp": prep.source.fingerprint, "damage_model": damage_model(prep)}
    return replace(plan, provenance=prov)
