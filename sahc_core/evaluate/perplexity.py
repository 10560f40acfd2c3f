"""Perplexity protocol: token-level perplexity over the whole test text.

Perplexity (design.md "Numbers"): token-level ``exp(NLL_sum / tokens)`` over the WHOLE text. The
text is tokenized once (the tokenizer's own special-token convention; streamed chunk by chunk and
stopped at ``max_tokens`` with the ids of one call, see :mod:`sahc_core.evaluate.tokens`) and cut into
windows of ``window`` tokens that start every ``stride`` tokens (``stride = window``: non-overlapping). Window
``k`` scores, as in the Hugging Face perplexity guide [1]_, only the tokens after the previous
window's end (all its tokens but the first for the first window), so with a stride the model sees
``window - stride`` tokens of context it is not scored on. ``tokens`` is the exact number of
predicted tokens: ``n - n_windows`` without a stride, ``n - 1`` with one. Per-token log-probabilities
come from a float32 log-softmax of the logits and are summed in float64. Equal-length windows run in
batches; the one shorter last window runs alone, so no padding ever enters the numbers.

A perplexity is never silently non-finite: the first window whose log-probabilities are NaN or
infinite, or a mean NLL whose exponential overflows float64, raises
:class:`~sahc_core.errors.NumericalError` naming the window or the mean NLL (its ``value`` is ``nan``
or ``inf``, for the caller's gate log).

References
----------
.. [1] Hugging Face, "Perplexity of fixed-length models", transformers documentation.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sahc_core.device import resolve_device
from sahc_core.errors import CorpusError, NumericalError
from sahc_core.evaluate.model import DTYPES, _max_positions, _model_device, _same_device
from sahc_core.evaluate.tokens import token_ids

DEFAULT_WINDOW = 2048
#: Largest x with a finite exp(x) in float64 (a mean NLL above it has no representable perplexity).
_MAX_LOG_FLOAT = math.log(sys.float_info.max)
#: Cap on the logits of one batch (batch x window x vocab x bytes): a 248k-vocab model gets smaller
#: batches than SmolLM2's 49k. Only the grouping changes, never the numbers.
LOGITS_BUDGET_BYTES = 2 * 2**30


@dataclass(frozen=True)
class PplConfig:
    """Perplexity protocol: window length, stride, token cap, batch size, dtype and device."""

    window: int | None = None  # None -> min(2048, model max positions)
    stride: int | None = None  # None -> window (non-overlapping)
    max_tokens: int | None = None  # use only the first max_tokens tokens of the text
    batch_size: int | None = None  # None -> 1 on CPU (batching only adds memory traffic there), 8 on GPU
    dtype: str = "float32"  # what load_model should load; perplexity reports the model's actual dtype
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 2:
            raise ValueError(f"window must be at least 2 tokens, got {self.window}.")
        if self.stride is not None and (self.stride < 1 or (self.window is not None and self.stride > self.window)):
            raise ValueError(f"stride must be between 1 and the window length, got {self.stride}.")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {self.max_tokens}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")


@dataclass(frozen=True)
class PplResult:
    """Perplexity and the protocol that produced it (tokens = number of predicted tokens)."""

    ppl: float
    nll_sum: float
    tokens: int
    window: int
    stride: int
    dtype: str
    device: str
    seconds: float
    windows: int = 0
    text_tokens: int = 0
    batch_size: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def check_window(cfg: PplConfig, config: Mapping[str, Any]) -> None:
    """Refuse, before any work, a window longer than the model's maximum positions.

    Parameters
    ----------
    cfg : PplConfig
    config : mapping
        The model's ``config.json`` (``ModelSource.config``); the limit is ``max_position_embeddings``
        of its ``text_config`` or of the top level (the same rule as :func:`perplexity`).

    Raises
    ------
    ValueError
        When ``cfg.window`` exceeds the limit.
    """
    text = config.get("text_config")
    limit = (text.get("max_position_embeddings") if isinstance(text, Mapping) else None) or \
        config.get("max_position_embeddings")
    if cfg.window is not None and isinstance(limit, int) and cfg.window > limit:
        raise ValueError(f"window {cfg.window} exceeds the model's maximum of {limit} positions; "
                         "choose a window of at most that many tokens.")


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window: positions ``first_scored..end-1`` are predicted."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(begin + 1, prev_end)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


#: glibc ``mallopt`` parameters (``<malloc.h>``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


class _LogProbs:
    """``x (B, L) -> log_softmax(logits) (B, L, V)`` in float32, for one perplexity call.

    When the model's logits are exactly ``lm_head(decoder(x))`` (checked on a short probe, so logit
    soft-capping, scaling or any other head-side step falls back to ``model(x).logits``), the head's
    product and the log-softmax are written into two buffers reused across windows. Why: a fresh
    (2048 x 49152) float32 tensor costs ~0.07 s of page faults on CPU, and ``model(x).logits`` plus
    ``log_softmax`` allocate two per window; with the buffers the head and scoring take 0.56 s instead
    of 0.73 s per 2048-token window of SmolLM2 on 2 cores (same numbers to the last bit).
    """

    def __init__(self, model: nn.Module, probe: Tensor) -> None:
        self.model, self.split = model, self._split(model, probe)
        self._logits: Tensor | None = None
        self._logp: Tensor | None = None

    @staticmethod
    def _split(model: nn.Module, probe: Tensor) -> tuple[nn.Module, nn.Linear] | None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        if not isinstance(head, nn.Linear) or decoder is None or decoder is model:
            return None
        try:
            ref = model(input_ids=probe, use_cache=False).logits
            got = head(decoder(input_ids=probe, use_cache=False).last_hidden_state)
        except (AttributeError, TypeError, ValueError, RuntimeError):  # an unusual decoder: use the model
            return None
        return (decoder, head) if got.shape == ref.shape and torch.equal(got, ref) else None

    def _buffer(self, old: Tensor | None, n: int, like: Tensor, dtype: torch.dtype) -> Tensor:
        if old is None or old.shape[0] < n or old.dtype != dtype:
            old = torch.empty(n, like.shape[0], dtype=dtype, device=like.device)
        return old

    def __call__(self, x: Tensor) -> Tensor:
        if self.split is None:
            return torch.log_softmax(self.model(input_ids=x, use_cache=False).logits.float(), dim=-1)
        decoder, head = self.split
        h = decoder(input_ids=x, use_cache=False).last_hidden_state
        n, w = x.numel(), head.weight
        self._logits = self._buffer(self._logits, n, w, w.dtype)
        self._logp = self._buffer(self._logp, n, w, torch.float32)
        logits, logp = self._logits[:n], self._logp[:n]
        torch.matmul(h.reshape(n, -1), w.T, out=logits)
        if head.bias is not None:
            logits += head.bias
        torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=logp)
        return logp.view(*x.shape, w.shape[0])


@dataclass(frozen=True)
class Protocol:
    """The windows one perplexity call scores: token ids, spans, batches, and what they are scored on.

    ``spans``: ``(begin, end, first_scored)`` per window (:func:`_windows`); ``batches``: lists of
    equal-length spans of at most ``batch_size``; ``total``: predicted tokens. :meth:`window_nll` and
    :meth:`result` are where a non-finite perplexity is caught, for every evaluator.
    """

    ids: Tensor
    spans: list[tuple[int, int, int]]
    batches: list[list[tuple[int, int, int]]]
    window: int
    stride: int
    total: int
    batch_size: int

    def inputs(self, batch: list[tuple[int, int, int]]) -> Tensor:
        """``(B, L)`` token ids of one batch."""
        return torch.stack([self.ids[b:e] for b, e, _ in batch])

    def window_nll(self, span: tuple[int, int, int], nll: float) -> float:
        """``nll`` of one window, or :class:`NumericalError` naming it when it is NaN / infinite (the
        first bad window stops the evaluation: minutes of NaN help nobody)."""
        if not math.isfinite(nll):
            b, e, _ = span
            raise NumericalError(
                f"the model's log-probabilities are NaN or infinite in window {self.spans.index(span) + 1} "
                f"of {len(self.spans)} (tokens {b}-{e} of the text), so the perplexity is undefined: its outputs "
                "overflow or hold NaN (check the weights for NaN / Inf, or evaluate in float32).", math.nan)
        return nll

    def result(self, model, nll_sum: float, seconds: float, device) -> PplResult:
        """The :class:`PplResult`; :class:`NumericalError` when ``exp`` of the mean NLL overflows float64."""
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        mean_nll = nll_sum / self.total
        if mean_nll > _MAX_LOG_FLOAT:
            raise NumericalError(
                f"the mean negative log-likelihood is {mean_nll:.4g} nats per token, so the perplexity "
                f"exp({mean_nll:.4g}) overflows float64: the model's logits are far too large (check the final "
                "norm and LM head weights).", math.inf)
        return PplResult(ppl=math.exp(mean_nll), nll_sum=nll_sum, tokens=self.total, window=self.window,
                         stride=self.stride, dtype=dtype, device=str(device), seconds=seconds,
                         windows=len(self.spans), text_tokens=int(self.ids.numel()), batch_size=self.batch_size)


def scored(span: tuple[int, int, int]) -> tuple[int, int]:
    """Local positions ``lo..hi-1`` of a window whose logits are scored (position ``i`` predicts ``i + 1``)."""
    b, e, first = span
    return first - b - 1, e - b - 1


def protocol(model, tokenizer, text: str, cfg: PplConfig, device: torch.device) -> Protocol:
    """Tokenize ``text`` once and cut it into the windows and batches of ``cfg`` (module docstring)."""
    limit = _max_positions(model)
    window = cfg.window or min(DEFAULT_WINDOW, limit or DEFAULT_WINDOW)
    if limit is not None and window > limit:
        raise ValueError(f"window {window} exceeds the model's maximum of {limit} positions.")
    stride = cfg.stride or window
    if stride > window:
        raise ValueError(f"stride {stride} is longer than the window {window}.")
    ids = token_ids(tokenizer, text, max_tokens=cfg.max_tokens)
    if ids.numel() < 2:
        raise CorpusError("the text has fewer than 2 tokens; give a longer corpus.")
    spans = _windows(ids.numel(), window, stride)
    total = sum(end - first for _, end, first in spans)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 1
    itemsize = next(model.parameters()).element_size()
    wanted = cfg.batch_size or (1 if device.type == "cpu" else 8)
    batch_size = max(1, min(wanted, LOGITS_BUDGET_BYTES // (window * vocab * itemsize)))
    # Batches of equal-length windows; a window of another length (only ever the last one) runs alone.
    batches: list[list[tuple[int, int, int]]] = []
    for span in spans:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0][1] - last[0][0] == span[1] - span[0]:
            last.append(span)
        else:
            batches.append([span])
    return Protocol(ids=ids, spans=spans, batches=batches, window=window, stride=stride, total=total,
                    batch_size=batch_size)


def perplexity(model, tokenizer, text: str, cfg: PplConfig = PplConfig(), progress: Callable[[int, int], None] | None = None) -> PplResult:
    """Token-level perplexity of ``model`` over the whole ``text`` (protocol in the module docstring).

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM in eval mode; it runs where it is (see :func:`load_model`).
    tokenizer : PreTrainedTokenizerBase
    text : str
    cfg : PplConfig
    progress : callable, optional
        ``progress(tokens_done, tokens_total)`` after each batch (predicted tokens).

    Notes
    -----
    The model runs on the device and in the dtype it was loaded with (:func:`load_model` takes
    ``cfg.device``/``cfg.dtype``); the result reports those. ``cfg.device`` other than ``"auto"`` must
    name the model's device. :func:`sahc_core.evaluate.offload.perplexity_layerwise` scores the same
    windows one decoder layer at a time.

    Returns
    -------
    PplResult

    Raises
    ------
    NumericalError
        A window with NaN / infinite log-probabilities, or a perplexity that overflows float64.
    """
    device = _model_device(model)
    if cfg.device != "auto" and not _same_device(torch.device(resolve_device(cfg.device)), device):
        raise ValueError(f"the model is on {device} but the config asks for {cfg.device}; load it there first.")
    proto = protocol(model, tokenizer, text, cfg, device)
    start = time.perf_counter()
    nll_sum, done = 0.0, 0
    with torch.inference_mode():
        scorer = _LogProbs(model, proto.ids[: min(16, proto.ids.numel())].unsqueeze(0).to(device))
        for batch in proto.batches:
            x = proto.inputs(batch).to(device)  # (B, L)
            logp = scorer(x)  # (B, L, V) float32
            for row, span in enumerate(batch):
                lo, hi = scored(span)
                target = x[row, lo + 1 : hi + 1].unsqueeze(-1)  # (T, 1)
                nll_sum += proto.window_nll(span, -logp[row, lo:hi].gather(-1, target).double().sum().item())
                done += hi - lo
            del logp
            if progress is not None:
                progress(done, proto.total)
    assert done == proto.total
    return proto.result(model, nll_sum, time.perf_counter() - start, device)
