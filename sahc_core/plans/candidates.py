"""The plan optimizer's candidate table: per tensor, the (method, config) options with exact bytes, errors, gates.

For every stored tensor of a model, :func:`candidate_table` lists the settings worth trying, built
from the registry's parameter schemas (:func:`tensor_configs`; no method is named here): a
quantizer (a method with ``bits`` and ``group_size``) gets every width of the grid times every group
size, a low-rank method (one with ``rank_fraction``) every rank fraction times factor width, and a
method with its own structure (TT ranks, keep) its registry ``candidates``. Each setting is fitted
to the tensor first (``registry.fit_to_shape``: a group size that does not divide becomes a divisor
or per row), duplicates dropped.

Each option is measured twice, both results cached in DuckDB so a second optimisation is lookups:

* :func:`sahc_core.whatif.measure.measure_tensor` (kind ``whatif_measure``): exact bytes, weight
  error, the per-tensor gates of a run (``rel_error < 1``, theory-vs-actual, quantization error)
  and, with calibration statistics, the **held-out** output error ``‖X(W − Ŵ)ᵀ‖/‖XWᵀ‖``;
* the run's forward smoke test, predicted (kind :data:`GATE_KIND`): every module that uses the
  weight (a linear, an embedding lookup, a tied LM head) gets the mean per-token cosine of its
  output with W vs Ŵ on exactly the tokens the run's smoke gate uses (the first
  ``SMOKE_TOKENS`` tokens of the calibration text, the original model's activations), so an option
  marked feasible passes that gate in the run. An embedding also gets its lookup output error on the
  held-out token counts.

``feasible`` = every gate passes; the optimizer treats it as a hard constraint, never a penalty.
1-D tensors get one ``keep`` row (plans keep them 16-bit) and a tied LM head stored apart one
``tied`` row of 0 bytes.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from sahc_core.cache import Cache, from_json, to_json, utcnow
from sahc_core.gates import COS_THRESHOLD
from sahc_core.io.source import ModelSource
from sahc_core.methods import registry
from sahc_core.methods.keep import KeepConfig
from sahc_core.plans.plan import TIED, CompressionPlan, resolve
from sahc_core.plans.smoke_gate import GateInputs, capture_gate_inputs, gate_numbers, text_key
from sahc_core.whatif import measure as whatif
from sahc_core.workspace import Workspace

#: Cache kind and version of the predicted smoke-test numbers of one option.
GATE_KIND = "optimize_gate"
GATE_VERSION = 1
_FLUSH_ROWS = 256  # new results written per transaction (a DuckDB write costs ~0.1-0.3 s on a loaded machine)
#: Columns of :func:`candidate_table` (the solver's columns first).
COLUMNS = ("tensor", "component", "method", "config", "bits", "group_size", "bytes", "damage", "feasible",
           "kind", "layer", "ndim", "label", "orig_bytes", "rel_error", "output_error", "lookup_output_error",
           "output_cosine", "failed_gates")


@dataclass(frozen=True)
class CandidateGrid:
    """The settings tried per tensor (see the module docstring).

    Attributes
    ----------
    methods : tuple of str, optional
        Registered method names to try; None = every registered method (calibration-aware ones
        only with statistics). ``keep`` is always added: every tensor needs its 16-bit option.
    bits : tuple of int
        Code widths of calibration-free quantizers (RTN int-k, HQQ).
    calibrated_bits : tuple of int
        Code widths of calibration-aware quantizers (GPTQ): they pay off at low widths, and each
        one costs a Hessian factorisation, so the default grid stops at 4 bits.
    group_sizes : tuple of int or None
        Quantizer group sizes (None = one scale per row).
    rank_fractions : tuple of float
        Kept rank / min(m, n) of low-rank methods.
    factor_bits : tuple of int or None
        Low-rank factor widths (None = fp16 factors).
    cos_threshold : float
        Output-cosine gate threshold (the run's smoke test uses the same default).
    """

    methods: tuple[str, ...] | None = None
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    calibrated_bits: tuple[int, ...] = (2, 3, 4)
    group_sizes: tuple[int | None, ...] = (64, 128, None)
    rank_fractions: tuple[float, ...] = (0.25, 0.5)
    factor_bits: tuple[int | None, ...] = (4, 8)
    cos_threshold: float = COS_THRESHOLD

    def __post_init__(self) -> None:
        for name in ("methods", "bits", "calibrated_bits", "group_sizes", "rank_fractions", "factor_bits"):
            value = getattr(self, name)
            if isinstance(value, (str, int, float)):
                raise ValueError(f"CandidateGrid.{name} must be a sequence, got {value!r}.")
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.methods is not None:
            for m in self.methods:
                registry.get(m)  # a ValueError naming the known methods
        if not 0 < self.cos_threshold <= 1:
            raise ValueError(f"cos_threshold must be in (0, 1], got {self.cos_threshold}.")
        if any(not 0 < f <= 1 for f in self.rank_fractions):
            raise ValueError(f"rank fractions must be in (0, 1], got {self.rank_fractions}.")


def _family(spec: registry.MethodSpec) -> str:
    """How the grid expands a method, read from its parameter schema."""
    keys = set(spec.keys)
    if any(p.kind == "int_list" for p in spec.params) or not {"bits", "group_size"} <= keys:
        return "own"  # TT ranks, keep, plug-ins: the method's own candidate list
    return "lowrank" if "rank_fraction" in keys else "quant"


def _raw_configs(spec: registry.MethodSpec, shape: tuple[int, ...], component: str | None,
                 grid: CandidateGrid) -> list[Any]:
    family = _family(spec)
    if family == "own":
        return list(spec.candidates(shape, component)) if spec.candidates is not None else []
    if family == "quant":
        widths = grid.calibrated_bits if spec.needs_calibration else grid.bits
        values = [{"bits": b, "group_size": g} for b in widths for g in grid.group_sizes]
    else:
        values = [{"rank_fraction": f, "bits": b, **({"group_size": g} if b is not None else {})}
                  for f in grid.rank_fractions for b in grid.factor_bits
                  for g in (grid.group_sizes if b is not None else (None,))]
    return [registry.config_from_values(spec.name, v) for v in values]


def tensor_configs(shape: Sequence[int], component: str | None, grid: CandidateGrid = CandidateGrid(),
                   with_calibration: bool = False) -> list[Any]:
    """The fitted, distinct configs the optimizer measures for one tensor (keep first).

    Methods that cannot take the tensor (component, dimensions) are left out, and so are
    calibration-aware ones without statistics; settings that cannot be made to fit are skipped.
    """
    shape = tuple(int(s) for s in shape)
    out, seen = [KeepConfig()], {json.dumps(registry.config_to_dict(KeepConfig()), sort_keys=True)}
    for spec in registry.methods():
        if (grid.methods is not None and spec.name not in grid.methods) or not registry.applicable(spec, shape, component):
            continue
        if spec.needs_calibration and not with_calibration:
            continue
        for cfg in _raw_configs(spec, shape, component, grid):
            try:
                cfg, _ = registry.fit_to_shape(shape, component, cfg)
            except ValueError:
                continue
            key = json.dumps(registry.config_to_dict(cfg), sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(cfg)
    return out


def _bulk(cache: Cache | None, kind: str, fp: str, version: int) -> dict[str, dict]:
    """Every stored value of ``(kind, fp, version)``, by key (one query instead of thousands)."""
    if cache is None:
        return {}
    rows = cache.execute("SELECT key, value FROM results WHERE kind = ? AND model_fp = ? AND version = ?",
                         [kind, fp, int(version)])
    return {k: from_json(v) for k, v in rows}


def _gate_key(name: str, cfg: Any, tkey: str, calib: Any) -> str:
    return json.dumps({"tensor": name, "config": registry.config_to_dict(cfg), "text": tkey,
                       "calib": getattr(calib, "key", None)}, sort_keys=True)


def _width(d: dict) -> float:
    return math.nan if d.get("bits") is None else float(d["bits"])


def _group(d: dict) -> float:
    """Group size for the solver's one-group-size rule: NaN without codes, 0 = one scale per row."""
    if d.get("bits") is None or "group_size" not in d:
        return math.nan
    return 0.0 if d["group_size"] is None else float(d["group_size"])


@dataclass(frozen=True)
class GateSource:
    """Where the smoke tokens come from: ``load()`` returns ``(model, tokenizer)`` on first need."""

    load: Callable[[], tuple[Any, Any]]
    text: str
    n_tokens: int


def candidate_table(source: ModelSource, gate: GateSource, cache: Cache | None = None, calib: Any = None,
                    grid: CandidateGrid = CandidateGrid(), workspace: Workspace | None = None, device: str = "auto",
                    tensors: Sequence[str] | None = None, extra: Mapping[str, Sequence[Any]] | None = None,
                    progress: Callable[[int, int, str], None] | None = None, ray: str | None = None) -> pd.DataFrame:
    """Measure (or look up) every option of every tensor (see the module docstring).

    Parameters
    ----------
    source : ModelSource
    gate : GateSource
        The model loader and the smoke text / token count (the run's: calibration text, 512).
    cache : Cache, optional
        Results are looked up in one query per kind and new ones stored.
    calib : CalibStats, optional
        Calibration statistics: calibration-aware methods join and the output errors are held-out;
        without them the weight error stands in for the output error (see :mod:`.optimize`).
    grid : CandidateGrid
    tensors : sequence of str, optional
        Only these tensors (tests, previews); default every stored tensor.
    extra : mapping, optional
        Tensor name -> configs to measure besides the grid's (e.g. a hand plan's settings).
    progress : callable, optional
        ``progress(done, total, tensor)`` once per tensor.
    ray : str, optional
        ``auto``, ``local[:N]`` or a cluster address: every tensor with an option missing from the
        cache is one Ray task, each result committed as it arrives (:mod:`._ray_candidates`); the
        rows are the serial table's.

    Returns
    -------
    DataFrame
        :data:`COLUMNS`, one row per (tensor, option); ``damage`` is NaN here (the damage model
        fills it), ``config`` is the plan-JSON string, ``bits`` the code width (NaN: none),
        ``group_size`` (NaN: no codes, 0: per row), ``failed_gates`` the names of failed gates.
    """
    from sahc_core.io.components import tensor_table

    table = tensor_table(source)
    keep_rows = resolve(CompressionPlan("keep-all", default=KeepConfig()), table, bool(source.tied_embeddings))
    if tensors is not None:
        unknown = sorted(set(tensors) - set(keep_rows["name"]))
        if unknown:
            raise ValueError(f"the model has no tensor(s) {', '.join(unknown[:3])}; give names from the tensor list.")
        keep_rows = keep_rows[keep_rows["name"].isin(set(tensors))]
    layers = dict(zip(table["name"], table["layer"]))
    run = _Measurer(source, gate, cache, calib, grid.cos_threshold,
                    workspace if workspace is not None else Workspace(), device)
    recs = list(keep_rows.itertuples(index=False))
    options = [None if rec.method == TIED or len(rec.shape) < 2 else
               _with_extra(tensor_configs(rec.shape, rec.component, grid, with_calibration=calib is not None),
                           (extra or {}).get(rec.name, ()), rec.shape, rec.component) for rec in recs]
    rows: list[dict] = []
    try:
        if ray is not None:  # the missing options measured on the cluster; the rows below are look-ups
            from sahc_core.plans._ray_candidates import measure_on_ray

            measure_on_ray(run, [(rec.name, cfgs or []) for rec, cfgs in zip(recs, options)], ray, progress)
            progress = None
        for i, (rec, cfgs) in enumerate(zip(recs, options)):
            base = {"tensor": rec.name, "component": rec.component, "kind": rec.kind, "layer": layers.get(rec.name),
                    "ndim": len(rec.shape), "orig_bytes": int(rec.orig_bytes), "damage": math.nan,
                    "output_error": math.nan, "lookup_output_error": math.nan, "output_cosine": math.nan,
                    "failed_gates": ""}
            if rec.method == TIED:
                rows.append({**base, "method": TIED, "label": f"tied to {rec.tied_to}", "bits": math.nan,
                             "config": json.dumps({"method": TIED}), "group_size": math.nan, "bytes": 0,
                             "rel_error": 0.0, "feasible": True})
            elif cfgs is None:
                rows.append({**base, "method": "keep", "label": "keep", "config": json.dumps(rec.config),
                             "bits": math.nan, "group_size": math.nan, "bytes": int(rec.bytes), "rel_error": 0.0,
                             "output_cosine": 1.0, "feasible": True})
            else:
                rows += [{**base, **run.option(rec.name, cfg)} for cfg in cfgs]
            if len(run.pending) >= _FLUSH_ROWS:
                run.flush()
            if progress is not None:
                progress(i + 1, len(recs), rec.name)
    finally:
        run.flush()  # an interrupted measurement keeps what it finished
    return pd.DataFrame(rows).reindex(columns=list(COLUMNS))


def _with_extra(cfgs: list[Any], more: Sequence[Any], shape: tuple[int, ...], component: str) -> list[Any]:
    """``cfgs`` plus the fitted ``more`` configs not among them."""
    seen = {json.dumps(registry.config_to_dict(c), sort_keys=True) for c in cfgs}
    out = list(cfgs)
    for cfg in more:
        cfg, _ = registry.fit_to_shape(shape, component, cfg)
        key = json.dumps(registry.config_to_dict(cfg), sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


class _Measurer:
    """One table's measuring context: the cached rows (read once, in bulk), new rows to store, the
    smoke-test inputs (captured on the first miss)."""

    def __init__(self, source: ModelSource, gate: GateSource, cache: Cache | None, calib: Any, cos_threshold: float,
                 ws: Workspace, device: str) -> None:
        self.source, self.gate, self.cache, self.calib = source, gate, cache, calib
        self.cos_threshold, self.ws, self.device = cos_threshold, ws, device
        fp = source.fingerprint
        self.measured = _bulk(cache, whatif.KIND_MEASURE, fp, whatif.MEASURE_VERSION)
        self.gated = _bulk(cache, GATE_KIND, fp, GATE_VERSION)
        self.tkey = text_key(gate.text, gate.n_tokens)
        self.pending: list[tuple] = []  # (kind, key, version, value) not yet stored
        self._gi: GateInputs | None = None

    def flush(self) -> None:
        """Store the new results in one transaction (``Cache.put``'s row form)."""
        if self.cache is not None and self.pending:
            now, fp = utcnow(), self.source.fingerprint
            self.cache.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)",
                                   [(k, fp, key, v, to_json(value), now) for k, key, v, value in self.pending])
        self.pending.clear()

    def gate_inputs(self) -> GateInputs:
        if self._gi is None:
            model, tokenizer = self.gate.load()
            self._gi = capture_gate_inputs(model, tokenizer, self.gate.text, self.gate.n_tokens)
        return self._gi

    def keys(self, name: str, cfg: Any) -> tuple[str, str]:
        """Cache keys of the measurement and of the predicted smoke test of ``cfg`` (fitted)."""
        return whatif.measure_key(name, cfg, self.calib), _gate_key(name, cfg, self.tkey, self.calib)

    def missing(self, name: str, cfg: Any) -> tuple[bool, bool]:
        """Whether the measurement / the predicted smoke test of ``cfg`` are not known yet."""
        mkey, gkey = self.keys(name, cfg)
        return mkey not in self.measured, gkey not in self.gated

    def store(self, name: str, cfg: Any, values: Mapping[str, dict]) -> None:
        """Keep new :func:`measure_option` values (and queue them for the next :meth:`flush`)."""
        mkey, gkey = self.keys(name, cfg)
        for kind, key, version, known in ((whatif.KIND_MEASURE, mkey, whatif.MEASURE_VERSION, self.measured),
                                          (GATE_KIND, gkey, GATE_VERSION, self.gated)):
            if kind in values:
                known[key] = values[kind]
                self.pending.append((kind, key, version, values[kind]))

    def option(self, name: str, cfg: Any) -> dict:
        """One candidate row: the cached (or new) measurement and predicted smoke test of ``cfg`` (fitted)."""
        mkey, gkey = self.keys(name, cfg)
        need_m, need_g = mkey not in self.measured, gkey not in self.gated
        if need_m or need_g:
            self.store(name, cfg, measure_option(self.source, name, cfg, self.calib, self.gate_inputs, self.device,
                                                 self.ws, measure=need_m, gate=need_g))
        m, g, d = self.measured[mkey], self.gated[gkey], registry.config_to_dict(cfg)
        failed = [x["gate"] for x in m["gates"] if not x["passed"]]
        failed += [f"output_cosine {mod}" for mod, c in g["cosines"].items() if not c >= self.cos_threshold]
        return {"method": d["method"], "label": m.get("label") or registry.label(cfg), "config": json.dumps(d),
                "bits": _width(d), "group_size": _group(d), "bytes": int(m["bytes"]), "rel_error": float(m["rel_error"]),
                "output_error": float(m.get("output_error", math.nan)),
                "lookup_output_error": float(g.get("lookup_output_error", math.nan)),
                "output_cosine": min(g["cosines"].values(), default=math.nan),
                "failed_gates": ", ".join(failed), "feasible": not failed}


def measure_option(source: ModelSource, name: str, cfg: Any, calib: Any, gate_inputs: Callable[[], GateInputs],
                   device: str, ws: Workspace, *, measure: bool = True, gate: bool = True) -> dict[str, dict]:
    """The new values of one option, by cache kind: what the serial table and a Ray worker both compute.

    ``measure``: :func:`~sahc_core.whatif.measure.measure_tensor`'s value (kind ``whatif_measure``);
    ``gate``: the predicted smoke test (kind :data:`GATE_KIND`), on ``gate_inputs()`` (asked for only
    then). Plain values (dicts of numbers, strings and lists), stored by the caller.
    """
    out: dict[str, dict] = {}
    if measure:  # exactly what measure_tensor stores, without its own cache write
        out[whatif.KIND_MEASURE] = whatif.measure_tensor(source, name, cfg, device=device, workspace=ws, log=False,
                                                         calib=calib)
    if gate:
        gi = gate_inputs()
        t0 = time.perf_counter()
        W = source.read(name, device="cpu", dtype=torch.float32)
        W_hat = whatif.reconstruction(source, name, cfg, device, ws, calib)
        usages = gi.usages.get(name, [])  # none: a tensor the forward pass never uses (an MTP head)
        held = calib.heldout if calib is not None else None
        counts = held.token_counts if held is not None and any(k == "embedding" for _, k in usages) else None
        out[GATE_KIND] = {**gate_numbers(W, W_hat, usages, gi, counts), "seconds": time.perf_counter() - t0}
    return out


def grid_dict(grid: CandidateGrid) -> dict:
    """The grid as plain JSON (for the plan's provenance)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(grid).items()}
