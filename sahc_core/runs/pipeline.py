"""One whole run: project a plan, assemble the checkpoint, load it back, gate it, perplexity vs baseline.

Stages (written to the run's progress): ``project`` -> ``calibration`` (only for a plan that uses a
calibration-aware method: the statistics are captured once per model and text, then read from the
cache folder; never on the test text) -> ``assemble`` (tensors) -> ``gates`` (tensors:
every stored tensor of the written checkpoint is measured against the source through
``methods.measure`` and ``gates.tensor_gates``, plus the model-level shape, coverage gates, and the
forward smoke test: each layer's output cosine with W vs Ŵ on calibration text, ``sahc_core.evaluate.smoke``) ->
``baseline`` (tokens; skipped when cached) -> ``ppl`` (tokens) -> done. The baseline perplexity runs
through exactly the same ``evaluate.perplexity`` call as the compressed model and is cached in
``results`` (kind ``ppl_baseline``, key = corpus text hash + protocol), so a second run of the same
model and protocol reuses it. Every gate decision goes to the audit log before the compressed model is
loaded, so a shape failure is on record even though the load then stops the run.

The perplexity gate ``ppl_increase`` compares the compressed perplexity with the baseline:
``(ppl - baseline) / baseline <= ppl_threshold`` (default :data:`sahc_core.gates.PPL_THRESHOLD`, +10 %),
with both perplexities and the protocol as evidence. A perplexity that is not finite (NaN / Inf
log-probabilities, or an overflow: :class:`~sahc_core.errors.NumericalError`) logs the failed gate and
then FAILS the run with the reason, rather than finishing "done" with a null perplexity.

Before any long stage the checkpoint's names are mapped to the evaluated model
(``evaluate.names.name_map_for``: a name that maps nowhere stops the run there); vision and MTP
tensors are compressed and counted but not evaluated, and the result says so (``evaluation``). The
evaluation runs in memory or one decoder layer at a time (``evaluate.evaluator.Evaluator``, ``offload``
``auto|never|always``; the decision and its numbers are in ``offload``), in the run's ``dtype``; no
stage holds the whole rebuilt model: the gates measure and drop each tensor, the smoke test and the
compressed perplexity rebuild each one when they need it.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from sahc_core.cache import Cache

PPL_VERSION = 1
BASELINE_KIND = "ppl_baseline"
#: Calibration tokens of the forward smoke test (one forward pass of the original model).
SMOKE_TOKENS = 512


def _as_plan(plan: Any):
    from sahc_core.plans.plan import CompressionPlan

    if isinstance(plan, CompressionPlan):
        return plan
    if isinstance(plan, dict):
        return CompressionPlan.from_dict(plan)
    if isinstance(plan, (str, Path)):
        return CompressionPlan.from_json(plan)
    raise ValueError(f"plan must be a CompressionPlan, a dict or a JSON file path, got {type(plan).__name__}.")


def _as_corpus(corpus: Any):
    from sahc_core.io.corpus import Corpus, default_corpus, load_corpus

    if isinstance(corpus, Corpus):
        return corpus
    return default_corpus() if corpus is None else load_corpus(corpus)


def baseline_key(corpus, ppl_cfg, device: str) -> str:
    """Cache key of a baseline perplexity: the exact test text (sha256) and the protocol."""
    return json.dumps({"corpus": corpus.name, "text_sha256": hashlib.sha256(corpus.test_text.encode()).hexdigest(),
                       "window": ppl_cfg.window, "stride": ppl_cfg.stride, "max_tokens": ppl_cfg.max_tokens,
                       "dtype": ppl_cfg.dtype, "device": device.split(":")[0]}, sort_keys=True)


def _calibration_text(corpus) -> tuple[str, str]:
    """``(text, description)`` the calibration statistics of a run are captured on.

    Never the test text: a corpus without a calibration file of its own (a single text file) gets
    the embedded Shakespeare calibration split, and the run says so (calibrating on the text the
    perplexity is measured on would make calibration-aware methods look better than they are).
    """
    if set(corpus.calib_files) & set(corpus.test_files):
        from sahc_core.io.corpus import default_corpus

        return default_corpus().calib_text, "the embedded Shakespeare calibration split (the corpus has none apart)"
    return corpus.calib_text, f"{corpus.name} calibration files"


def _needs_calibration(tensors) -> bool:
    """True when a resolved plan table uses a calibration-aware method on some tensor."""
    from sahc_core.methods import registry
    from sahc_core.plans.plan import TIED

    return any(registry.get(m).needs_calibration for m in set(tensors["method"]) if m != TIED)


def measure_checkpoint(source, out_dir: str | Path, progress=None, calib=None) -> tuple[list, list[dict], dict]:
    """Per-tensor gates of an assembled checkpoint against its source, streaming.

    Each stored tensor is loaded back from the files (``assemble.iter_assembled``), rebuilt once in
    float32, measured against the source weight with ``methods.measure(W, cfg, compressed=..., w_hat=...)``
    and dropped: at most one source weight and one rebuilt weight are held at a time. (The smoke test
    and the compressed perplexity rebuild the tensors again when they need them: rebuilding costs a
    dequantization or one factor product per tensor, while keeping every rebuilt weight would hold
    the whole model in float32 and writing them out would cost a full-size file.)

    Returns
    -------
    tuple
        ``(gates, rows, shapes)``: a list of GateResult, one dict per tensor (name, component, method,
        bytes, rel_error, weight_cosine), and the rebuilt shape of every tensor, tied aliases included.
    """
    from sahc_core.io.rows import is_bounded
    from sahc_core.methods import registry as methods
    from sahc_core.plans.assemble import iter_assembled, read_manifest
    from sahc_core.gates import tensor_gates
    from sahc_core.plans.plan import TIED

    manifest = read_manifest(out_dir)
    n_stored = sum(e["method"] != TIED for e in manifest["tensors"].values())
    gates, rows, shapes = [], [], {}
    for i, (name, e, c) in enumerate(iter_assembled(out_dir, manifest)):
        held = calib.heldout_for_weight(name) if calib is not None else None
        cfg = methods.config_from_dict(e["config"])
        m = _bounded_measure(source, name, e, c, cfg, held) if is_bounded(source.info(name)) else None
        if m is None:
            W_hat = c.reconstruct(torch.float32)
            W = source.read(name, dtype=torch.float32)
            m = methods.measure(W, cfg, compressed=c, w_hat=W_hat, calib=held)
            shapes[name] = tuple(W_hat.shape)
            del W, W_hat
        else:
            shapes[name] = tuple(c.shape)
        del c
        gates += tensor_gates(name, {**m, "config": e["config"]})
        rows.append({"name": name, "component": e["component"], "method": e["method"], "bytes": m["bytes"],
                     "rel_error": m["rel_error"], "weight_cosine": m["weight_cosine"],
                     "output_error": m.get("output_error")})
        if progress is not None:
            progress(i + 1, n_stored)
    for name, e in manifest["tensors"].items():
        if e["method"] == TIED:
            shapes[name] = shapes[e["tied_to"]]
    return gates, rows, shapes


def _bounded_measure(source, name: str, entry: dict, c, cfg, held) -> dict | None:
    """The gates' numbers of a tensor above ``io.rows.BOUNDED_MIN_BYTES`` (the 248k embedding and LM head)
    within the memory bound: W in its stored dtype, Ŵ a block of rows at a time
    (:func:`sahc_core.methods._bounded.compare_rebuilt`), never both whole in float32 (12 GB for
    Qwen3.5-9B's embedding). The int-k prediction of the theory gate comes from the stored scales as
    usual; a low-rank / TT tensor this large gets no prediction here (its prediction needs a fresh
    decomposition). ``None``: no row access, measured whole."""
    from sahc_core.io.rows import read_stored
    from sahc_core.methods import registry as methods
    from sahc_core.methods._bounded import compare_rebuilt

    if len(getattr(c, "shape", ())) != 2:
        return None
    W = read_stored(source, name)
    H = held.xtx if held is not None else None
    spec = methods.get(entry["method"])
    m = compare_rebuilt(W, c, spec.name, H)
    if m is not None and spec.storage in ("int-k", "16-bit"):
        m.update(spec.extras(W, c, None))  # int-k: step²/12 from the stored scales (no Ŵ needed)
    return m


def _components(projected: dict, assembled: dict, rows: list[dict]) -> list[dict]:
    """Projected and actual (payload) bytes and the error summary per component."""
    out = []
    for comp in projected["components"]:
        name = comp["component"]
        payload = sum(t["bytes"] for t in assembled["tensors"] if t["component"] == name)
        errs = [r for r in rows if r["component"] == name]
        out.append({"component": name, "original_bytes": comp["original_bytes"], "bytes_projected": comp["bytes"],
                    "bytes_payload": payload, "ratio_projected": comp["ratio"],
                    "ratio_payload": comp["original_bytes"] / payload if payload else float("nan"),
                    "n_tensors": comp.get("n_tensors"),
                    "max_rel_error": max((r["rel_error"] for r in errs), default=None),
                    "min_weight_cosine": min((r["weight_cosine"] for r in errs), default=None),
                    "max_output_error": max((r["output_error"] for r in errs if r.get("output_error") is not None),
                                            default=None)})
    return out


def _smoke_gates(evaluator, corpus, weights, reporter) -> list:
    """The study's forward smoke test: every layer's output cosine (W vs Ŵ) on calibration text ≥ 0.95."""
    from sahc_core.gates import cosine_gate

    cos = evaluator.smoke(corpus.calib_text, weights, SMOKE_TOKENS,
                          progress=lambda d, t: reporter.progress(layers_done=d, layers_total=t))
    return [cosine_gate(name, c["cosine"], evidence={"weight": c["weight"], "tokens": c["tokens"],
                                                     "text": f"{corpus.name} calibration split"})
            for name, c in cos.items()]


def _ppl(evaluator, corpus, reporter, weights=None) -> Any:
    return evaluator.perplexity(corpus.test_text, weights,
                                progress=lambda done, total: reporter.progress(tokens_done=done, tokens_total=total))


def execute_run(cache: Cache, plan: Any, model_dir: str | Path, corpus: Any = None, window: int | None = None,
                max_tokens: int | None = None, run_id: str | None = None, reporter=None,
                out_dir: str | Path | None = None, device: str = "auto", batch_size: int | None = None,
                ppl_threshold: float | None = None, dtype: str = "float32", offload: str = "auto") -> dict:
    """Run a plan end to end and store the result in the run's row (see the module docstring).

    Parameters
    ----------
    cache : Cache
    plan : CompressionPlan, dict or path of a plan JSON file
    model_dir : str or Path
        The original model (config, safetensors, tokenizer).
    corpus : str, Path or Corpus, optional
        Test text (default: the embedded Shakespeare split).
    window, max_tokens : int, optional
        Perplexity protocol (``evaluate.PplConfig``).
    run_id : str, optional
        Default: a new id. A run row is created when there is none. Checked against
        ``paths.ID_PATTERN`` (it names the checkpoint directory).
    reporter : JobReporter, optional
        Default: a reporter on ``run_id`` (so CLI runs show up in the runs list too).
    out_dir : str or Path, optional
        Where the checkpoint goes; default ``<cache dir>/runs/<run_id>``.
    device : str
        ``auto`` (GPU when present), ``cpu`` or ``cuda``.
    ppl_threshold : float, optional
        Largest relative perplexity increase the ``ppl_increase`` gate passes (default
        :data:`sahc_core.gates.PPL_THRESHOLD` = 0.10, i.e. +10 %).
    dtype : str
        ``float32`` or ``bfloat16``: the dtype of the smoke test and both perplexities (stated in
        ``protocol.dtype_note``).
    offload : str
        ``auto`` (layer by layer when the model would not fit, ``evaluate.offload.decide_offload``),
        ``never`` or ``always``.

    Returns
    -------
    dict
        run_id, plan_name, ratio_projected, ratio_actual, bytes_projected, bytes_actual, bytes_original,
        ppl, baseline_ppl, delta_ppl, ppl_increase ((ppl - baseline) / baseline), ppl_threshold,
        protocol {text, text_files, text_sha256, window, stride, tokens, dtype, dtype_note, device, max_tokens}
        (see :mod:`sahc_core.runs.protocol`), gates, gates_passed, gates_failed, gate_summary
        (:func:`sahc_core.gates.gate_summary` rows: decisions per gate, kind, weak), components, seconds
        {assemble, gates, baseline, ppl}, work {params, tokens} (for :mod:`sahc_core.runs.eta`),
        baseline_cached, out_dir, model_path, model_fp, evaluation (``NameMap.describe``: evaluated class,
        tensors compressed but not evaluated, a sentence), offload (``OffloadDecision``).

    Raises
    ------
    NumericalError
        The baseline or the compressed perplexity is not finite (the run is marked failed with it).
    """
    from sahc_core.evaluate.evaluator import RUN_DTYPES

    if dtype not in RUN_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(RUN_DTYPES)}, got {dtype!r}.")
    from sahc_core.device import resolve_device
    from sahc_core.evaluate.perplexity import PplConfig
    from sahc_core.plans.assemble import AssemblyCancelled
    from sahc_core.paths import safe_id
    from sahc_core.runs.jobs import JobCancelled, JobReporter, new_run_id

    from sahc_core.gates import PPL_THRESHOLD, ppl_increase_gate

    plan = _as_plan(plan)
    threshold = PPL_THRESHOLD if ppl_threshold is None else ppl_threshold
    ppl_increase_gate(1.0, 1.0, threshold)  # a bad threshold fails now, not after minutes of assembly
    cfg = PplConfig(window=window, max_tokens=max_tokens, batch_size=batch_size, dtype=dtype, device=device)
    run_id = safe_id(run_id or (reporter.run_id if reporter is not None else new_run_id()), "run id")
    reporter = reporter or JobReporter(cache, run_id)
    model_dir = Path(model_dir).expanduser().resolve()
    try:
        reporter.start(plan=plan.to_dict(), model_path=str(model_dir))  # raises JobCancelled if asked already
        return _execute(cache, plan, model_dir, corpus, cfg, run_id, reporter, out_dir, resolve_device(device),
                        float(threshold), offload)
    except (JobCancelled, KeyboardInterrupt):
        reporter.cancelled()
        raise  # a KeyboardInterrupt stays one: the CLI exits 130 on it
    except AssemblyCancelled as exc:
        reporter.cancelled()
        raise JobCancelled(f"run {run_id} was cancelled.") from exc
    except BaseException as exc:
        reporter.fail(str(exc) or type(exc).__name__)
        raise


def _ppl_gate(cache, fp: str, run_id: str, ppl: float, base_ppl: float, threshold: float, protocol: dict,
              reason: str | None = None):
    """The ``ppl_increase`` decision, logged at once (also when the perplexity is not finite)."""
    from sahc_core.gates import log_gates, ppl_increase_gate

    evidence = {**protocol, **({"reason": reason} if reason else {})}
    g = ppl_increase_gate(ppl, base_ppl, threshold, evidence)
    log_gates(cache, fp, [g], run_id=run_id)
    return g


def _execute(cache, plan, model_dir: Path, corpus, cfg, run_id: str, reporter, out_dir, device: str,
             threshold: float, offload: str) -> dict:
    from sahc_core.errors import NumericalError
    from sahc_core.plans.assemble import assemble
    from sahc_core.evaluate.evaluator import Evaluator, assembled_weights, dtype_note, plan_offload
    from sahc_core.evaluate.names import name_map_for
    from sahc_core.evaluate.perplexity import check_window
    from sahc_core.paths import check_removable
    from sahc_core.runs.jobs import run_dir
    from sahc_core.gates import coverage_gate, gate_summary, log_gates, shape_gate
    from sahc_core.io.source import ModelSource
    from sahc_core.plans.plan import project

    seconds: dict[str, float] = {}
    source = ModelSource.open(model_dir)
    fp = source.fingerprint
    cache.execute("UPDATE runs SET model_fp = ? WHERE run_id = ?", [fp, run_id])
    # Everything checkable is checked before minutes of assembly: the window, the output directory
    # (inside <cache>/runs, or one SAHC created), the plan on this model, the corpus.
    check_window(cfg, source.config)
    out = Path(out_dir) if out_dir is not None else run_dir(cache, run_id)
    check_removable(out, "output directory")
    reporter.stage("project")
    projected = project(plan, source)
    corpus = _as_corpus(corpus)
    names = name_map_for(source)  # checkpoint names the evaluated model does not have stop the run here
    decision = plan_offload(offload, source, names, cfg, device)
    from sahc_core.runs.eta import expectation

    reporter.expect(expected=expectation(cache, source, corpus, cfg, device))  # for the run's overall ETA

    calib, calib_text_name = None, None
    if _needs_calibration(projected["tensors"]):
        from sahc_core.calib.store import calibration_stats

        reporter.stage("calibration")
        t0 = time.perf_counter()
        calib_text, calib_text_name = _calibration_text(corpus)
        calib = calibration_stats(source, cache, calib_text, device=device, offload=decision.offload,
                                  progress=lambda d, t: reporter.progress(layers_done=d, layers_total=t))
        seconds["calibration"] = time.perf_counter() - t0

    reporter.stage("assemble")
    t0 = time.perf_counter()
    assembled = assemble(source, plan, out, overwrite=True, check_cancel=reporter.cancel_requested, calib=calib,
                         progress=lambda d, t, name: reporter.progress(tensors_done=d, tensors_total=t, tensor=name))
    seconds["assemble"] = time.perf_counter() - t0

    reporter.stage("gates")
    t0 = time.perf_counter()
    gates, rows, shapes = measure_checkpoint(
        source, out, progress=lambda d, t: reporter.progress(tensors_done=d, tensors_total=t), calib=calib)
    infos = source.tensors()
    gates.append(shape_gate({i.name: tuple(i.shape) for i in infos}, shapes))
    gates.append(coverage_gate([i.name for i in infos], [t["name"] for t in assembled["tensors"]]))
    # ONE model for the whole run (in memory, or empty and filled one layer at a time): the original
    # serves the smoke test and the baseline, then the compressed weights, rebuilt tensor by tensor.
    evaluator = Evaluator(model_dir, names, cfg, device, offload=decision.offload)
    try:
        gates += _smoke_gates(evaluator, corpus, assembled_weights(out, cfg.dtype), reporter)
        log_gates(cache, fp, gates, run_id=run_id)
        seconds["gates"] = time.perf_counter() - t0

        reporter.stage("baseline")
        key = baseline_key(corpus, cfg, device)
        base = cache.get(BASELINE_KIND, fp, key, PPL_VERSION)
        baseline_cached = base is not None
        t0 = time.perf_counter()
        protocol = {"text": corpus.name, "window": cfg.window, "max_tokens": cfg.max_tokens, "dtype": cfg.dtype}
        if base is None:
            try:
                base = _ppl(evaluator, corpus, reporter).to_dict()
            except NumericalError as exc:
                raise NumericalError(f"the baseline (uncompressed) model has no finite perplexity, so run {run_id} "
                                     f"cannot be compared with it: {exc}", exc.value) from exc
            cache.put(BASELINE_KIND, fp, key, PPL_VERSION, base)
        seconds["baseline"] = time.perf_counter() - t0

        reporter.stage("ppl")
        t0 = time.perf_counter()
        try:
            res = _ppl(evaluator, corpus, reporter, assembled_weights(out, cfg.dtype))
        except NumericalError as exc:  # logged as a failed gate, then the run fails with the reason
            _ppl_gate(cache, fp, run_id, exc.value, float(base["ppl"]), threshold, protocol, str(exc))
            raise NumericalError(f"run {run_id} failed: the compressed model has no finite perplexity ({exc})",
                                 exc.value) from exc
        seconds["ppl"] = time.perf_counter() - t0
    finally:
        del evaluator
        gc.collect()
    ppl, base_ppl = float(res.ppl), float(base["ppl"])
    protocol.update(tokens=res.tokens, window=res.window, stride=res.stride, device=res.device)
    pg = _ppl_gate(cache, fp, run_id, ppl, base_ppl, threshold, protocol)
    gates.append(pg)

    n_failed = sum(not g.passed for g in gates)
    result = {
        "run_id": run_id, "plan_name": plan.name, "model_path": str(model_dir), "model_fp": fp,
        "ratio_projected": assembled["ratio_projected"], "ratio_actual": assembled["ratio_actual"],
        "bytes_projected": assembled["bytes_projected"], "bytes_actual": assembled["bytes_actual"],
        "bytes_payload": assembled["bytes_payload"], "bytes_original": assembled["bytes_original"],
        "ppl": ppl, "baseline_ppl": base_ppl, "delta_ppl": ppl - base_ppl, "ppl_increase": pg.value,
        "ppl_threshold": threshold,
        "ppl_ratio": ppl / base_ppl if base_ppl > 0 and math.isfinite(base_ppl) else float("nan"),
        "protocol": {"text": corpus.name, "text_files": list(corpus.test_files),
                     "text_sha256": hashlib.sha256(corpus.test_text.encode()).hexdigest(), "window": res.window,
                     "stride": res.stride, "tokens": res.tokens, "dtype": res.dtype,
                     "dtype_note": dtype_note(res.dtype, res.device), "device": res.device,
                     "max_tokens": cfg.max_tokens},
        "evaluation": names.describe(), "offload": decision.to_dict(),
        "baseline_protocol_matches": (base["tokens"], base["window"], base["stride"]) == (res.tokens, res.window,
                                                                                           res.stride),
        "gates": [g.to_dict() for g in gates], "gates_passed": len(gates) - n_failed, "gates_failed": n_failed,
        "gate_summary": gate_summary([g.to_dict() for g in gates]).drop(columns="why").to_dict(orient="records"),
        "components": _components(projected, assembled, rows), "seconds": seconds,
        "work": {"params": int(source.num_params), "tokens": int(res.tokens)},
        "baseline_cached": baseline_cached, "out_dir": str(out),
        "calibration": None if calib is None else {"text": calib_text_name, "tokens": calib.meta["tokens"],
                                                    "heldout_tokens": calib.meta["heldout_tokens"], "dir": str(calib.path)},
    }
    reporter.stage("done")
    reporter.finish(result)
    return result


def compare_runs(cache: Cache, run_ids: list[str]) -> dict:
    """Side-by-side tables of finished or failed runs.

    Returns
    -------
    dict
        ``runs``: the :func:`jobs.list_runs` rows of ``run_ids`` (with their protocol, Δppl against
        their own baseline); ``baselines``: one row per perplexity protocol among them
        (:func:`sahc_core.runs.protocol.baselines`); ``protocol_warning``: one sentence when they mix
        protocols, else None; ``components``: one row per run and component (run_id, plan_name,
        component, ratio_projected, ratio_payload, bytes_payload, max_rel_error, min_weight_cosine);
        ``gates``: the audit log of those runs, failed gates first.
    """
    import pandas as pd

    from sahc_core.gates import audit_log
    from sahc_core.runs.jobs import list_runs, run_status
    from sahc_core.runs.protocol import baselines, mixed_warning

    runs = list_runs(cache)
    runs = runs[runs["run_id"].isin(run_ids)].reset_index(drop=True)
    comps = []
    for rid in runs["run_id"]:
        st = run_status(cache, rid)
        for c in (st.get("result") or {}).get("components", []):
            comps.append({"run_id": rid, "plan_name": st.get("plan_name"), **c})
    cols = ["run_id", "plan_name", "component", "ratio_projected", "ratio_payload", "bytes_payload",
            "max_rel_error", "min_weight_cosine"]
    components = pd.DataFrame(comps).reindex(columns=cols)
    logs = [audit_log(cache, run_id=rid) for rid in runs["run_id"]]
    logs = [g for g in logs if not g.empty]
    gates = pd.concat(logs, ignore_index=True) if logs else audit_log(cache, run_id="\0")
    gates = gates.sort_values(["passed", "run_id", "tensor", "gate"], kind="stable").reset_index(drop=True)
    return {"runs": runs, "baselines": baselines(runs), "protocol_warning": mixed_warning(runs),
            "components": components, "gates": gates}
