"""Whole-model compression plans: a method config per component -> exact projected bytes and ratio.

A plan assigns one method config (any registered method: ``keep``/``int``/``svd``/``tt``/..., see
:mod:`sahc_core.methods.registry`) to every stored tensor of a checkpoint. For each tensor the config is chosen by these rules, in order:

1. **Overrides** (``"overrides": [{"pattern": "*.norm*", "method": "keep"}, ...]``): the first
   pattern that matches the full tensor name (``fnmatch.fnmatchcase``: case-sensitive shell
   wildcards ``*``, ``?``, ``[...]``) wins; later patterns are not consulted. Each pattern is compiled
   once; a pattern without wildcards is looked up by name, so a plan with one override per tensor
   resolves in time linear in the tensors.
2. **Components** (``"components": {"embedding": {...}}``): the config of the tensor's component
   (:class:`sahc_core.io.components.Component` values; an unknown name is a :class:`PlanError`).
3. **Default** (``"default": {...}``); ``"default": null`` means *no default*: a tensor that no
   override or component covers is then a :class:`PlanError` listing the uncovered tensors.

Then two explicit, counted adjustments (never silent; the ``rule`` column says which applied):

- **1-D tensors are always kept in 16-bit** (norm weights, biases, ``A_log``, ``dt_bias``): they
  hold well under 1 % of the parameters and none of the methods is meant for vectors. A matching
  ``keep`` config is honoured (e.g. ``float16``); any other method is replaced by ``keep`` and
  counted in ``n_forced_keep_1d``.
- **Incompatible tensors** (a group size that does not divide the last dimension, an SVD rank above
  ``min(m, n)``, TT on a tensor outside the ``embedding`` component, ...) take the plan's
  ``"fallback"`` config when it fits; otherwise the method adapts its own config where it can (a
  group size becomes the largest divisor of the width within 2x below it, or per row: the registry's
  ``fit_to_shape``), then the fallback's. Each such tensor records why in ``fallback_reason`` (rule
  ``fallback from ...`` / ``adapted ...``). When nothing fits, :func:`resolve` raises a
  :class:`PlanError` listing the tensors.

Tied embeddings: the checkpoint normally stores a tied LM head once (as ``embed_tokens``); when it
stores both and the config ties them, the ``lm_head`` row gets method ``"tied"`` and 0 bytes, so the
shared matrix is counted once, in both the original and the compressed bytes.

Bytes: original = 2 bytes per parameter (16-bit); compressed = ``methods.projected_bytes`` (exact
storage: codes, scales, zero points, factors, TT cores). A tensor stored in a dtype SAHC does not
analyse (integer, boolean or 8-bit-or-narrower float, :mod:`sahc_core.io.dtypes`) is a
:class:`PlanError`: its bytes are not 16-bit and its values are not weights to compress.

Limits (a plan is user input): size, nesting depth, number and length of override patterns are
bounded (:mod:`sahc_core.plans._limits`); the name is a safe label (:func:`sahc_core.paths.safe_label`).
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import pandas as pd

from sahc_core.methods import registry as methods
from sahc_core.methods.keep import KeepConfig
from sahc_core.io.components import Component
from sahc_core.errors import PlanError
from sahc_core.io.dtypes import is_analysed, not_analysed_reason
from sahc_core.paths import PathError, safe_label
from sahc_core.plans._limits import (MAX_OVERRIDES, MAX_PATTERN_CHARS, OverrideIndex, check_depth, parse_plan_text,
                                     read_plan_file)

#: Bytes per parameter of the original (16-bit) model.
ORIG_BYTES_PER_PARAM = 2
#: Method name of a tied LM head row (stored once, as the embedding).
TIED = "tied"
_COMPONENTS = tuple(c.value for c in Component)
_PLAN_KEYS = {"name", "description", "default", "components", "overrides", "fallback", "provenance"}
_LIST_MAX = 5  # tensors named in one error sentence


def _parse_config(d: Any, where: str) -> Any:
    """Config dataclass from its plan-JSON dict; a bad dict is a PlanError naming ``where``."""
    if not isinstance(d, Mapping):
        raise PlanError(f"plan {where} must be an object like {{\"method\": \"int\", \"bits\": 4}}, got {d!r}.")
    try:
        return methods.config_from_dict(dict(d))
    except (ValueError, TypeError, KeyError) as exc:
        raise PlanError(f"plan {where} is invalid: {str(exc).rstrip('.')}.") from exc


@dataclass(frozen=True)
class Override:
    """A per-tensor override: ``config`` for every tensor whose name matches ``pattern`` (fnmatch)."""

    pattern: str
    config: Any

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"override pattern must be a non-empty string, got {self.pattern!r}.")
        if len(self.pattern) > MAX_PATTERN_CHARS:
            raise ValueError(f"override pattern {self.pattern[:40]!r}... has {len(self.pattern)} characters, more "
                             f"than the {MAX_PATTERN_CHARS} allowed.")
        object.__setattr__(self, "_match", re.compile(fnmatch.translate(self.pattern)).match)  # compiled once

    def matches(self, name: str) -> bool:
        """True when ``name`` matches the pattern (case-sensitive shell wildcards, ``fnmatch.fnmatchcase``)."""
        return self._match(name) is not None


@dataclass(frozen=True)
class CompressionPlan:
    """A whole-model plan: ``default`` config, per-component configs, ordered overrides, fallback.

    Attributes
    ----------
    name : str
        Plan name (key in the cache ``plans`` table).
    default : config or None
        Config of tensors no override or component covers; None = no default (uncovered -> error).
    components : Mapping[str, config]
        Component value (``"ffn"``, ``"embedding"``, ...) -> config.
    overrides : tuple of Override
        Checked in order; the first match wins.
    fallback : config or None
        Config for tensors the chosen method cannot take; None = such tensors are an error.
    description : str
        Free text.
    provenance : Mapping, optional
        Where the plan came from, carried through JSON unchanged (the optimizer records its damage
        model, candidates, predicted Δloss and solver status here); must be a JSON object.
    """

    name: str
    default: Any = None
    components: Mapping[str, Any] = field(default_factory=dict)
    overrides: tuple[Override, ...] = ()
    fallback: Any = None
    description: str = ""
    provenance: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise PlanError("a plan needs a non-empty \"name\"; add one to the plan JSON.")
        try:
            safe_label(self.name)
        except PathError as exc:
            raise PlanError(str(exc)) from None
        if len(self.overrides) > MAX_OVERRIDES:
            raise PlanError(f"plan {self.name!r} has {len(self.overrides):,} overrides, more than the "
                            f"{MAX_OVERRIDES:,} allowed; use wildcard patterns or component configs instead.")
        unknown = sorted(set(self.components) - set(_COMPONENTS))
        if unknown:
            raise PlanError(
                f"plan {self.name!r} names unknown component(s) {', '.join(unknown)}; use {', '.join(_COMPONENTS)}."
            )
        object.__setattr__(self, "components", MappingProxyType(dict(self.components)))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "_index", OverrideIndex(self.overrides))
        if self.provenance is not None and not isinstance(self.provenance, Mapping):
            raise PlanError(f"plan {self.name!r}: \"provenance\" must be a JSON object, got "
                            f"{type(self.provenance).__name__}.")

    # -- JSON form ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompressionPlan:
        """Parse the plan-JSON form (see design.md); unknown keys are a PlanError (typos are not ignored)."""
        if not isinstance(d, Mapping):
            raise PlanError(f"a plan must be a JSON object, got {type(d).__name__}.")
        check_depth(d)
        extra = sorted(set(d) - _PLAN_KEYS)
        if extra:
            raise PlanError(f"plan has unknown key(s) {', '.join(extra)}; allowed are {', '.join(sorted(_PLAN_KEYS))}.")
        name = d.get("name")
        if not isinstance(name, str) or not name.strip():
            raise PlanError("a plan needs a non-empty \"name\"; add one to the plan JSON.")
        try:
            safe_label(name)  # before the name appears in any other message
        except PathError as exc:
            raise PlanError(str(exc)) from None
        comps = d.get("components") or {}
        if not isinstance(comps, Mapping):
            raise PlanError(f"plan {name!r}: \"components\" must be an object of component -> config.")
        raw_overrides = d.get("overrides") or []
        if not isinstance(raw_overrides, list):
            raise PlanError(f"plan {name!r}: \"overrides\" must be a list of {{\"pattern\": ..., \"method\": ...}}.")
        if len(raw_overrides) > MAX_OVERRIDES:
            raise PlanError(f"plan {name!r} has {len(raw_overrides):,} overrides, more than the "
                            f"{MAX_OVERRIDES:,} allowed; use wildcard patterns or component configs instead.")
        overrides = []
        for i, o in enumerate(raw_overrides):
            if not isinstance(o, Mapping) or not isinstance(o.get("pattern"), str) or not o["pattern"]:
                raise PlanError(f"plan {name!r}: override {i} needs a non-empty \"pattern\" string.")
            if len(o["pattern"]) > MAX_PATTERN_CHARS:
                raise PlanError(f"plan {name!r}: override {i} has a pattern of {len(o['pattern']):,} characters, "
                                f"more than the {MAX_PATTERN_CHARS} allowed.")
            cfg = _parse_config({k: v for k, v in o.items() if k != "pattern"}, f"{name!r} override {o['pattern']!r}")
            overrides.append(Override(o["pattern"], cfg))
        default = d.get("default")
        fallback = d.get("fallback")
        return cls(
            name=name,
            default=None if default is None else _parse_config(default, f"{name!r} default"),
            components={str(c): _parse_config(v, f"{name!r} component {c!r}") for c, v in comps.items()},
            overrides=tuple(overrides),
            fallback=None if fallback is None else _parse_config(fallback, f"{name!r} fallback"),
            description=str(d.get("description") or ""),
            provenance=d.get("provenance"),
        )

    def to_dict(self) -> dict:
        """The plan-JSON form; ``from_dict(to_dict())`` equals the plan."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["default"] = None if self.default is None else methods.config_to_dict(self.default)
        out["components"] = {c: methods.config_to_dict(v) for c, v in self.components.items()}
        out["overrides"] = [{"pattern": o.pattern, **methods.config_to_dict(o.config)} for o in self.overrides]
        if self.fallback is not None:
            out["fallback"] = methods.config_to_dict(self.fallback)
        if self.provenance is not None:
            out["provenance"] = dict(self.provenance)
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> CompressionPlan:
        """Read a plan JSON file; a missing, non-regular, oversized or malformed file is a PlanError."""
        return cls.from_dict(read_plan_file(path))

    @classmethod
    def from_json_text(cls, text: str | bytes) -> CompressionPlan:
        """Parse plan JSON text (an uploaded file), with the same bounds as :meth:`from_json`."""
        return cls.from_dict(parse_plan_text(text))

    def to_json(self, path: str | Path | None = None) -> str:
        """The plan as indented JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


# -- resolution ---------------------------------------------------------------------------------
def _fit(shape: tuple[int, ...], component: str, cfg: Any, fallback: Any) -> tuple[Any, str | None, str | None]:
    """``(config, rule suffix, reason)`` for one tensor: ``cfg`` when it fits; else the plan's explicit
    ``fallback`` when that fits; else ``cfg`` adapted by its method (``registry.fit_to_shape``: e.g. a
    group size that does not divide the width becomes the largest divisor within 2x below it, or per
    row); else the adapted fallback. ``(None, None, why)`` when nothing fits."""
    why = methods.incompatibility(shape, component, cfg)
    if why is None:
        return cfg, None, None
    if fallback is not None and methods.incompatibility(shape, component, fallback) is None:
        return fallback, "fallback from", why
    for base, what in ((cfg, "adapted"), (fallback, "adapted fallback of")):
        if base is None:
            continue
        try:
            adapted, note = methods.fit_to_shape(shape, component, base)
        except ValueError:
            continue
        return adapted, what, f"{why}: {note}"
    return None, None, why


def _rule(plan: CompressionPlan, name: str, component: str) -> tuple[Any, str]:
    """``(config, rule)`` by precedence override > component > default; config None if uncovered."""
    i = plan._index.first(name)
    if i is not None:
        o = plan.overrides[i]
        return o.config, f"override[{i}] {o.pattern}"
    if component in plan.components:
        return plan.components[component], f"component {component}"
    return plan.default, "default"


def _tied_heads(table: pd.DataFrame, tied: bool) -> dict[str, str]:
    """``{lm_head name: embed_tokens name}`` for heads stored although tied to the embedding.

    Uses the ``duplicate`` column of ``components.tensor_table`` when present, else ``tied`` and
    the kinds (a single ``embed_tokens`` and ``lm_head`` of the same shape).
    """
    embeds = table.loc[table["kind"] == "embed_tokens", ["name", "shape"]]
    if len(embeds) != 1:
        return {}
    emb_name, emb_shape = str(embeds.iloc[0]["name"]), tuple(embeds.iloc[0]["shape"])
    if "duplicate" in table.columns:
        heads = table.loc[table["duplicate"].astype(bool) & (table["kind"] == "lm_head"), "name"]
    elif tied:
        heads = table.loc[(table["kind"] == "lm_head") & (table["shape"].map(tuple) == emb_shape), "name"]
    else:
        return {}
    return {str(h): emb_name for h in heads}


def _refuse_non_float(plan: CompressionPlan, table: pd.DataFrame) -> None:
    """PlanError naming the tensors stored in a dtype SAHC does not analyse (``dtype`` column, when present)."""
    if "dtype" not in table.columns:
        return
    bad = [(str(n), str(d)) for n, d in zip(table["name"], table["dtype"]) if not is_analysed(str(d))]
    if bad:
        raise PlanError(f"plan {plan.name!r} cannot apply to this model: {not_analysed_reason(*bad[0])}"
                        f"{f' ({len(bad) - 1} more tensors too)' if len(bad) > 1 else ''}.")


def resolve(plan: CompressionPlan, table: pd.DataFrame, tied_embeddings: bool = False) -> pd.DataFrame:
    """Assign a config to every tensor of ``table`` (``components.tensor_table``) and count bytes.

    Parameters
    ----------
    plan : CompressionPlan
    table : DataFrame
        One row per stored tensor: name, shape, component, kind (and optional layer, dtype).
    tied_embeddings : bool
        The model ties its LM head to the embedding (``ModelSource.tied_embeddings``).

    Returns
    -------
    DataFrame
        One row per tensor, in table order: name, component, kind, shape, params, method, config
        (plan-JSON dict; None for a tied head), rule, fallback_reason, tied_to, orig_bytes, bytes.

    Raises
    ------
    PlanError
        Tensors left uncovered, or tensors the method cannot take and no (fitting) fallback.
    """
    _refuse_non_float(plan, table)
    tied = _tied_heads(table, tied_embeddings)
    rows, uncovered, incompatible = [], [], []
    for rec in table.itertuples(index=False):
        name, comp, shape = str(rec.name), str(rec.component), tuple(int(s) for s in rec.shape)
        params = math.prod(shape)
        row = {"name": name, "component": comp, "kind": str(rec.kind), "shape": shape, "params": params,
               "fallback_reason": None, "tied_to": tied.get(name)}
        if name in tied:
            rows.append({**row, "method": TIED, "config": None, "rule": f"tied to {tied[name]}",
                         "orig_bytes": 0, "bytes": 0})
            continue
        cfg, rule = _rule(plan, name, comp)
        if len(shape) <= 1 and not isinstance(cfg, KeepConfig):
            cfg, rule = KeepConfig(), "1-D keep"
        if cfg is None:
            uncovered.append(name)
            continue
        cfg, how, why = _fit(shape, comp, cfg, plan.fallback)
        if cfg is None:
            incompatible.append(f"{name} ({why})")
            continue
        if how is not None:
            rule, row["fallback_reason"] = f"{how} {rule}", why
        d = methods.config_to_dict(cfg)
        rows.append({**row, "method": d["method"], "config": d, "rule": rule,
                     "orig_bytes": ORIG_BYTES_PER_PARAM * params, "bytes": int(methods.projected_bytes(shape, cfg))})
    if uncovered:
        raise PlanError(
            f"plan {plan.name!r} leaves {len(uncovered)} tensor(s) uncovered ({', '.join(uncovered[:_LIST_MAX])}"
            f"{', ...' if len(uncovered) > _LIST_MAX else ''}); add a \"default\", a component or an override for them."
        )
    if incompatible:
        raise PlanError(
            f"plan {plan.name!r} cannot apply its method to {len(incompatible)} tensor(s) "
            f"({'; '.join(incompatible[:_LIST_MAX])}{'; ...' if len(incompatible) > _LIST_MAX else ''}); "
            "add an override or a \"fallback\" config for them."
        )
    cols = ["name", "component", "kind", "shape", "params", "method", "config", "rule", "fallback_reason",
            "tied_to", "orig_bytes", "bytes"]
    return pd.DataFrame(rows, columns=cols)


def summarize(plan: CompressionPlan, df: pd.DataFrame) -> dict:
    """Totals and the per-component breakdown of a :func:`resolve` table (JSON-able; no tensors)."""
    b_orig, b_proj = int(df["orig_bytes"].sum()), int(df["bytes"].sum())
    comps = []
    for comp, g in df.groupby("component", sort=False):
        o, b = int(g["orig_bytes"].sum()), int(g["bytes"].sum())
        comps.append({"component": str(comp), "params": int(g.loc[g["method"] != TIED, "params"].sum()),
                      "n_tensors": int(len(g)), "original_bytes": o, "bytes": b,
                      "ratio": o / b if b else float("nan"), "share_of_original": o / b_orig if b_orig else 0.0,
                      "share_of_compressed": b / b_proj if b_proj else 0.0})
    comps.sort(key=lambda c: -c["original_bytes"])
    used = {r.split("] ", 1)[1] for r in df["rule"] if r.startswith("override[")} | {
        r.split("] ", 1)[1] for r in df["rule"] if r.startswith("fallback from override[")}
    return {
        "plan": plan.name,
        "ratio_projected": b_orig / b_proj if b_proj else float("nan"),
        "bytes_projected": b_proj,
        "bytes_original": b_orig,
        "params": int(df.loc[df["method"] != TIED, "params"].sum()),
        "n_tensors": int(len(df)),
        "n_forced_keep_1d": int((df["rule"] == "1-D keep").sum()),
        "n_fallback": int(df["fallback_reason"].notna().sum()),
        "n_tied": int((df["method"] == TIED).sum()),
        "unused_overrides": [o.pattern for o in plan.overrides if o.pattern not in used],
        "components": comps,
    }


def project(plan: CompressionPlan, source) -> dict:
    """Projected bytes and ratio of ``plan`` on a model (no tensor data is read).

    Returns
    -------
    dict
        :func:`summarize` keys (ratio_projected, bytes_projected, bytes_original, components
        [{component, params, original_bytes, bytes, ratio, share_of_compressed, ...}], counts)
        plus ``tensors``: the :func:`resolve` DataFrame.
    """
    from sahc_core.io.components import tensor_table

    df = resolve(plan, tensor_table(source), tied_embeddings=bool(source.tied_embeddings))
    return {**summarize(plan, df), "tensors": df}


def embedding_wall(project_result: Mapping[str, Any], target_ratio: float, component: str = "embedding") -> dict:
    """The ratio the embedding/LM head must reach for a total ``target_ratio``, all else fixed.

    ``B_target = B_orig / target``; ``B_rest`` = projected bytes of every other component;
    ``B_emb_needed = B_target - B_rest``; needed embedding ratio ``= B_emb_orig / B_emb_needed``,
    infinite (impossible) when ``B_rest >= B_target``. The highest reachable total ratio, with a
    0-byte embedding, is ``B_orig / B_rest``.

    Parameters
    ----------
    project_result : mapping
        A :func:`project` / :func:`summarize` result (uses bytes_original and components).
    target_ratio : float
        Wanted total ratio (> 0).
    component : str
        The component whose ratio is solved for.

    Returns
    -------
    dict
        target_ratio, feasible, embedding_ratio_needed (inf when infeasible), embedding_ratio_now,
        reached, bytes_target, bytes_rest, bytes_embedding_needed, embedding_original_bytes,
        max_total_ratio, message (one sentence).
    """
    if not (isinstance(target_ratio, (int, float)) and math.isfinite(target_ratio) and target_ratio > 0):
        raise ValueError(f"target_ratio must be a positive finite number, got {target_ratio!r}.")
    comps = {c["component"]: c for c in project_result["components"]}
    if component not in comps or comps[component]["original_bytes"] <= 0:
        raise PlanError(f"the model has no {component} component, so there is no embedding wall to compute.")
    b_orig = float(project_result["bytes_original"])
    e_orig, e_now = float(comps[component]["original_bytes"]), float(comps[component]["bytes"])
    b_rest = sum(float(c["bytes"]) for name, c in comps.items() if name != component)
    b_target = b_orig / target_ratio
    needed = b_target - b_rest
    feasible = needed > 0
    ratio_needed = e_orig / needed if feasible else math.inf
    ratio_now = e_orig / e_now if e_now > 0 else math.inf
    max_total = b_orig / b_rest if b_rest > 0 else math.inf
    if feasible:
        msg = (f"For {target_ratio:g}x in total the {component} must reach {ratio_needed:.1f}x "
               f"(it now gives {ratio_now:.1f}x).")
    else:
        msg = (f"{target_ratio:g}x in total is impossible with the rest of the model as planned: it alone needs "
               f"{b_rest / 1e6:.1f} MB > the {b_target / 1e6:.1f} MB budget (at most {max_total:.2f}x even with "
               f"a 0-byte {component}).")
    return {"target_ratio": float(target_ratio), "feasible": feasible, "embedding_ratio_needed": ratio_needed,
            "embedding_ratio_now": ratio_now, "reached": feasible and ratio_now >= ratio_needed,
            "bytes_target": b_target, "bytes_rest": b_rest, "bytes_embedding_needed": max(needed, 0.0),
            "embedding_original_bytes": e_orig, "max_total_ratio": max_total, "message": msg}


# -- storage ------------------------------------------------------------------------------------
def save_plan(cache, plan: CompressionPlan) -> None:
    """Upsert ``plan`` into the cache ``plans`` table (keyed by name)."""
    cache.save_plan(plan.name, plan.to_dict())


#: The example plans shipped with the project (``plans/*.json``): int8, int4-g128, int4 + SVD, TT.
EXAMPLE_PLANS_DIR = Path(__file__).resolve().parents[2] / "plans"


def example_plans(directory: Path = EXAMPLE_PLANS_DIR) -> dict[str, CompressionPlan]:
    """The shipped example plans, name -> plan (empty when the folder is absent)."""
    return {p.name: p for p in (CompressionPlan.from_json(f) for f in sorted(directory.glob("*.json")))}


def load_plans(cache) -> dict[str, CompressionPlan]:
    """Every plan saved in the cache, name -> plan, newest first."""
    return {name: CompressionPlan.from_dict(d) for name, d in cache.plans().items()}
