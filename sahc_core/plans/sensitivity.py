"""Per-module loss sensitivity to output errors: one Monte-Carlo Fisher pass, measured once per model + text.

The damage model of the plan optimizer (:mod:`sahc_core.plans.optimize`) predicts the increase of
the mean next-token loss (nats per token, i.e. of log-perplexity) caused by compressing tensor t as

    Δloss ≈ Σ_u s_u · e_u²,

summed over the modules u that use t (a linear layer, an embedding lookup, a tied LM head), where
``e_u = ‖ΔY_u‖_F / ‖Y_u‖_F`` is u's relative output error on held-out calibration tokens and ``s_u``
its sensitivity, measured here once.

Derivation. Write ``ℓ = Σ_n ℓ_n`` for the summed loss of N positions and ``g_p = ∂ℓ/∂y_p`` for its
gradient at u's output ``y_p`` (m features). To second order, with the Fisher (Gauss-Newton) matrix
in place of the Hessian and the positions treated independently (the K-FAC block approximation
[1]_), ``ΔL̄ ≈ (1/2N) Σ_p δy_pᵀ E[g_p g_pᵀ] δy_p``. Taking the error direction isotropic over the m
outputs, ``E[(g_pᵀδy_p)²] = ‖g_p‖² ‖δy_p‖² / m``, and its relative size the same at every position,
``‖δy_p‖ = e ‖y_p‖``, gives

    s_u = Σ_p ‖g_p‖² ‖y_p‖² / (2 m N).

The per-position product matters: a few positions (the first token's "massive activations") carry
most of ``Σ_p ‖y_p‖²`` while their gradients are small; treating gradient and output sizes as
independent, ``(Σ‖g_p‖²)(Σ‖y_p‖²) / (2mN²)``, overstates such modules by orders of magnitude. Both
sums are kept (``grad2``, ``out2``) for inspection.

``E[g_p g_pᵀ]`` is estimated by back-propagating the loss of labels SAMPLED from the model's own
predictive distribution (one sample per position): then the cross terms between positions vanish in
expectation and the estimate is the Fisher / GGN block, not the "empirical Fisher" of the true
labels, which is a poor curvature estimate [2]_. One backward pass serves every module at once
(gradients with respect to activations only; no parameter gradient is formed). Layer-wise
Hessian-trace sensitivities are the idea of HAWQ [3]_; Fisher-weighted quantization error that of
SqueezeLLM [4]_.

References
----------
.. [1] J. Martens, R. Grosse, "Optimizing neural networks with Kronecker-factored approximate
   curvature", ICML 2015.
.. [2] F. Kunstner, L. Balles, P. Hennig, "Limitations of the empirical Fisher approximation for
   natural gradient descent", NeurIPS 2019.
.. [3] Z. Dong, Z. Yao, A. Gholami, M. W. Mahoney, K. Keutzer, "HAWQ: Hessian AWare Quantization of
   neural networks with mixed-precision", ICCV 2019; HAWQ-V2, NeurIPS 2020.
.. [4] S. Kim, C. Hooper, A. Gholami, et al., "SqueezeLLM: Dense-and-sparse quantization", ICML 2024
   (arXiv 2306.07629, 2023).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sahc_core.cache import Cache
from sahc_core.io.source import ModelSource

KIND = "sensitivity"
#: Bump when the estimate changes for the same inputs.
VERSION = 2
COLUMNS = ("module", "weight", "kind", "out_features", "tokens", "grad2", "out2", "grad_out", "sensitivity")


@dataclass(frozen=True)
class SensitivityConfig:
    """How the Fisher pass runs.

    Attributes
    ----------
    tokens : int
        Positions used: the first ``tokens`` tokens of the calibration text (default 2048).
    window : int
        Tokens per forward/backward pass (capped at the model's maximum positions); 512 keeps the
        backward pass's activations small.
    seed : int
        Seed of the label sampling.
    """

    tokens: int = 2048
    window: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.window < 2:
            raise ValueError(f"tokens must be >= 1 and window >= 2, got tokens={self.tokens}, window={self.window}.")

    def key(self, text: str) -> str:
        """Cache key: the text's sha256 and every field."""
        return json.dumps({"text": hashlib.sha256(text.encode("utf-8")).hexdigest(), **asdict(self)}, sort_keys=True)


def _windows(tokenizer: Any, text: str, cfg: SensitivityConfig, max_positions: int | None) -> list[Tensor]:
    from sahc_core.evaluate.tokens import token_ids

    ids = token_ids(tokenizer, text, max_tokens=cfg.tokens)
    w = min(cfg.window, max_positions or cfg.window)
    return [ids[i : i + w].unsqueeze(0) for i in range(0, ids.numel(), w) if ids[i : i + w].numel() >= 2]


def fisher_sensitivity(model: nn.Module, tokenizer: Any, text: str, cfg: SensitivityConfig = SensitivityConfig(),
                       progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Sensitivity ``s_u`` of every linear and embedding module (see the module docstring).

    Parameters
    ----------
    model, tokenizer
        A causal LM (``evaluate.load_model``); its parameters are left unchanged (no gradients).
    text : str
        Calibration text; its first ``cfg.tokens`` tokens are used.

    Returns
    -------
    DataFrame
        :data:`COLUMNS`, one row per module: the stored weight name it uses (tied: the first name),
        ``kind`` (``linear`` / ``embedding``), ``out_features`` m, ``tokens`` N, ``grad2`` = Σ‖g_p‖²,
        ``out2`` = Σ‖y_p‖², ``grad_out`` = Σ‖g_p‖²‖y_p‖², ``sensitivity`` = grad_out / (2 m N) in nats
        per token per unit e².
    """
    from sahc_core.evaluate.model import _max_positions, _model_device
    from sahc_core.plans.smoke_gate import weight_usages

    usages = {mod: (w, kind) for w, mods in weight_usages(model).items() for mod, kind in mods}
    acc = {mod: [0.0, 0.0, 0.0, 0] for mod in usages}  # grad2, out2, grad_out, m
    dev = _model_device(model)

    def make_hook(mod: str, is_embedding: bool):
        def hook(_m: nn.Module, _args: tuple, out: Tensor) -> Tensor | None:
            y = out.detach().requires_grad_(True) if is_embedding else out  # the graph starts at the lookups
            a = acc[mod]
            y2 = y.detach().double().square().sum(-1).reshape(-1)  # (positions,) ‖y_p‖²
            a[1] += float(y2.sum())
            a[3] = int(y.shape[-1])

            def on_grad(g: Tensor) -> None:
                g2 = g.double().square().sum(-1).reshape(-1)  # (positions,) ‖g_p‖²
                a[0] += float(g2.sum())
                a[2] += float((g2 * y2).sum())

            if y.requires_grad:
                y.register_hook(on_grad)
            return y if is_embedding else None
        return hook

    handles = [module.register_forward_hook(make_hook(mod, usages[mod][1] == "embedding"))
               for mod, module in model.named_modules() if mod in usages]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    windows = _windows(tokenizer, text, cfg, _max_positions(model))
    if not windows:
        raise ValueError("the calibration text has fewer than 2 tokens; give a longer text for the sensitivity pass.")
    n = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for i, x in enumerate(windows):
                logits = model(input_ids=x.to(dev), use_cache=False).logits.float()  # (1, L, V)
                flat = logits.reshape(-1, logits.shape[-1])
                with torch.no_grad():
                    labels = torch.multinomial(F.softmax(flat, dim=-1).cpu(), 1, generator=gen).reshape(-1)
                F.cross_entropy(flat, labels.to(flat.device), reduction="sum").backward()
                n += flat.shape[0]
                if progress is not None:
                    progress(i + 1, len(windows))
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    rows = [{"module": mod, "weight": usages[mod][0], "kind": usages[mod][1], "out_features": a[3], "tokens": n,
             "grad2": a[0], "out2": a[1], "grad_out": a[2], "sensitivity": a[2] / (2.0 * a[3] * n) if a[3] else 0.0}
            for mod, a in acc.items()]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def sensitivities(source: ModelSource, cache: Cache | None, text: str | None = None,
                  cfg: SensitivityConfig = SensitivityConfig(), *, load: Callable[[], tuple[Any, Any]] | None = None,
                  device: str = "auto", progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """:func:`fisher_sensitivity` of ``source`` on ``text``: looked up in the cache, or measured once and stored.

    Parameters
    ----------
    text : str, optional
        Default: the embedded corpus's calibration text (never the test text).
    load : callable, optional
        ``load() -> (model, tokenizer)`` of ``source``; default ``evaluate.load_model`` on ``device``.
        Called only when the value is not cached.

    Returns
    -------
    DataFrame
        :data:`COLUMNS`; ``attrs["seconds"]`` the measuring time, ``attrs["cached"]``.
    """
    if text is None:
        from sahc_core.io.corpus import default_corpus

        text = default_corpus().calib_text
    key = cfg.key(text)
    hit = cache.get(KIND, source.fingerprint, key, VERSION) if cache is not None else None
    if hit is not None:
        df = pd.DataFrame(hit["rows"], columns=list(COLUMNS))
        df.attrs.update(seconds=hit["seconds"], cached=True)
        return df
    if load is None:
        from sahc_core.evaluate.model import load_model

        def load() -> tuple[Any, Any]:
            return load_model(source.path, device=device)

    model, tokenizer = load()
    t0 = time.perf_counter()
    df = fisher_sensitivity(model, tokenizer, text, cfg, progress)
    seconds = time.perf_counter() - t0
    if cache is not None:
        cache.put(KIND, source.fingerprint, key, VERSION, {"rows": df.to_dict(orient="records"), "seconds": seconds})
    df.attrs.update(seconds=seconds, cached=False)
    return df
