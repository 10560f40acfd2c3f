"""Calibration statistics captured once per (model fingerprint, calibration text, config), kept on disk.

Layout: ``<cache file's folder>/calib/<model fingerprint>/<sha256(key)[:16]>/`` holds ``index.json``
and one safetensors shard per decoder layer (``model.layers.3.safetensors``), the LM head's and the
embedding's token counts (``embedding.safetensors``). A row in the cache's ``results`` table
(kind :data:`KIND`, the model fingerprint, key = :meth:`CalibConfig.key`) points at the folder.

* A second call is a lookup: the folder is found through the row (or, without one, at its
  deterministic path) and checked (:func:`~sahc_core.calib.stats.read_index`: index readable, every
  shard present with its recorded size); nothing is recomputed.
* A changed model has another fingerprint, hence another folder: old statistics are never reused.
* A missing, truncated or unreadable folder behind a row is captured again and replaces it.
* Writes are atomic: the shards go to a temporary sibling folder that is renamed into place once
  complete; a concurrent capture of the same statistics keeps whichever folder landed first.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from sahc_core.cache import Cache, utcnow
from sahc_core.calib.capture import capture_stats
from sahc_core.calib.stats import (FORMAT_VERSION, INDEX_FILE, LAYOUT, SPLITS, STORE_DTYPES, CalibConfig, CalibStats,
                                   pack_symmetric, read_index)
from sahc_core.device import resolve_device
from sahc_core.errors import CacheError, CorpusError
from sahc_core.evaluate.model import DTYPES, _max_positions, _model_device
from sahc_core.evaluate.perplexity import DEFAULT_WINDOW
from sahc_core.evaluate.tokens import token_ids
from sahc_core.io.source import ModelSource
from sahc_core.paths import contained, mark_owned, remove_owned

KIND = "calib_stats"
EMBEDDING_SHARD = "embedding.safetensors"


def text_sha256(text: str) -> str:
    """sha256 hex of the UTF-8 calibration text (part of the cache key)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stats_dir(cache: Cache, model_fp: str, key: str) -> Path:
    """Deterministic folder of the statistics with ``key`` for the model ``model_fp``."""
    return cache.path.parent / "calib" / model_fp / hashlib.sha256(key.encode()).hexdigest()[:16]


def calibration_stats(source: ModelSource, cache: Cache, text: str | None = None, cfg: CalibConfig = CalibConfig(), *,
                      model: nn.Module | None = None, tokenizer: Any = None,
                      progress: Callable[[int, int], None] | None = None, device: str = "auto",
                      offload: bool | None = None) -> CalibStats:
    """Calibration statistics of ``source`` on ``text``: looked up, or captured once and stored.

    Parameters
    ----------
    source : ModelSource
        The model (its fingerprint keys the statistics).
    cache : Cache
        The result store; the statistics live under its folder.
    text : str, optional
        Calibration text; default ``default_corpus().calib_text`` (Hamlet, Twelfth Night, Sonnets).
    cfg : CalibConfig
    model, tokenizer : optional
        The loaded model and tokenizer of ``source`` (both, e.g. from ``load_model``), to save a load;
        they must be ``source``'s. Default: loaded on ``device`` in ``cfg.dtype`` when a capture is needed.
    progress : callable, optional
        ``progress(turns_done, turns_total)`` during a capture (decoder layers + LM head).
    device : str
        Where the capture runs when the model is loaded here (``auto``: GPU when present).
    offload : bool, optional
        Capture with an empty model that holds one decoder layer at a time, read from the checkpoint
        (:mod:`sahc_core.evaluate.offload`; a model larger than RAM), instead of loading it whole.
        ``None`` (default): decided like a run's ``--offload auto`` (layer by layer when the model in
        ``cfg.dtype`` would not fit in the available memory).

    Returns
    -------
    CalibStats
        The fitting split's view (``.heldout`` for the other split).

    Raises
    ------
    CorpusError
        When the text has fewer than ``cfg.tokens + cfg.heldout_tokens`` tokens.
    """
    if (model is None) != (tokenizer is None):
        raise ValueError("give both model and tokenizer (as load_model returns them), or neither.")
    if model is not None and next(model.parameters()).dtype != DTYPES[cfg.dtype]:
        raise ValueError(f"the model runs in {next(model.parameters()).dtype} but the config asks for {cfg.dtype}; "
                         "load it in that dtype or change CalibConfig.dtype.")
    if text is None:
        from sahc_core.io.corpus import default_corpus

        text = default_corpus().calib_text
    key = cfg.key(text_sha256(text))
    row = cache.get(KIND, source.fingerprint, key, FORMAT_VERSION)
    folder = contained(cache.path.parent, row["dir"], "calibration folder") if row else \
        stats_dir(cache, source.fingerprint, key)  # a cached row names a folder inside the cache folder only
    stats = _open(folder, key)
    if stats is None:
        prepare = None
        if model is None and offload is None:
            from sahc_core.evaluate.evaluator import plan_offload
            from sahc_core.evaluate.names import name_map_for
            from sahc_core.evaluate.perplexity import PplConfig

            offload = plan_offload("auto", source, name_map_for(source), PplConfig(window=cfg.window, dtype=cfg.dtype),
                                   device).offload
        if model is None and offload:
            from sahc_core.evaluate.model import load_tokenizer
            from sahc_core.evaluate.names import empty_model, name_map_for
            from sahc_core.evaluate.offload import LayerLoader
            from sahc_core.evaluate.weights import CheckpointWeights

            model, tokenizer = empty_model(source.path, cfg.dtype), load_tokenizer(source.path)
            prepare = LayerLoader(model, CheckpointWeights(source), name_map_for(source, model), resolve_device(device))
        elif model is None:
            from sahc_core.evaluate.model import load_model

            model, tokenizer = load_model(source.path, device=device, dtype=cfg.dtype)
        stats = _capture(folder, source, text, key, cfg, model, tokenizer, progress, prepare)
    if row is None or stats.meta["created_at"] != row["meta"]["created_at"]:
        if not cache.read_only:
            cache.put(KIND, source.fingerprint, key, FORMAT_VERSION,
                      {"dir": str(folder.relative_to(cache.path.parent)), "meta": stats.meta})
    return stats


def _open(folder: Path, key: str) -> CalibStats | None:
    """The statistics with ``key`` stored in ``folder``, or None when it is missing, incomplete, corrupt
    or holds other statistics."""
    try:
        stats = CalibStats(folder, index=read_index(folder))
    except CacheError:
        return None
    return stats if stats.meta.get("key") == key else None


def _windows(ids: Tensor, window: int) -> list[Tensor]:
    return [ids[i : i + window].unsqueeze(0) for i in range(0, ids.numel(), window)]


def _aliases(model: nn.Module, source: ModelSource) -> dict[int, list[str]]:
    """Parameter id -> every name of it: state-dict names (a tied LM head and its embedding share one)
    and the checkpoint's name where the model's differs (Qwen3.5: ``model.language_model.layers.N`` in
    the file, ``model.layers.N`` in ``Qwen3_5ForCausalLM``; Gemma 3: ``language_model.model.X`` vs
    ``model.language_model.X``), from the family's explicit name map (``evaluate.names``)."""
    from sahc_core.evaluate.names import name_map_for

    names = name_map_for(source, model)
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases = out.setdefault(id(p), [])
        aliases.append(name)
        ckpt = names.checkpoint_name(name)
        if ckpt is not None and ckpt != name:
            aliases.append(ckpt)
    return out


def _capture(folder: Path, source: ModelSource, text: str, key: str, cfg: CalibConfig, model: nn.Module, tokenizer: Any,
             progress: Callable[[int, int], None] | None, prepare: Any = None) -> CalibStats:
    """Capture both splits into a temporary folder, then rename it to ``folder``."""
    start = time.perf_counter()
    need = cfg.tokens + cfg.heldout_tokens
    ids = token_ids(tokenizer, text, max_tokens=need)  # streamed: a long text is never tokenized whole
    if ids.numel() < need:
        raise CorpusError(f"the calibration text has {ids.numel()} tokens but {cfg.tokens} fitting + "
                          f"{cfg.heldout_tokens} held-out tokens were asked for; give a longer text or fewer tokens.")
    limit = _max_positions(model)
    window = cfg.window or min(DEFAULT_WINDOW, limit or DEFAULT_WINDOW)
    if limit is not None and window > limit:
        raise ValueError(f"window {window} exceeds the model's maximum of {limit} positions.")
    splits = {"fit": ids[: cfg.tokens], "heldout": ids[cfg.tokens : need]}
    splits = {s: v for s, v in splits.items() if v.numel()}
    windows, split_of = [], []
    for split, part in splits.items():
        for w in _windows(part, window):
            windows.append(w)
            split_of.append(split)

    aliases = _aliases(model, source)
    params = dict(model.named_parameters(remove_duplicate=False))
    store = STORE_DTYPES[cfg.store_dtype]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = mark_owned(folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    index: dict[str, Any] = {"format": FORMAT_VERSION, "layout": LAYOUT, "inputs": {}, "weights": {}, "files": {}}

    def write(_index: int, name: str, tensors: dict[str, Tensor], inputs: dict[str, dict[str, Any]]) -> None:
        shard = f"{name}.safetensors"
        xtx = {f"{s}/{g}" for s in SPLITS for g in inputs}  # the rest are per-channel extras
        save_file({k: (pack_symmetric(v.to(store)) if k in xtx else v.to(store)).contiguous()
                   for k, v in tensors.items()}, str(tmp / shard))
        index["files"][shard] = (tmp / shard).stat().st_size
        for group, info in inputs.items():
            index["inputs"][group] = {"shard": shard, "in_features": info["in_features"], "tokens": info["tokens"]}
            for weight in info["weights"]:
                for alias in aliases.get(id(params[weight]), [weight]):
                    index["weights"][alias] = group

    try:
        capture_stats(model, windows, split_of, write, extras=cfg.extras, progress=progress, prepare=prepare)
        embedding = model.get_input_embeddings()
        vocab = embedding.weight.shape[0]
        counts = {f"{s}/token_counts": torch.bincount(v, minlength=vocab) for s, v in splits.items()}
        if any(c.numel() != vocab for c in counts.values()):
            raise CorpusError(f"the tokenizer gives token ids beyond the model's vocabulary of {vocab}; use the "
                              "model's own tokenizer.")
        save_file(counts, str(tmp / EMBEDDING_SHARD))
        index["files"][EMBEDDING_SHARD] = (tmp / EMBEDDING_SHARD).stat().st_size
        index["embedding"] = {"shard": EMBEDDING_SHARD, "vocab": vocab, "weights": aliases[id(embedding.weight)]}
        index["splits"] = {s: {"tokens": int(v.numel()), "windows": split_of.count(s)} for s, v in splits.items()}
        index["meta"] = {
            "tokens": cfg.tokens, "heldout_tokens": cfg.heldout_tokens, "window": window, "key": key,
            "windows": {s: split_of.count(s) for s in splits}, "text_sha256": text_sha256(text),
            "model_fp": source.fingerprint, "config": dataclasses.asdict(cfg), "device": str(prepare.device if prepare is not None else _model_device(model)),
            "seconds": time.perf_counter() - start, "bytes": sum(index["files"].values()),
            "created_at": utcnow().isoformat(),
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True), encoding="utf-8")
        _install(tmp, folder, key)
    finally:
        remove_owned(tmp)  # (gone once installed)
    stats = _open(folder, key)
    assert stats is not None, "a freshly installed statistics folder must open"
    return stats


def _install(tmp: Path, folder: Path, key: str) -> None:
    """Rename the complete ``tmp`` into ``folder``; a valid folder already there (a concurrent capture) wins."""
    if folder.exists():
        if _open(folder, key) is not None:
            return
        remove_owned(folder, "calibration folder")  # incomplete or corrupt: replaced (only if SAHC made it)
    try:
        tmp.rename(folder)
    except OSError:  # another process renamed its copy in between
        if _open(folder, key) is None:
            raise
