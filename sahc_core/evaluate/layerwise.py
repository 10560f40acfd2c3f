"""Run a causal LM one decoder layer at a time over a set of token windows.

Protocol
--------
1. **Stem.** One forward pass of the model per window with every decoder layer replaced by a
   recording stub that returns its input unchanged: the embeddings (the first layer's input) and the
   positional and keyword arguments the model hands each layer (position embeddings, masks,
   position ids, ...) are kept. Hybrid models hand different arguments to different layer types
   (Qwen3.5: linear- vs full-attention masks; Gemma 3: sliding vs global masks and rotary tables);
   the arguments of the layers of one window are deduplicated by object identity, so a window
   keeps one copy per distinct set, not one per layer.
2. **Layers.** For layer ``l``: run it on every window with that window's arguments for ``l``,
   replace the hidden states by its outputs (the inputs are freed), next layer. Around each layer a
   caller's ``on_layer`` context is entered (it may hook the layer's linears; :class:`LayerTurn`
   tells which window is running).
3. **Head.** One more forward pass per window with the layer stubs, the last of which returns the
   layer-wise final hidden states, so whatever the model does after its layers (final norm, logit
   soft-capping) is the model's own code. The LM head's input (the final normed hidden states) is
   captured there; its logits are computed only when asked for.

Peak memory: the model + the hidden states of all windows (``tokens x hidden`` in the model dtype)
+ one window's per-layer arguments + whatever ``on_layer`` keeps.

A later "model larger than RAM" version loads each layer's weights just before its turn: every
turn (stem, each layer, head) runs inside ``prepare(turn)`` when given, a context manager that may
materialise ``turn.module``'s weights on entry and drop them on exit. Nothing here offloads.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sahc_core.errors import ModelError
from sahc_core.evaluate.activations import _StopForward
from sahc_core.evaluate.model import _model_device

#: Turn index of the stem (embeddings up to the first layer's input).
STEM = -1


@dataclass
class LayerTurn:
    """One step of the runner: the stem (``index == STEM``), a decoder layer, or the LM head.

    Attributes
    ----------
    index : int
        ``STEM`` (-1), ``0 .. n_layers - 1`` for the decoder layers, ``n_layers`` for the head.
    name : str
        Qualified module name in the model (``"model.layers.3"``, ``"lm_head"``; ``""`` for the stem).
    module : nn.Module
        The layer, the head, or (stem) the whole model.
    window : int
        Index of the window being run right now (set by the runner before each window).
    """

    index: int
    name: str
    module: nn.Module
    window: int = -1


#: ``on_layer(turn)`` / ``prepare(turn)``: a context manager entered around one turn (or None).
TurnContext = Callable[[LayerTurn], AbstractContextManager | None]


@dataclass
class LayerInputs:
    """What the stem hands the decoder layers, per window.

    Attributes
    ----------
    hidden : list of Tensor
        ``(B, L_w, hidden)`` first-layer input per window (replaced in place as layers run).
    contexts : list of list of (tuple, dict)
        Per window, the distinct ``(extra positional args, kwargs)`` the model passes its layers.
    which : list of list of int
        ``which[w][l]``: index into ``contexts[w]`` of layer ``l``'s arguments.
    """

    hidden: list[Tensor]
    contexts: list[list[tuple[tuple, dict[str, Any]]]] = field(default_factory=list)
    which: list[list[int]] = field(default_factory=list)

    def call_args(self, window: int, layer: int) -> tuple[tuple, dict[str, Any]]:
        """``(extra args, kwargs)`` of ``layer`` for ``window``."""
        return self.contexts[window][self.which[window][layer]]


@dataclass
class LayerwiseOutput:
    """Result of :func:`run_layerwise`: per window, the LM head's input and (if asked) the logits."""

    hidden: list[Tensor]
    logits: list[Tensor] | None


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(qualified name, layer)]`` of the decoder layers, in order.

    The layers are the ``nn.ModuleList`` child of ``model.get_decoder()`` (Llama/Qwen/Gemma:
    ``layers``; GPT-2: ``h``) whose length is the config's ``num_hidden_layers``.

    Raises
    ------
    ModelError
        When the model has no decoder with exactly one such list.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = getattr(config, "num_hidden_layers", None)
    try:
        decoder = model.get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        decoder = None
    lists = [] if decoder is None else [m for m in decoder.children() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(lists) != 1:
        raise ModelError(f"cannot find the decoder layers of this {type(model).__name__} (no single list of "
                         f"{n_layers} layers under its decoder); layer-by-layer runs support Llama, Qwen, Gemma and "
                         "GPT-2 style models.")
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(layer)], layer) for layer in lists[0]]


def _input_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the input embedding's device (a VLM's first parameter is its vision tower's)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.device if emb is not None else _model_device(model)


def _first_tensor(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def _dedupe(calls: list[tuple[tuple, dict[str, Any]]]) -> tuple[list[tuple[tuple, dict[str, Any]]], list[int]]:
    """Distinct argument sets by object identity, and each layer's index into them."""
    distinct: list[tuple[tuple, dict[str, Any]]] = []
    seen: dict[tuple, int] = {}
    which = []
    for args, kwargs in calls:
        key = (tuple(id(a) for a in args), tuple((k, id(v)) for k, v in kwargs.items()))
        if key not in seen:
            seen[key] = len(distinct)
            distinct.append((args, kwargs))
        which.append(seen[key])
    return distinct, which


@contextmanager
def _stubbed(layers: list[nn.Module], stub: Callable[[int, tuple, dict], Tensor]) -> Iterator[None]:
    """Replace each layer's ``forward`` by ``stub(index, args, kwargs)`` (instance attribute, removed after)."""
    for i, layer in enumerate(layers):
        layer.forward = lambda *args, _i=i, **kwargs: stub(_i, args, kwargs)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _enter(stack: ExitStack, hook: TurnContext | None, turn: LayerTurn) -> None:
    ctx = hook(turn) if hook is not None else None
    stack.enter_context(ctx if ctx is not None else nullcontext())


def capture_layer_inputs(model: nn.Module, windows: list[Tensor], prepare: TurnContext | None = None) -> LayerInputs:
    """The first decoder layer's input and every layer's arguments, per window (protocol step 1).

    Parameters
    ----------
    model : nn.Module
        A causal LM in eval mode.
    windows : list of Tensor
        ``(B, L)`` token ids per window.
    prepare : callable, optional
        Context around the stem pass (``LayerTurn(STEM, "", model)``).
    """
    layers = [m for _, m in decoder_layers(model)]
    out = LayerInputs(hidden=[])
    calls: list[tuple[tuple, dict[str, Any]]] = []

    def record(i: int, args: tuple, kwargs: dict) -> Tensor:
        if not args or not isinstance(args[0], Tensor):
            raise ModelError(f"{type(model).__name__} does not pass the hidden states to its layers as the first "
                             "positional argument; layer-by-layer runs cannot follow this model.")
        if i == 0:
            out.hidden.append(args[0])
        calls.append((args[1:], dict(kwargs)))
        if i == len(layers) - 1:
            raise _StopForward
        return args[0]

    turn = LayerTurn(STEM, "", model)
    with ExitStack() as stack, torch.inference_mode(), _stubbed(layers, record):
        _enter(stack, prepare, turn)
        device = _input_device(model)  # after prepare: an empty (meta) model gets its stem weights there
        for w, x in enumerate(windows):
            turn.window = w
            calls.clear()
            try:
                model(input_ids=x.to(device), use_cache=False)
            except _StopForward:
                pass
            assert len(calls) == len(layers), "every layer stub must have been called once"
            contexts, which = _dedupe(calls)
            out.contexts.append(contexts)
            out.which.append(which)
    return out


def run_layerwise(model: nn.Module, windows: list[Tensor], on_layer: TurnContext | None = None, *,
                  prepare: TurnContext | None = None, logits: bool = False, head_weights: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> LayerwiseOutput:
    """Run ``model`` over ``windows`` one decoder layer at a time (protocol in the module docstring).

    Parameters
    ----------
    model : nn.Module
        A causal LM in eval mode (Llama, Qwen2/3, Qwen3.5 hybrid, Gemma 3, GPT-2 style); it runs
        where it is.
    windows : list of Tensor
        ``(B, L)`` int64 token ids per window (one causal sequence per row, no padding).
    on_layer : callable, optional
        ``on_layer(turn)`` returns a context manager (or None) entered while ``turn.module`` runs on
        all windows: each decoder layer, then the LM head (``turn.index == n_layers``). Hooks it
        registers on the module's linears see every window; ``turn.window`` says which. With
        ``logits=False`` the head's pre-hooks run but its forward does not.
    prepare : callable, optional
        ``prepare(turn)`` context around every turn, stem included, entered before ``on_layer``:
        the seam for loading a layer's weights from disk just before its turn.
    logits : bool
        Also compute the logits (``(B, L, vocab)`` per window: memory!).
    head_weights : bool
        ``False``: ``prepare`` does not load the (untied) LM head's own weights for its turn, for a
        caller that needs only the head's input (calibration: the 248k-row head of Qwen3.5-9B is 4 GB
        in float32); requires ``logits=False``.
    progress : callable, optional
        ``progress(turns_done, turns_total)`` after each layer and the head.

    Returns
    -------
    LayerwiseOutput
        ``hidden``: the LM head's input per window, ``(B, L, hidden)``; ``logits`` when asked.

    Raises
    ------
    ModelError
        When the layers cannot be found or the model has no LM head.
    """
    named = decoder_layers(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ModelError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None); "
                         "layer-by-layer runs need a causal language model.")
    names = {id(m): n for n, m in model.named_modules()}
    inputs = capture_layer_inputs(model, windows, prepare)
    hidden = inputs.hidden
    total = len(named) + 1
    with torch.inference_mode():
        for index, (name, layer) in enumerate(named):
            turn = LayerTurn(index, name, layer)
            with ExitStack() as stack:
                _enter(stack, prepare, turn)
                _enter(stack, on_layer, turn)
                for w in range(len(hidden)):
                    turn.window = w
                    args, kwargs = inputs.call_args(w, index)
                    hidden[w] = _first_tensor(layer(hidden[w], *args, **kwargs))  # frees the layer's input
            if progress is not None:
                progress(index + 1, total)
        del inputs  # the per-layer arguments: only the final hidden states are needed now
        out = _run_head(model, [m for _, m in named], head, names.get(id(head), ""), windows, hidden,
                        on_layer, prepare, logits, head_weights)
    if progress is not None:
        progress(total, total)
    return out


def _run_head(model: nn.Module, layers: list[nn.Module], head: nn.Module, head_name: str, windows: list[Tensor],
              final: list[Tensor], on_layer: TurnContext | None, prepare: TurnContext | None,
              logits: bool, head_weights: bool = True) -> LayerwiseOutput:
    """Protocol step 3: replay the model with stub layers, the last returning ``final[w]``."""
    turn = LayerTurn(len(layers), head_name, head)
    hidden: list[Tensor] = []
    out_logits: list[Tensor] | None = [] if logits else None

    def replay(i: int, args: tuple, _kwargs: dict) -> Tensor:
        return final[turn.window] if i == len(layers) - 1 else args[0]

    def head_input(_mod: nn.Module, args: tuple) -> None:
        hidden.append(args[0])
        if not logits:
            raise _StopForward

    with ExitStack() as stack, _stubbed(layers, replay):
        _enter(stack, prepare, LayerTurn(STEM, "", model))
        if head_weights or logits:
            _enter(stack, prepare, turn)
        device = _input_device(model)
        _enter(stack, on_layer, turn)
        stack.callback(head.register_forward_pre_hook(head_input).remove)  # after the caller's pre-hooks
        for w, x in enumerate(windows):
            turn.window = w
            try:
                result = model(input_ids=x.to(device), use_cache=False)
                out_logits.append(result.logits)
            except _StopForward:
                pass
            final[w] = None  # type: ignore[call-overload]  # free as we go: the head input is kept instead
    assert len(hidden) == len(windows), "the LM head must have run once per window"
    return LayerwiseOutput(hidden=hidden, logits=out_logits)
