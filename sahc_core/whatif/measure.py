"""What-if service: compress one real tensor with one setting and report ratio, error, cosine, gates.

The What-if page and the CLI ``measure`` / ``sweep`` commands call these functions. Every method
comes from the registry (:mod:`sahc_core.methods.registry`): its fast ``measure`` path when it has
one (int-k and SVD: a slider move re-uses the cached thin SVD and never packs codes), else the
registry's float32 measurement. The expensive per-tensor parts live in a
:class:`~sahc_core.workspace.Workspace` (the float32 weight and its row norms, the thin SVD,
``W Vhᵀ``, compressed tensors, activations, the model); pass the app's or the CLI's workspace, or
none for a private one.

A tensor with no elements or with NaN / Inf values raises :class:`~sahc_core.errors.NumericalError`
naming it before any compression (its error is undefined, not "worse than zeros").
A tensor above ``io.rows.BOUNDED_MIN_BYTES`` (the 248k embedding and LM head) is measured within the
memory bound: W kept in its stored dtype, the rest in row blocks (:mod:`sahc_core.methods._bounded`:
a method's ``measure_bounded``, else block-wise compression for a ``row_separable`` method, else a
clear refusal naming the bound).

A requested setting that does not fit the tensor is fitted first (:func:`registry.fit_to_shape`: a
group size that does not divide the width becomes the largest divisor within 2x below it, else per
row); the result says so (``group_size_requested``, ``group_size``, ``note``).

With calibration statistics (``calib``, see :mod:`sahc_core.calib`), calibration-aware methods get
the layer's fitting statistics, and ``output_error`` ``‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖`` is computed on the
HELD-OUT split (tokens the statistics used for fitting never saw).

Finished measurements are stored in the DuckDB cache under ``(fingerprint, tensor, plan-form config,
calibration key, MEASURE_VERSION)``, so a repeated setting is a lookup, also across processes.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sahc_core import metrics
from sahc_core.cache import Cache
from sahc_core.device import resolve_device
from sahc_core.errors import ModelError, NumericalError
from sahc_core.gates import log_gates, tensor_gates
from sahc_core.io.rows import is_bounded, memory_bound, read_stored
from sahc_core.io.source import ModelSource
from sahc_core.methods import registry
from sahc_core.methods._bounded import row_block_measure, row_norm2_blocked, w_h_w
from sahc_core.methods.lowrank import svd_factors
from sahc_core.workspace import Workspace

#: Bump when a measured number would change for the same inputs (invalidates cached rows).
MEASURE_VERSION = 3  # 3: predictions from what is stored (theory gate both ways), no int quant_error
_KIND_MEASURE = "whatif_measure"
#: The cache kind of :func:`measure_tensor` rows (the plan optimizer reads them in bulk).
KIND_MEASURE = _KIND_MEASURE
_KIND_OUTCOS = "whatif_output_cosine"
#: The end of the sentence a NaN / Inf / empty tensor gets (never "worse than a zero matrix").
_UNMEASURABLE = "no compression error can be measured on it"


def _check_nonempty(source: ModelSource, name: str) -> None:
    shape = tuple(source.info(name).shape)
    if math.prod(shape) == 0:
        raise NumericalError(f"tensor {name!r} has no elements (shape {shape}), so {_UNMEASURABLE}; leave it out "
                             "of the plan or repair the checkpoint.")


def _ws(workspace: Workspace | None) -> Workspace:
    return workspace if workspace is not None else Workspace()


def _weight(source: ModelSource, name: str, ws: Workspace) -> tuple[Tensor, Tensor]:
    """``(W, squared row norms in float64)``: the tensor as float32 on CPU, read once per tensor.

    A tensor above ``io.rows.BOUNDED_MIN_BYTES`` stays in its STORED dtype (read block by block:
    2 GB for the bf16 248k embedding instead of 4 GB float32 + 2 GB of mapped pages), its row norms
    taken in float32 blocks.
    """
    if is_bounded(source.info(name)):
        def stored() -> tuple[Tensor, Tensor]:
            W = read_stored(source, name)
            return W, row_norm2_blocked(W)

        return ws.weights.get_or_make((source.fingerprint, name, "stored"), stored)

    def make() -> tuple[Tensor, Tensor]:
        W = source.read(name, device="cpu", dtype=torch.float32)
        return W, metrics.row_norm2(W)

    return ws.weights.get_or_make((source.fingerprint, name), make)


def _measure_fn(spec: registry.MethodSpec, source: ModelSource, name: str) -> Any:
    """The measurement of ``spec`` for tensor ``name``: its fast path, or the bounded one for a big tensor."""
    info = source.info(name)
    if not is_bounded(info):
        return spec.measure or registry.float32_measure
    if spec.measure_bounded is not None:
        return spec.measure_bounded
    if spec.row_separable:
        return row_block_measure
    able = ", ".join(s.name for s in registry.methods() if s.measure_bounded is not None or s.row_separable)
    raise ValueError(f"method {spec.name!r} needs tensor {name} whole in float32 ({4 * info.numel / 1e9:.1f} GB plus "
                     f"its reconstruction), above the {memory_bound(source) / 1e9:.1f} GB memory bound of this model; "
                     f"use one of the methods that measure it in blocks ({able}).")


def svd_of(source: ModelSource, name: str, device: str = "auto", workspace: Workspace | None = None
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Full thin SVD ``(U, S, Vh)`` of a 2-D tensor, computed once per workspace."""
    ws = _ws(workspace)
    W = _weight(source, name, ws)[0]
    if W.ndim != 2:
        raise ModelError(f"tensor {name} has shape {tuple(W.shape)}; low-rank methods need a 2-D weight matrix.")
    dev = resolve_device(device)
    return ws.factors.get_or_make((source.fingerprint, name, dev), lambda: svd_factors(W, device=dev))


class _Context:
    """What a method's fast ``measure(W, cfg, ctx)`` may ask for (cached in the workspace)."""

    def __init__(self, source: ModelSource, name: str, device: str, ws: Workspace, calib: Any, heldout: Any) -> None:
        self.source, self.name, self.device, self.ws = source, name, resolve_device(device), ws
        self.W, self.w_row2 = _weight(source, name, ws)
        metrics.check_row_norms(self.W, self.w_row2, f"tensor {name!r}", _UNMEASURABLE)
        self.calib, self._heldout = calib, heldout
        self._fp = (source.fingerprint, name)

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        return svd_of(self.source, self.name, self.device, self.ws)

    def cached(self, key: str, make: Any) -> Any:
        return self.ws.derived.get_or_make((*self._fp, self.device, key), make)

    def compress(self, cfg: Any) -> Any:
        key = (*self._fp, json.dumps(registry.config_to_dict(cfg), sort_keys=True), self.device,
               getattr(self.calib, "key", None))

        def make() -> Any:
            spec = registry.spec_of(cfg)
            if spec.compress_in is not None:  # e.g. SVD re-uses the cached factors (one SVD per tensor)
                return spec.compress_in(self, cfg)
            return registry.compress(self.W.to(self.device), cfg, self.calib)

        return self.ws.compressed.get_or_make(key, make)

    @property
    def _eval_stats(self) -> Any:
        return self._heldout if self._heldout is not None else self.calib

    def xtx(self) -> Tensor:
        """The evaluation second moment: the held-out split when there is one, else the fitting one
        (read once per tensor and split, then kept with the tensor's other constants)."""
        stats = self._eval_stats
        return self.cached(f"xtx:{getattr(stats, 'key', id(stats))}", lambda: stats.xtx)

    def wHw(self) -> float:
        """``tr(W H Wᵀ)`` of the evaluation statistics (float64, in float32 blocks of W: no float64 copy)."""
        stats = self._eval_stats
        return self.cached(f"wHw:{getattr(stats, 'key', id(stats))}", lambda: w_h_w(self.W, self.xtx()))


def _key(name: str, cfg: Any, calib_key: str | None) -> str:
    return json.dumps({"tensor": name, "config": registry.config_to_dict(cfg), "calib": calib_key}, sort_keys=True)


def projected(shape: Sequence[int], cfg: Any) -> dict:
    """Bytes, ratio (vs 16-bit) and bits per weight of ``cfg`` on ``shape`` from formulas alone (instant).

    Returns
    -------
    dict
        ``bytes``, ``original_bytes`` (2 per weight), ``ratio``, ``bits_per_weight``.
    """
    shape = tuple(int(s) for s in shape)
    nbytes = registry.projected_bytes(shape, cfg)
    numel = math.prod(shape)
    return {"bytes": nbytes, "original_bytes": 2 * numel, "ratio": 2 * numel / nbytes,
            "bits_per_weight": 8 * nbytes / numel}


def fit(source: ModelSource, name: str, cfg: Any) -> tuple[Any, dict]:
    """``cfg`` made to fit tensor ``name`` and the keys that say what changed (empty when nothing did)."""
    from sahc_core.io.components import classify

    info = source.info(name)
    comp = classify(name, source.architecture).component.value
    fitted, note = registry.fit_to_shape(info.shape, comp, cfg)
    if note is None:
        return cfg, {}
    keys: dict[str, Any] = {"note": note, "config_requested": registry.config_to_dict(cfg)}
    if hasattr(cfg, "group_size"):
        keys.update(group_size_requested=cfg.group_size, group_size=fitted.group_size)
    return fitted, keys


def _stats(calib: Any, name: str) -> tuple[Any, Any]:
    """``(fitting, held-out)`` statistics of weight ``name`` (either may be None)."""
    if calib is None:
        return None, None
    return calib.for_weight(name), calib.heldout_for_weight(name)


def measure_key(name: str, cfg: Any, calib: Any = None) -> str:
    """The cache key (kind ``whatif_measure``) of :func:`measure_tensor` for an already FITTED ``cfg``.

    The calibration key is part of it when ``calib`` has statistics for this tensor (either split),
    exactly as :func:`measure_tensor` stores it; callers that look many results up at once (the
    plan optimizer) build keys with this and read the rows in one query.
    """
    if calib is None:
        has = False
    elif hasattr(calib, "input_of"):  # CalibStats: from its index, without reading XᵀX
        has = calib.input_of(name) is not None
    else:
        has = any(s is not None for s in _stats(calib, name))
    return _key(name, cfg, getattr(calib, "key", None) if has else None)


def reconstruction(source: ModelSource, name: str, cfg: Any, device: str = "auto", workspace: Workspace | None = None,
                   calib: Any = None) -> Tensor:
    """``Ŵ`` of tensor ``name`` compressed with ``cfg`` (fitted first), float32 in the tensor's shape.

    The compressed tensor comes from the workspace's cache, so a setting that :func:`measure_tensor`
    just compressed (calibration-aware methods, TT) is not compressed again.
    """
    cfg, _ = fit(source, name, cfg)
    fit_stats = calib.for_weight(name) if calib is not None else None  # the compressed-cache key names it
    ctx = _Context(source, name, device, _ws(workspace), fit_stats, None)
    return ctx.compress(cfg).reconstruct(torch.float32).reshape(ctx.W.shape).to(ctx.W.device)


def measure_tensor(source: ModelSource, name: str, cfg: Any, cache: Cache | None = None, device: str = "auto",
                   workspace: Workspace | None = None, log: bool = True, calib: Any = None) -> dict:
    """Compress one tensor with ``cfg`` and measure it (the CLI ``measure`` contract).

    Parameters
    ----------
    source : ModelSource
    name : str
        Tensor name.
    cfg : config dataclass
        Any registered method's config; fitted to the tensor first (see the module docstring).
    cache : Cache, optional
        DuckDB cache: a stored result is returned without computing (``cached: True``); a new one is
        stored and its gate decisions go to the audit log.
    device : str
        Where the SVD runs (``"auto"``: GPU when present).
    workspace : Workspace, optional
        In-process caches (weights, SVD factors, ...); a private one when omitted.
    log : bool
        Write the gate decisions of a fresh measurement to the audit log (needs ``cache``).
    calib : calibration statistics, optional
        ``for_weight(name)`` / ``heldout_for_weight(name)`` and a ``key``; required by methods that
        need calibration (a clear error without), and gives ``output_error`` for every method.

    Returns
    -------
    dict
        ``tensor``, ``shape``, ``config``, ``bytes``, ``ratio``, ``bits_per_weight``, ``rel_error``,
        ``weight_cosine``, ``output_error`` (with ``calib``), ``gates`` (list of dicts), ``seconds``,
        ``cached``, the fitting keys (``note``, ``group_size_requested``, ``group_size``) when the
        setting was adapted, ``prequantized`` / ``prequantized_artifact`` / ``prequantized_note`` when
        the tensor already lies on a low-bit grid (``io.prequant``), plus method keys (int: ``predicted_error``; svd:
        ``rank``, ``trunc_error``, ``quant_error``, ``eym_error``, ``predicted_error``; tt: ``tt_shape``,
        ``predicted_error``).
    """
    info = source.info(name)
    _check_nonempty(source, name)
    cfg, fitted = fit(source, name, cfg)
    fit_stats, heldout = _stats(calib, name)
    spec = registry.spec_of(cfg)
    if spec.needs_calibration and fit_stats is None:
        raise registry.CalibrationRequired(
            f"method {spec.name!r} needs calibration statistics for {name}; add --calib (captured once, then "
            "cached) or tick 'use calibration statistics' on the page.")
    key = measure_key(name, cfg, calib)
    if cache is not None:
        hit = cache.get(_KIND_MEASURE, source.fingerprint, key, MEASURE_VERSION)
        if hit is not None:
            return {**hit, **fitted, "cached": True}
    t0 = time.perf_counter()
    fn = _measure_fn(spec, source, name)
    if is_bounded(info) and len(info.shape) != 2:
        raise ValueError(f"tensor {name} of shape {tuple(info.shape)} is above the in-memory size limit and not 2-D; "
                         "bounded measurements take 2-D weights only.")
    ws = _ws(workspace)
    ctx = _Context(source, name, device, ws, fit_stats, heldout)
    m = fn(ctx.W, cfg, ctx)
    if heldout is not None and fit_stats is not None:
        m["output_error_tokens"] = int(getattr(heldout, "n_tokens", 0))
    gates = tensor_gates(name, m)
    from sahc_core.io.prequant import artifact_note, tensor_grid

    out = {"tensor": name, "shape": list(info.shape), "config": registry.config_to_dict(cfg),
           "label": registry.label(cfg), **m, **artifact_note(tensor_grid(source, name), cfg),
           "gates": [g.to_dict() for g in gates], "seconds": time.perf_counter() - t0, "cached": False}
    if cache is not None:
        cache.put(_KIND_MEASURE, source.fingerprint, key, MEASURE_VERSION, out)
        if log:
            log_gates(cache, source.fingerprint, gates)
    return {**out, **fitted}


# ------------------------------------------------------------------------------ output cosine
def _model(source: ModelSource, device: str, ws: Workspace) -> tuple[Any, Any]:
    from sahc_core.evaluate.model import load_model

    dev = resolve_device(device)
    return ws.model((source.fingerprint, dev), lambda: load_model(source.path, device=dev))


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _inputs(source: ModelSource, model: Any, tokenizer: Any, text: str, module: str, n_tokens: int,
            ws: Workspace) -> Tensor:
    """Activations entering ``module`` (cached per fingerprint, module, text, n_tokens)."""
    from sahc_core.evaluate.activations import capture_inputs

    key = (source.fingerprint, module, _text_hash(text), n_tokens)
    return ws.activations.get_or_make(key, lambda: capture_inputs(model, tokenizer, text, module, n_tokens))


def _embedding_lookup_cosine(W: Tensor, W_hat: Tensor, tokenizer: Any, text: str, n_tokens: int) -> float:
    """Mean over the calibration tokens of cos(E[t], Ê[t]): the embedding layer's real outputs."""
    ids = torch.as_tensor(tokenizer(text[: 64 * n_tokens])["input_ids"][:n_tokens], dtype=torch.long)
    return metrics.row_cosine(W[ids], W_hat.to(W.device)[ids])


def _evaluated_name(source: ModelSource, model: Any, name: str) -> str:
    """The model's parameter name of checkpoint tensor ``name`` (``evaluate.names``); a clear error for a
    tensor the text model does not run (vision tower, MTP head)."""
    from sahc_core.evaluate.names import name_map_for

    names = name_map_for(source, model)
    model_name = names.model_name(name)
    if model_name is None:
        part = names.not_evaluated.get(name, "unknown")
        raise ModelError(f"{name} belongs to the {part} part, which the evaluated text model "
                         f"({names.model_class}) never runs, so it has no output cosine; pick a text-model tensor.")
    return model_name


def output_cosine_for(source: ModelSource, name: str, cfg: Any, model: tuple[Any, Any] | None = None,
                      calib_text: str | None = None, n_tokens: int = 2048, cache: Cache | None = None,
                      device: str = "auto", cos_threshold: float = 0.95, workspace: Workspace | None = None,
                      calib: Any = None) -> dict:
    """Output cosine of one compressed tensor on real calibration activations (runs the model).

    Linear layers: ``cos(W·x, Ŵ·x)`` per token (``metrics.output_cosine``) plus the cosine of the
    enclosing block's output (attention or MLP, ``evaluate.activations.attention_output_cosine``).
    Embedding: the cosine of the looked-up rows of the calibration tokens, and for a tied or separate
    LM head the cosine of the logits. The model is used under the workspace's lock and never
    modified (two sessions measuring at once each get their own Ŵ's numbers).

    Parameters
    ----------
    model : (model, tokenizer), optional
        A loaded model (``evaluate.model.load_model``); loaded once into the workspace when omitted.
    calib_text : str, optional
        Default: ``corpus.default_corpus().calib_text``.
    n_tokens : int
        Calibration tokens.
    calib : calibration statistics, optional
        Needed by calibration-aware methods (to compress).

    Returns
    -------
    dict
        ``tensor``, ``config``, ``n_tokens``, ``output_cosine``, then ``block_output_cosine`` and
        ``block`` (for attention projections also ``attention_output_cosine``) or, for an embedding,
        ``lm_head_output_cosine``; ``gates``, ``seconds``, ``cached``.
    """
    from sahc_core.evaluate.activations import attention_output_cosine
    from sahc_core.gates import cosine_gate
    from sahc_core.io.components import Component, classify

    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1, got {n_tokens}.")
    _check_nonempty(source, name)
    if model is None and 4 * source.num_params > memory_bound(source):  # loading it would break the bound
        raise ValueError(f"the output cosine runs the whole model in float32 ({4 * source.num_params / 1e9:.1f} GB), "
                         f"above this model's {memory_bound(source) / 1e9:.1f} GB memory bound; use the weight "
                         "numbers here and a run's layer-sequential gates for output quality.")
    if calib_text is None:
        from sahc_core.io.corpus import default_corpus

        calib_text = default_corpus().calib_text
    cfg, _ = fit(source, name, cfg)
    fit_stats, _ = _stats(calib, name)
    key = json.dumps({"tensor": name, "config": registry.config_to_dict(cfg), "n_tokens": n_tokens,
                      "text": _text_hash(calib_text), "threshold": cos_threshold,
                      "calib": getattr(calib, "key", None) if fit_stats is not None else None}, sort_keys=True)
    if cache is not None:
        hit = cache.get(_KIND_OUTCOS, source.fingerprint, key, MEASURE_VERSION)
        if hit is not None:
            return {**hit, "cached": True}
    t0 = time.perf_counter()
    ws = _ws(workspace)
    role = classify(name, source.architecture)
    ctx = _Context(source, name, device, ws, fit_stats, None)
    W = ctx.W
    W_hat = ctx.compress(cfg).reconstruct(torch.float32).reshape(W.shape).to(W.device)
    out: dict[str, Any] = {"tensor": name, "config": registry.config_to_dict(cfg), "component": role.component.value}
    values: dict[str, float] = {}
    with ws.model_lock:  # hooks on a shared model: one computation at a time
        net, tokenizer = model if model is not None else _model(source, device, ws)
        if role.component == Component.EMBEDDING and role.kind != "lm_head":
            values["output_cosine"] = _embedding_lookup_cosine(W, W_hat, tokenizer, calib_text, n_tokens)
            head = net.get_output_embeddings()
            if head is not None and head.weight.data_ptr() == net.get_input_embeddings().weight.data_ptr():
                X = _inputs(source, net, tokenizer, calib_text, "lm_head", n_tokens, ws)
                values["lm_head_output_cosine"] = metrics.output_cosine(W, W_hat, X)
            out["tied"] = head is not None and "lm_head_output_cosine" in values
        else:
            model_name = _evaluated_name(source, net, name)
            module = model_name.removesuffix(".weight")
            X = _inputs(source, net, tokenizer, calib_text, module, n_tokens, ws)
            values["output_cosine"] = metrics.output_cosine(W, W_hat, X)
            if "." in module:
                values["block_output_cosine"] = attention_output_cosine(net, tokenizer, calib_text, model_name,
                                                                        W_hat, n_tokens)
                out["block"] = module.rsplit(".", 1)[0]
                if role.component in (Component.ATTENTION_FULL, Component.ATTENTION_LINEAR):
                    values["attention_output_cosine"] = values["block_output_cosine"]
            out["n_tokens"] = int(X.shape[0])
    out.setdefault("n_tokens", n_tokens)
    gates = [cosine_gate(name, v, cos_threshold, gate=k, evidence={"config": out["config"]})
             for k, v in values.items() if k != "attention_output_cosine"]
    out.update(values)
    out.update(gates=[g.to_dict() for g in gates], seconds=time.perf_counter() - t0, cached=False)
    if cache is not None:
        cache.put(_KIND_OUTCOS, source.fingerprint, key, MEASURE_VERSION, out)
        log_gates(cache, source.fingerprint, gates)
    return out
