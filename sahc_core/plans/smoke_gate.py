"""The run's forward smoke test, predicted per option: the inputs it sees, once, and the cosines of one Ŵ.

A run judges every linear / embedding module by the mean per-token cosine of its output with W vs Ŵ
on the first ``SMOKE_TOKENS`` tokens of the calibration text, with the ORIGINAL model's activations
(:mod:`sahc_core.evaluate.smoke`). :func:`capture_gate_inputs` records those activations (every
linear's input, shared inputs once, and the token ids) in one forward pass; :func:`gate_numbers`
then gives the same cosines for any Ŵ without running the model, so the optimizer can treat the
gate as a constraint on each candidate.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sahc_core import metrics


@dataclass
class GateInputs:
    """What the predicted smoke test needs, from ONE forward pass of the original model.

    Attributes
    ----------
    usages : dict
        Stored weight name -> ``[(module name, "linear" | "embedding"), ...]``: every module that
        uses it (a tied embedding: the lookup and the LM head).
    inputs : dict
        Linear module name -> ``(N, in_features)`` float32 inputs on the smoke tokens (shared
        inputs are stored once).
    ids : Tensor
        ``(N,)`` token ids of the smoke windows (the embedding lookups).
    text_key : str
        Hash of the text and the token count (part of the cache key).
    """

    usages: dict[str, list[tuple[str, str]]]
    inputs: dict[str, Tensor] = field(default_factory=dict)
    ids: Tensor | None = None
    text_key: str = ""


def weight_usages(model: nn.Module) -> dict[str, list[tuple[str, str]]]:
    """Stored weight name -> the linear / embedding modules that use it (tied weights: several)."""
    names: dict[int, str] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), pname)  # the first name of a tied parameter is the stored one
    out: dict[str, list[tuple[str, str]]] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            kind = "embedding" if isinstance(module, nn.Embedding) else "linear"
            out.setdefault(names[id(module.weight)], []).append((mod_name, kind))
    return out


def model_loader(path: str | Path, device: str) -> Callable[[], tuple[Any, Any]]:
    """A memoised ``load() -> (model, tokenizer)`` (``evaluate.load_model`` on first call), shared by the
    optimizer's sensitivity pass and the gate inputs."""
    box: list[tuple[Any, Any]] = []

    def load() -> tuple[Any, Any]:
        if not box:
            from sahc_core.evaluate.model import load_model

            box.append(load_model(path, device=device))
        return box[0]

    return load


def text_key(text: str, n_tokens: int) -> str:
    """Identity of the smoke tokens: the text's sha256 prefix and the token count."""
    return f"{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}:{n_tokens}"


def capture_gate_inputs(model: nn.Module, tokenizer: Any, text: str, n_tokens: int) -> GateInputs:
    """Inputs of every linear and the token ids over the smoke test's windows (``evaluate.smoke``'s)."""
    from sahc_core.evaluate.activations import _capture_windows
    from sahc_core.evaluate.model import _model_device

    usages = weight_usages(model)
    per_module: dict[str, list[Tensor]] = {}
    handles, window_cache = [], {}
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(_m: nn.Module, args: tuple, mod_name: str = mod_name, n: int = module.in_features) -> None:
                x = args[0]
                if id(x) not in window_cache:  # q/k/v (and gate/up) read one tensor: stored once;
                    # x itself is held until the window ends, so its id cannot be reused meanwhile
                    window_cache[id(x)] = (x, x.detach().reshape(-1, n).float().cpu())
                per_module.setdefault(mod_name, []).append(window_cache[id(x)][1])
            handles.append(module.register_forward_pre_hook(hook))
    windows = _capture_windows(model, tokenizer, text, n_tokens)
    try:
        with torch.inference_mode():
            for x in windows:
                window_cache.clear()
                model(input_ids=x.to(_model_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    joined: dict[int, Tensor] = {}
    inputs = {}
    for mod, parts in per_module.items():  # concatenate once per distinct input list
        key = hash(tuple(id(p) for p in parts))
        inputs[mod] = joined.setdefault(key, torch.cat(parts))
    return GateInputs(usages=usages, inputs=inputs, ids=torch.cat([w.reshape(-1) for w in windows]),
                      text_key=text_key(text, n_tokens))


def gate_numbers(W: Tensor, W_hat: Tensor, usages: Sequence[tuple[str, str]], gi: GateInputs,
                 token_counts: Tensor | None = None) -> dict:
    """The predicted smoke-test cosines of one option, and an embedding's held-out lookup error.

    Returns
    -------
    dict
        ``cosines``: ``{module.weight: mean per-token cosine}`` (``metrics.output_cosine`` for a
        linear, the looked-up rows for an embedding: what ``evaluate.smoke`` computes);
        ``lookup_output_error``: ``metrics.output_error`` with the held-out token counts (embedding
        with ``token_counts`` only).
    """
    cos: dict[str, float] = {}
    out: dict[str, Any] = {"cosines": cos}
    for mod, kind in usages:
        if kind == "linear":
            cos[f"{mod}.weight"] = metrics.output_cosine(W, W_hat, gi.inputs[mod])
        else:
            cos[f"{mod}.weight"] = metrics.mean_row_cosine(W[gi.ids], W_hat[gi.ids])
            if token_counts is not None:
                out["lookup_output_error"] = metrics.output_error(W, W_hat, token_counts)
    return out
