"""Real activations inside a model: inputs of one linear layer, inputs/outputs of one block.

A forward pre-hook (or forward hook) captures what a module receives on real text and stops the
forward pass right there (``_StopForward``), so later layers are never computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sahc_core.errors import ModelError
from sahc_core.metrics import mean_row_cosine
from sahc_core.evaluate.model import _max_positions, _model_device
from sahc_core.evaluate.perplexity import DEFAULT_WINDOW
from sahc_core.evaluate.tokens import token_ids


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
    ids = token_ids(tokenizer, text, max_tokens=n_tokens)  # streamed: a long text is never tokenized whole
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
    inputs with ``W`` replaced by ``Ŵ`` (``torch.func.functional_call``: the model is not modified);
    the result is the mean per-token cosine of the two outputs.
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
    local = linear_name[len(block_name) + 1:] + ".weight"
    w_hat = W_hat.to(linear.weight.device, linear.weight.dtype)
    # The block runs with Ŵ through functional_call: the model's own weights are never written, so a
    # model shared between threads (the app's workspace) is never seen half-swapped.
    with torch.inference_mode():
        outs = [_first_tensor(torch.func.functional_call(block, {local: w_hat}, c.args, c.kwargs, strict=False))
                for c in calls]
    ref = torch.cat([c.output.reshape(-1, c.output.shape[-1]) for c in calls])
    new = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])
    return mean_row_cosine(ref, new)
