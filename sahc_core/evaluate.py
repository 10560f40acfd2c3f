"""Perplexity protocol and output cosine on real activations.

Perplexity (design.md "Numbers"): token-level ``exp(NLL_sum / tokens)`` over the WHOLE text. The
text is tokenized once (the tokenizer's own special-token convention) and cut into windows of
``window`` tokens that start every ``stride`` tokens (``stride = window``: non-overlapping). Window
``k`` scores, as in the Hugging Face perplexity guide [1]_, only the tokens after the previous
window's end (all its tokens but the first for the first window), so with a stride the model sees
``window - stride`` tokens of context it is not scored on. ``tokens`` is the exact number of
predicted tokens: ``n - n_windows`` without a stride, ``n - 1`` with one. Per-token log-probabilities
come from a float32 log-softmax of the logits and are summed in float64. Equal-length windows run in
batches; the one shorter last window runs alone, so no padding ever enters the numbers.

Output cosine: ``mean_n cos(W x_n, Ŵ x_n)`` over real activations ``x_n`` entering one ``nn.Linear``
(captured with a forward pre-hook), and the same for the output of the whole block (attention or MLP)
that holds the linear, re-run with ``W`` swapped for ``Ŵ`` on its captured inputs.

References
----------
.. [1] Hugging Face, "Perplexity of fixed-length models", transformers documentation.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sahc_core.device import resolve_device
from sahc_core.errors import CorpusError, ModelError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_WINDOW = 2048
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


def load_model(model_dir: Path, device: str = "auto", dtype: str = "float32", state_dict: dict | None = None):
    """Load a causal LM and its tokenizer for evaluation (never ``trust_remote_code``), in eval mode.

    Parameters
    ----------
    model_dir : Path
        A Hugging Face model directory with config, weights and tokenizer files.
    device, dtype : str
        Where and in which precision to run (``dtype`` in ``float32|bfloat16|float16``).
    state_dict : dict, optional
        Weights replacing the checkpoint's (an assembled compressed model); every name and shape must
        match. A tied alias (``lm_head.weight`` sharing the embedding) may be left out.

    Returns
    -------
    tuple
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    device = resolve_device(device)
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a model folder (no config.json); give a Hugging Face model directory.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot load a tokenizer from {path} ({_first_line(exc)}); perplexity needs the tokenizer files.") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot load {path} as a causal language model ({_first_line(exc)}).") from exc
    if state_dict is not None:
        load_state(model, state_dict)
    return model.to(device).eval(), tokenizer


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


def load_state(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load ``state_dict`` into ``model`` (any device, cast to its dtype) after checking every name and
    shape; tied aliases may be omitted but not differ. Raises :class:`ModelError` before changing anything."""
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    expected = model.state_dict()
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ModelError(f"the state dict has {len(unexpected)} tensors the model lacks, e.g. {unexpected[0]}.")
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelError(
                f"tensor {name} has shape {tuple(tensor.shape)} but the model expects {tuple(expected[name].shape)}."
            )
    # Names that alias one storage (tied embeddings): one given name covers the others.
    groups: dict[int, list[str]] = {}
    for name in expected:
        groups.setdefault(id(params.get(name, expected[name])), []).append(name)
    for names in groups.values():
        given = [n for n in names if n in state_dict]
        if not given:
            raise ModelError(f"the state dict lacks tensor {names[0]}; every model tensor must be given.")
        if any(not torch.equal(state_dict[given[0]], state_dict[n]) for n in given[1:]):
            raise ModelError(f"{' and '.join(given)} are tied in the model but differ in the state dict.")
    model.load_state_dict(state_dict, strict=False)


def _max_positions(model: nn.Module) -> int | None:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None) or getattr(config, "max_position_embeddings", None)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device when one of them names no index."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _tokenize(tokenizer, text: str) -> Tensor:
    """Token ids of the whole text (1-D int64), tokenized once."""
    if not text or not text.strip():
        raise CorpusError("the text to evaluate is empty; give a corpus with text in it.")
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


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
#: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX), where its dynamic
#: adjustment ends up after large blocks are freed; the trim threshold then follows at twice it.
_MMAP_MAX = 32 * 2**20


def _glibc() -> Any | None:
    """The C library through ctypes when it is glibc (``mallopt`` / ``malloc_trim``), else None."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def _retain_freed_memory() -> Iterator[None]:
    """While perplexity runs, glibc keeps freed memory in the process instead of returning it.

    Why: every window allocates and frees the same ~1 GB of activations (blocks of 4-13 MB for
    SmolLM2 at 2048 tokens); by default glibc gives them back to the OS (``mmap`` above a threshold,
    heap trimming below) and the next window faults them in again: 180k-480k minor page faults per
    window, 5-10 % of its time on 2 cores, 0 with these settings. PyTorch's CPU performance guide
    suggests preloading jemalloc/tcmalloc for the same reason; this is the in-process equivalent,
    scoped to one call. Afterwards the retained memory is released (``malloc_trim``) and the
    thresholds are left where glibc's own dynamic adjustment takes them once a process has freed
    blocks this large (mmap 32 MiB, trim 64 MiB): an explicit ``mallopt`` turns that adjustment off
    for good, and its 128 KiB start values would make every later allocation above 128 KiB an mmap
    (measured: the transformers-guide loop then ran 30 % slower in the same process).
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    try:
        yield
    finally:
        libc.malloc_trim(0)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_MAX)


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
    name the model's device.

    Returns
    -------
    PplResult
    """
    limit = _max_positions(model)
    window = cfg.window or min(DEFAULT_WINDOW, limit or DEFAULT_WINDOW)
    if limit is not None and window > limit:
        raise ValueError(f"window {window} exceeds the model's maximum of {limit} positions.")
    stride = cfg.stride or window
    if stride > window:
        raise ValueError(f"stride {stride} is longer than the window {window}.")
    device = _model_device(model)
    if cfg.device != "auto" and not _same_device(torch.device(resolve_device(cfg.device)), device):
        raise ValueError(f"the model is on {device} but the config asks for {cfg.device}; load it there first.")
    ids = _tokenize(tokenizer, text)
    if cfg.max_tokens is not None:
        ids = ids[: cfg.max_tokens]
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
    start = time.perf_counter()
    nll_sum, done = 0.0, 0
    with torch.inference_mode(), _retain_freed_memory():
        scorer = _LogProbs(model, ids[: min(16, ids.numel())].unsqueeze(0).to(device))
        for batch in batches:
            x = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)  # (B, L)
            logp = scorer(x)  # (B, L, V) float32
            for row, (b, e, first) in enumerate(batch):
                # logits at local position i predict token i+1; score global positions first..e-1
                lo = first - b - 1
                target = x[row, lo + 1 : e - b].unsqueeze(-1)  # (T, 1)
                nll_sum -= logp[row, lo : e - b - 1].gather(-1, target).double().sum().item()
                done += e - first
            del logp
            if progress is not None:
                progress(done, total)
    assert done == total
    seconds = time.perf_counter() - start
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return PplResult(
        ppl=math.exp(nll_sum / total), nll_sum=nll_sum, tokens=total, window=window, stride=stride, dtype=dtype,
        device=str(device), seconds=seconds, windows=len(spans), text_tokens=int(ids.numel()), batch_size=batch_size,
    )


class _StopForward(Exception):
    """Raised by a capture hook once it has what it needs, to skip the rest of the forward pass."""


def _module(model: nn.Module, name: str) -> nn.Module:
    name = name.removesuffix(".weight")
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ModelError(f"the model has no module named {name}; give a weight name from the tensor list.") from exc


def _capture_windows(model: nn.Module, tokenizer, text: str, n_tokens: int) -> list[Tensor]:
    """The first ``n_tokens`` tokens of ``text`` cut into windows the model accepts, as (1, L) tensors."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1, got {n_tokens}.")
    ids = _tokenize(tokenizer, text)[:n_tokens]
    window = min(DEFAULT_WINDOW, _max_positions(model) or DEFAULT_WINDOW)
    return [ids[i : i + window].unsqueeze(0) for i in range(0, ids.numel(), window)]


def _run_until_stop(model: nn.Module, x: Tensor) -> None:
    with torch.inference_mode():
        try:
            model(input_ids=x.to(_model_device(model)), use_cache=False)
        except _StopForward:
            pass


def capture_inputs(model, tokenizer, text: str, module_name: str, n_tokens: int = 2048) -> Tensor:
    """Real activations entering the ``nn.Linear`` ``module_name`` for the first ``n_tokens`` tokens.

    Returns
    -------
    Tensor
        ``(N, in_features)`` float32 on the CPU, ``N = min(n_tokens, tokens in text)``.
    """
    module = _module(model, module_name)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{module_name} is a {type(module).__name__}, not a linear layer; pick a 2-D projection weight.")
    captured: list[Tensor] = []

    def hook(_mod: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach().reshape(-1, module.in_features).float().cpu())
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        for x in _capture_windows(model, tokenizer, text, n_tokens):
            _run_until_stop(model, x)
    finally:
        handle.remove()
    return torch.cat(captured)


def row_cosines(Y: Tensor, Y_hat: Tensor) -> Tensor:
    """cos(y_n, ŷ_n) of every row in float64; two zero rows count 1, one zero row counts 0."""
    Y, Y_hat = Y.double(), Y_hat.double()
    dot = (Y * Y_hat).sum(-1)
    norms = Y.norm(dim=-1) * Y_hat.norm(dim=-1)
    both_zero = (Y.norm(dim=-1) == 0) & (Y_hat.norm(dim=-1) == 0)
    return torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(torch.float64).tiny), both_zero.double())


def _row_cosine(Y: Tensor, Y_hat: Tensor) -> float:
    """Mean over rows of :func:`row_cosines`."""
    return float(row_cosines(Y, Y_hat).mean())


def output_cosine(W: Tensor, W_hat: Tensor, X: Tensor) -> float:
    """Mean over the rows of ``X`` of ``cos(X W^T, X Ŵ^T)`` (layer outputs with W vs with Ŵ).

    Parameters
    ----------
    W, W_hat : Tensor
        ``(out_features, in_features)`` weights.
    X : Tensor
        ``(N, in_features)`` activations (see :func:`capture_inputs`).
    """
    if W.shape != W_hat.shape or W.dim() != 2:
        raise ValueError(f"W and W_hat must be matrices of one shape, got {tuple(W.shape)} and {tuple(W_hat.shape)}.")
    if X.dim() != 2 or X.shape[1] != W.shape[1]:
        raise ValueError(f"X must be (N, {W.shape[1]}), got {tuple(X.shape)}.")
    # float32 matmuls on W's device (fast on GPU); the cosine itself in float64
    X = X.to(W.device, torch.float32)
    return _row_cosine(X @ W.float().T, X @ W_hat.to(W.device).float().T)


@dataclass
class BlockCall:
    """One captured call of a block: its positional and keyword inputs and its first output."""

    args: tuple
    kwargs: dict[str, Any]
    output: Tensor


def _first_tensor(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def capture_block_io(model, tokenizer, text: str, block_name: str, n_tokens: int = 2048) -> list[BlockCall]:
    """Inputs (args and kwargs, incl. position embeddings and mask) and output of ``block_name``.

    One :class:`BlockCall` per window of the first ``n_tokens`` tokens; the forward pass stops right
    after the block, so later layers are never computed.
    """
    module = _module(model, block_name)
    calls: list[BlockCall] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        calls.append(BlockCall(args=args, kwargs=dict(kwargs), output=_first_tensor(output).detach()))
        raise _StopForward

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        for x in _capture_windows(model, tokenizer, text, n_tokens):
            _run_until_stop(model, x)
    finally:
        handle.remove()
    return calls


def attention_output_cosine(model, tokenizer, text: str, weight_name: str, W_hat: Tensor, n_tokens: int = 2048) -> float:
    """Output cosine of the block holding ``weight_name`` (its parent: attention or MLP) with ``Ŵ``.

    The block runs once inside the model to capture its real inputs and output, then alone on those
    inputs with ``W`` replaced by ``Ŵ``; the result is the mean per-token cosine of the two outputs.
    The model's weights are restored afterwards.
    """
    linear_name = weight_name.removesuffix(".weight")
    linear = _module(model, linear_name)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{linear_name} is a {type(linear).__name__}, not a linear layer; pick a 2-D projection weight.")
    if tuple(W_hat.shape) != tuple(linear.weight.shape):
        raise ValueError(f"W_hat has shape {tuple(W_hat.shape)} but {weight_name} is {tuple(linear.weight.shape)}.")
    if "." not in linear_name:
        raise ValueError(f"{weight_name} sits directly on the model, not inside a block; use output_cosine instead.")
    block_name = linear_name.rsplit(".", 1)[0]
    calls = capture_block_io(model, tokenizer, text, block_name, n_tokens)
    block = _module(model, block_name)
    original = linear.weight.data
    linear.weight.data = W_hat.to(original.device, original.dtype)
    try:
        with torch.inference_mode():
            outs = [_first_tensor(block(*c.args, **c.kwargs)) for c in calls]
    finally:
        linear.weight.data = original
    ref = torch.cat([c.output.reshape(-1, c.output.shape[-1]) for c in calls])
    new = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])
    return _row_cosine(ref, new)
