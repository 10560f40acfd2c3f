"""What-if service: compress one real tensor with one setting and report ratio, error, cosine, gates.

The What-if page and the CLI ``measure`` / ``sweep`` commands call these functions.

Speed (why the in-process caches exist): a slider move must answer in well under a second, so the
expensive parts are computed once per tensor and reused:

* the float32 weight and its row norms (``_WEIGHTS``, keyed by model fingerprint + tensor name);
* its full thin SVD ``(U, S, Vh)`` (``FACTORS``, an LRU keyed by fingerprint + name + device): a new
  rank or factor bit width only slices and quantizes the factors, it never re-runs the SVD; with
  ``W Vhᵀ`` (``_ROTATED``) a move then costs one m·r·n product (see ``_svd_measure``);
* calibration activations entering a linear layer (``_ACTIVATIONS``, per fingerprint + module).

Finished measurements are stored in the DuckDB cache under ``(fingerprint, tensor, plan-form config,
MEASURE_VERSION)``, so a repeated setting is a lookup, also across processes.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from sahc_core.cache import Cache
from sahc_core.device import resolve_device
from sahc_core.errors import ModelError
from sahc_core.gates import log_gates, tensor_gates
from sahc_core.methods.lowrank import (
    SVDConfig,
    factor_quant,
    lowrank,
    lowrank_bytes,
    resolve_rank,
    split_factors,
    svd_factors,
)
from sahc_core.methods.registry import compress, config_to_dict, measure, projected_bytes
from sahc_core.io.source import ModelSource
from sahc_core.methods.quant import QuantConfig, fake_quant_chunks, fake_quantize, quant_bytes

#: Bump when a measured number would change for the same inputs (invalidates cached rows).
MEASURE_VERSION = 1
_KIND_MEASURE = "whatif_measure"
_KIND_OUTCOS = "whatif_output_cosine"
#: Elements of Ŵ formed per block by :func:`_svd_measure` (16 MiB of float32: the block's norms are
#: taken while it is in cache, and no m×n temporary is allocated).
_BLOCK_ELEMS = 1 << 22


class LRU:
    """A small thread-safe least-recently-used map (Streamlit reruns may overlap)."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}.")
        self.maxsize, self._d, self._lock = maxsize, OrderedDict(), threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
            return self._d.get(key)

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


#: Thin SVD factors per (fingerprint, tensor, device); the embedding of a 135M model is 49152x576
#: (U: 113 MB in float32), so a handful fit in memory.
FACTORS = LRU(4)
_WEIGHTS, _ROTATED, _ACTIVATIONS, _MODELS, _COMPRESSED = LRU(4), LRU(2), LRU(8), LRU(1), LRU(2)


def clear_caches() -> None:
    """Drop every in-process cache (weights, SVD factors, activations, the loaded model)."""
    for c in (FACTORS, _WEIGHTS, _ROTATED, _ACTIVATIONS, _MODELS, _COMPRESSED):
        c.clear()


def _weight(source: ModelSource, name: str) -> tuple[Tensor, Tensor]:
    """``(W, squared row norms in float64)``: the tensor as float32 on CPU, read once per tensor."""
    key = (source.fingerprint, name)
    hit = _WEIGHTS.get(key)
    if hit is None:
        W = source.read(name, device="cpu", dtype=torch.float32)
        rows = W.reshape(-1, W.shape[-1]) if W.ndim else W.reshape(1, 1)
        hit = (W, torch.linalg.vector_norm(rows, dim=1).double().square())
        _WEIGHTS.put(key, hit)
    return hit


def _matrix(source: ModelSource, name: str) -> Tensor:
    W = _weight(source, name)[0]
    if W.ndim != 2:
        raise ModelError(f"tensor {name} has shape {tuple(W.shape)}; low-rank and TT need a 2-D weight matrix.")
    return W


def svd_of(source: ModelSource, name: str, device: str = "auto", factors_cache: LRU | None = FACTORS
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Full thin SVD ``(U, S, Vh)`` of a 2-D tensor, computed once and kept in ``factors_cache``."""
    dev = resolve_device(device)
    key = (source.fingerprint, name, dev)
    hit = factors_cache.get(key) if factors_cache is not None else None
    if hit is not None:
        return hit
    factors = svd_factors(_matrix(source, name), device=dev)
    if factors_cache is not None:
        factors_cache.put(key, factors)
    return factors


def _compressed(source: ModelSource, name: str, cfg: Any, device: str, factors_cache: LRU | None
                ) -> tuple[Tensor, Any, tuple[Tensor, Tensor, Tensor] | None]:
    """``(W, compress(W, cfg), SVD factors or None)``; an SVD config reuses the cached factors.

    The last few compressed tensors are kept (``_COMPRESSED``) so that measuring a setting and then
    its output cosine compresses once (a TT decomposition of an embedding takes seconds).
    """
    key = (source.fingerprint, name, _key(name, cfg), resolve_device(device))
    hit = _COMPRESSED.get(key)
    if isinstance(cfg, SVDConfig):
        W = _matrix(source, name)
        factors = svd_of(source, name, device, factors_cache)
        c = hit if hit is not None else lowrank(W, cfg, factors=factors)
    else:
        W, factors = _weight(source, name)[0], None
        c = hit if hit is not None else compress(W, cfg)
    _COMPRESSED.put(key, c)
    return W, c, factors


def _rotated(source: ModelSource, name: str, factors: tuple[Tensor, Tensor, Tensor]) -> dict:
    """Per-tensor constants of the fast SVD path (cached next to the factors).

    ``WV = W Vhᵀ`` (m, n); ``tail_col2[j] =
    ||WV[:, j]||²`` and ``head_col2[j] = ||WV[:, j] - σ_j U[:, j]||²`` so that the measured truncation
    error of any rank r is ``sum(head_col2[:r]) + sum(tail_col2[r:])`` without touching the matrix.
    """
    U, S, Vh = factors
    key = (source.fingerprint, name, str(Vh.device), "rot")
    hit = _ROTATED.get(key)
    if hit is None:
        WV = _matrix(source, name).to(Vh.device) @ Vh.T
        hit = {"WV": WV, "tail_col2": torch.linalg.vector_norm(WV, dim=0).double().square(),
               "head_col2": torch.linalg.vector_norm(WV - U * S, dim=0).double().square()}
        _ROTATED.put(key, hit)
    return hit


def _from_rows(W: Tensor, method: str, nbytes: int, w_row2: Tensor, h_row2: Tensor, e_row2: Tensor) -> dict:
    """The ``methods.measure`` base keys from squared row norms of W, Ŵ and W - Ŵ (float64).

    Row cosine from ``<w, ŵ> = (|w|² + |ŵ|² - |w - ŵ|²) / 2``; a zero row counts 1 if both are zero.
    """
    dot = (w_row2 + h_row2 - e_row2) / 2
    den = (w_row2 * h_row2).sqrt()
    cos = torch.where(den > 0, dot / den.clamp_min(1e-300), ((w_row2 == 0) & (h_row2 == 0)).double())
    w2, numel = float(w_row2.sum()), W.numel()
    return {"method": method, "bytes": int(nbytes), "ratio": 2 * numel / nbytes,
            "bits_per_weight": 8 * nbytes / numel, "weight_cosine": float(cos.mean()),
            "rel_error": math.sqrt(float(e_row2.sum()) / w2) if w2 > 0 else 1.0}


def _norm2(x: Tensor, dim: int | None = None) -> Tensor:
    """Squared 2-norm (over ``dim`` or all) of a float32 tensor, summed per row in float32, then float64."""
    return torch.linalg.vector_norm(x, dim=dim).double().square()


def _rows(x: Tensor) -> Tensor:
    """The ``(rows, last dim)`` view that row norms and quantization groups refer to."""
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


def _fast_measure(W: Tensor, c: Any, w_row2: Tensor) -> dict:
    """``methods.measure`` for TT / keep: float32 passes with float64 sums.

    Hand-written for speed: ``methods.measure`` casts both matrices to float64 several times (about
    3 s per move on the 49152x576 embedding of a busy 2-core CPU). Agrees to float32 rounding (tested).
    """
    W_hat = c.reconstruct(torch.float32).reshape(W.shape)
    out = _from_rows(W, c.meta()["method"], c.nbytes, w_row2, _norm2(_rows(W_hat), 1), _norm2(_rows(W - W_hat), 1))
    if hasattr(c, "tt_shape"):
        out.update(tt_shape=c.tt_shape, padded_rows=c.padded_rows, padded_cols=c.padded_cols)
    return out


def _int_measure(W: Tensor, cfg: QuantConfig, w_row2: Tensor) -> dict:
    """``methods.measure`` numbers of int-k quantization, plus the rounding-noise prediction.

    Hand-written for speed (an int slider move): the dequantized weights come block by block from
    :func:`quant.fake_quant_chunks` (bit-identical to ``dequantize(quantize(W))``, without packing the
    codes) and their row norms are taken while each block is in cache; bytes from the exact formula.
    """
    x = _rows(W)
    h_row2 = torch.empty(x.shape[0], dtype=torch.float64, device=W.device)
    e_row2, step2, n_groups = torch.empty_like(h_row2), 0.0, 0
    for c in fake_quant_chunks(x, cfg):
        h_row2[c.rows] = _norm2(c.w_hat, 1)
        e_row2[c.rows] = _norm2(c.w_hat.sub_(c.w), 1)
        step2 += float(c.scales.double().square().sum())
        n_groups += c.scales.numel()
    out = _from_rows(W, "int", quant_bytes(tuple(W.shape), cfg), w_row2, h_row2, e_row2)
    out["quant_error"] = out["rel_error"]
    out.update(_int_prediction(W.numel() // n_groups, step2, float(w_row2.sum())))
    return out


def _svd_measure(W: Tensor, cfg: SVDConfig, factors: tuple[Tensor, Tensor, Tensor], rot: dict, w_row2: Tensor) -> dict:
    """``methods.measure`` numbers of ``lowrank(W, cfg)`` for m >= n, computed in the right-singular basis.

    Hand-written for speed (a slider move must not redo two m×n products and six float64 passes):
    for m >= n, ``Vh`` is square orthogonal, so right-multiplying by ``Vhᵀ`` keeps every Frobenius
    norm, row norm and row dot product. In that basis ``W_r = [U_r S_r, 0]`` and ``Ŵ Vhᵀ = ûᵀ (v̂ Vhᵀ)``
    is the one m·r·n product per move; with ``E = WV - ŴV``: total² = ||E||², quant² = ||W_r - Ŵ||² =
    ||E[:, :r]||² + ||ŴV[:, r:]||² (up to the float32 residual ``WV[:, :r] - U_r S_r`` of the SVD,
    ~1e-6 relative), trunc² from cached column norms. At full rank (r = n) there is nothing to split, so
    the rotation is skipped and ``W - Ŵ`` is measured directly. The factors are quantized with
    :func:`quant.fake_quantize` (bit-identical to the stored codes, without packing); ``Ŵ`` is formed
    in blocks of rows whose norms are taken while the block is in cache. Agrees with
    ``methods.measure`` (tested).
    """
    _, S, Vh = factors
    m, n = W.shape
    r, dev, q = resolve_rank(tuple(W.shape), cfg), Vh.device, factor_quant(m, n, cfg)
    u, v = split_factors(factors, r)
    u_hat, v_hat = (f.half().float() if q is None else fake_quantize(f, q) for f in (u, v))
    full = r == n
    right = v_hat if full else v_hat @ Vh.T     # (r, n): Ŵ = ûᵀ right, in the original or rotated basis
    target = W.to(dev) if full else rot["WV"]   # W, or W Vhᵀ
    h_row2 = torch.empty(m, dtype=torch.float64, device=dev)
    e_row2, head2, tail2 = torch.empty_like(h_row2), 0.0, 0.0
    step = max(1, _BLOCK_ELEMS // n)
    for i in range(0, m, step):
        Wh = u_hat[:, i:i + step].T @ right    # (b, n) block of Ŵ (Vhᵀ)
        h_row2[i:i + step] = _norm2(Wh, 1)
        if not full:
            tail2 += float(_norm2(Wh[:, r:]))
        E = Wh.sub_(target[i:i + step])         # in place: -(W - Ŵ) block
        e_row2[i:i + step] = _norm2(E, 1)
        if not full:
            head2 += float(_norm2(E[:, :r]))
    out = _from_rows(W, "svd", lowrank_bytes(tuple(W.shape), cfg), w_row2.to(dev), h_row2, e_row2)
    w2, s2 = float(w_row2.sum()), S.double().square()
    rel = (lambda x2: math.sqrt(max(x2, 0.0) / w2) if w2 > 0 else 1.0)  # noqa: E731
    return {**out, "rank": r, "trunc_error": rel(float(rot["head_col2"][:r].sum() + rot["tail_col2"][r:].sum())),
            "eym_error": math.sqrt(float(s2[r:].sum()) / float(s2.sum())) if float(s2.sum()) > 0 else 1.0,
            "quant_error": rel(float(e_row2.sum()) if full else head2 + tail2)}


def _key(name: str, cfg: Any) -> str:
    return json.dumps({"tensor": name, "config": config_to_dict(cfg)}, sort_keys=True)


def _int_prediction(per_group: int, step2: float, w2: float) -> dict:
    """Uniform rounding-noise model of RTN quantization: E||e||² = Σ_g n_g Δ_g² / 12.

    ``Δ_g`` is the stored scale (grid step) of group g (``step2`` = Σ_g Δ_g², each group holding
    ``per_group`` weights); each error is uniform on [-Δ/2, Δ/2] when the weights are spread over many
    steps (Widrow & Kollár, *Quantization Noise*, 2008).
    """
    norm = math.sqrt(w2)
    pred = math.sqrt(per_group * step2 / 12.0) / norm if norm > 0 else 0.0
    return {"predicted_error": pred, "prediction": "uniform rounding noise sqrt(sum_g n_g step_g^2 / 12) / ||W||"}


def projected(shape: Sequence[int], cfg: Any) -> dict:
    """Bytes, ratio (vs 16-bit) and bits per weight of ``cfg`` on ``shape`` from formulas alone (instant).

    Returns
    -------
    dict
        ``bytes``, ``original_bytes`` (2 per weight), ``ratio``, ``bits_per_weight``.
    """
    shape = tuple(int(s) for s in shape)
    nbytes = projected_bytes(shape, cfg)
    numel = math.prod(shape)
    return {"bytes": nbytes, "original_bytes": 2 * numel, "ratio": 2 * numel / nbytes,
            "bits_per_weight": 8 * nbytes / numel}


def measure_tensor(source: ModelSource, name: str, cfg: Any, cache: Cache | None = None, device: str = "auto",
                   factors_cache: LRU | None = FACTORS, log: bool = True) -> dict:
    """Compress one tensor with ``cfg`` and measure it (the CLI ``measure`` contract).

    Parameters
    ----------
    source : ModelSource
    name : str
        Tensor name.
    cfg : config dataclass
        ``QuantConfig``, ``SVDConfig``, ``TTConfig`` or ``KeepConfig``.
    cache : Cache, optional
        DuckDB cache: a stored result is returned without computing (``cached: True``); a new one is
        stored and its gate decisions go to the audit log.
    device : str
        Where the SVD runs (``"auto"``: GPU when present).
    factors_cache : LRU, optional
        In-process SVD factor cache (default the module's ``FACTORS``; ``None`` disables it).
    log : bool
        Write the gate decisions of a fresh measurement to the audit log (needs ``cache``).

    Returns
    -------
    dict
        ``tensor``, ``shape``, ``config``, ``bytes``, ``ratio``, ``bits_per_weight``, ``rel_error``,
        ``weight_cosine``, ``gates`` (list of dicts), ``seconds``, ``cached``, plus method keys
        (int: ``quant_error``, ``predicted_error``; svd: ``rank``, ``trunc_error``, ``quant_error``,
        ``eym_error``; tt: ``tt_shape``).
    """
    info = source.info(name)
    key = _key(name, cfg)
    if cache is not None:
        hit = cache.get(_KIND_MEASURE, source.fingerprint, key, MEASURE_VERSION)
        if hit is not None:
            return {**hit, "cached": True}
    t0 = time.perf_counter()
    W, w_row2 = _weight(source, name)
    if isinstance(cfg, QuantConfig):
        m = _int_measure(W, cfg, w_row2)
    elif isinstance(cfg, SVDConfig) and W.ndim == 2 and W.shape[0] >= W.shape[1]:
        factors = svd_of(source, name, device, factors_cache)
        m = _svd_measure(W, cfg, factors, _rotated(source, name, factors), w_row2)
    else:
        W, c, factors = _compressed(source, name, cfg, device, factors_cache)
        # m < n low-rank: the registry's measure (splits the error; such tensors are small)
        m = measure(W, cfg, compressed=c) if factors is not None else _fast_measure(W, c, w_row2)
    gates = tensor_gates(name, m)
    out = {"tensor": name, "shape": list(info.shape), "config": config_to_dict(cfg), **m,
           "gates": [g.to_dict() for g in gates], "seconds": time.perf_counter() - t0, "cached": False}
    if cache is not None:
        cache.put(_KIND_MEASURE, source.fingerprint, key, MEASURE_VERSION, out)
        if log:
            log_gates(cache, source.fingerprint, gates)
    return out


# ------------------------------------------------------------------------------ output cosine
def _model(source: ModelSource, device: str) -> tuple[Any, Any]:
    from sahc_core.evaluate.model import load_model

    key = (source.fingerprint, resolve_device(device))
    hit = _MODELS.get(key)
    if hit is None:
        hit = load_model(source.path, device=device)
        _MODELS.put(key, hit)
    return hit


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _inputs(source: ModelSource, model: Any, tokenizer: Any, text: str, module: str, n_tokens: int) -> Tensor:
    """Activations entering ``module`` (cached per fingerprint, module, text, n_tokens)."""
    from sahc_core.evaluate.activations import capture_inputs

    key = (source.fingerprint, module, _text_hash(text), n_tokens)
    X = _ACTIVATIONS.get(key)
    if X is None:
        X = capture_inputs(model, tokenizer, text, module, n_tokens)
        _ACTIVATIONS.put(key, X)
    return X


def _embedding_lookup_cosine(W: Tensor, W_hat: Tensor, tokenizer: Any, text: str, n_tokens: int) -> float:
    """Mean over the calibration tokens of cos(E[t], Ê[t]): the embedding layer's real outputs."""
    from sahc_core.methods.registry import row_cosine

    ids = torch.as_tensor(tokenizer(text[: 64 * n_tokens])["input_ids"][:n_tokens], dtype=torch.long)
    return row_cosine(W[ids], W_hat.to(W.device)[ids])


def output_cosine_for(source: ModelSource, name: str, cfg: Any, model: tuple[Any, Any] | None = None,
                      calib_text: str | None = None, n_tokens: int = 2048, cache: Cache | None = None,
                      device: str = "auto", cos_threshold: float = 0.95) -> dict:
    """Output cosine of one compressed tensor on real calibration activations (runs the model).

    Linear layers: ``cos(W·x, Ŵ·x)`` per token (``evaluate.output_cosine``) plus the cosine of the
    enclosing block's output (attention or MLP, ``evaluate.attention_output_cosine``). Embedding:
    the cosine of the looked-up rows of the calibration tokens, and for a tied or separate LM head the
    cosine of the logits.

    Parameters
    ----------
    model : (model, tokenizer), optional
        A loaded model (``evaluate.load_model``); loaded once and kept when omitted.
    calib_text : str, optional
        Default: ``corpus.default_corpus().calib_text``.
    n_tokens : int
        Calibration tokens.

    Returns
    -------
    dict
        ``tensor``, ``config``, ``n_tokens``, ``output_cosine``, then ``block_output_cosine`` and
        ``block`` (for attention projections also ``attention_output_cosine``) or, for an embedding,
        ``lm_head_output_cosine``; ``gates``, ``seconds``, ``cached``.
    """
    from sahc_core.io.components import Component, classify
    from sahc_core.evaluate.activations import attention_output_cosine
    from sahc_core.evaluate.metrics import output_cosine
    from sahc_core.gates import cosine_gate

    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1, got {n_tokens}.")
    if calib_text is None:
        from sahc_core.io.corpus import default_corpus

        calib_text = default_corpus().calib_text
    key = json.dumps({"tensor": name, "config": config_to_dict(cfg), "n_tokens": n_tokens,
                      "text": _text_hash(calib_text), "threshold": cos_threshold}, sort_keys=True)
    if cache is not None:
        hit = cache.get(_KIND_OUTCOS, source.fingerprint, key, MEASURE_VERSION)
        if hit is not None:
            return {**hit, "cached": True}
    t0 = time.perf_counter()
    role = classify(name, source.architecture)
    net, tokenizer = model if model is not None else _model(source, device)
    W, c, _ = _compressed(source, name, cfg, device, FACTORS)
    W_hat = c.reconstruct(torch.float32).reshape(W.shape).to(W.device)
    out: dict[str, Any] = {"tensor": name, "config": config_to_dict(cfg), "component": role.component.value}
    values: dict[str, float] = {}
    if role.component == Component.EMBEDDING and role.kind != "lm_head":
        values["output_cosine"] = _embedding_lookup_cosine(W, W_hat, tokenizer, calib_text, n_tokens)
        head = net.get_output_embeddings()
        if head is not None and head.weight.data_ptr() == net.get_input_embeddings().weight.data_ptr():
            X = _inputs(source, net, tokenizer, calib_text, "lm_head", n_tokens)
            values["lm_head_output_cosine"] = output_cosine(W, W_hat, X)
        out["tied"] = head is not None and "lm_head_output_cosine" in values
    else:
        module = name.removesuffix(".weight")
        X = _inputs(source, net, tokenizer, calib_text, module, n_tokens)
        values["output_cosine"] = output_cosine(W, W_hat, X)
        if "." in module:
            values["block_output_cosine"] = attention_output_cosine(net, tokenizer, calib_text, name, W_hat, n_tokens)
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
