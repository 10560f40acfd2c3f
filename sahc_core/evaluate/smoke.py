"""Forward smoke test of a whole compressed model: every layer's output cosine on real activations.

The reference study's lesson 3: per-tensor weight errors passed while the model's perplexity was
infinite; a forward pass with "cosine of outputs ≥ 0.95" caught every later failure. Here the
ORIGINAL model runs over calibration text one decoder layer at a time
(:func:`sahc_core.evaluate.layerwise.run_layerwise`) with a hook on every linear (``nn.Linear``,
GPT-2's ``Conv1D``) and embedding layer whose weight was compressed; each hook recomputes that
layer's output with the compressed weight Ŵ on the very same input and compares. Every layer is
judged on the activations it really sees (not on activations that earlier compressed layers have
already distorted — that is what the perplexity measures).

Memory: Ŵ is rebuilt inside the hook (``weights`` may be a lazy
:class:`~sahc_core.evaluate.weights.AssembledWeights`) and dropped right after, so at most one Ŵ and
one layer's outputs are held beside the model; with ``prepare`` (the layer loader of
:mod:`sahc_core.evaluate.offload`) the model itself is held one layer at a time. The LM head is
hooked before its forward (the runner does not compute logits) and its two products are formed in
row chunks of at most ``HEAD_CHUNK_BYTES``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor, nn

from sahc_core.errors import ModelError
from sahc_core.evaluate.activations import _capture_windows
from sahc_core.evaluate.layerwise import LayerTurn, TurnContext, decoder_layers, run_layerwise
from sahc_core.metrics import row_cosines

#: Bytes of one row chunk of the LM head's two products (float32 logits of the vocabulary).
HEAD_CHUNK_BYTES = 128 * 2**20


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # an older or newer transformers without GPT-2's Conv1D
        return None
    return Conv1D


def layer_types() -> tuple[type, ...]:
    """Module types the smoke test (and the What-if output cosine) compare: linear, Conv1D, embedding."""
    conv = _conv1d_type()
    return (nn.Linear, nn.Embedding) + ((conv,) if conv is not None else ())


def apply_layer(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The output of ``module`` (Linear, Conv1D or Embedding) on input ``x`` with ``weight`` in place of its own."""
    if isinstance(module, nn.Embedding):
        return F.embedding(x, weight, module.padding_idx)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    # Conv1D: y = x W + b with W (in, out)
    y = x.reshape(-1, weight.shape[0]) @ weight
    if module.bias is not None:
        y = y + module.bias
    return y.reshape(*x.shape[:-1], weight.shape[1])


def _targets(model: nn.Module, names, weights: Mapping[str, Tensor]) -> dict[str, tuple[str, str, nn.Module]]:
    """``{module name: (result key, checkpoint name of Ŵ, module)}`` of every compared layer."""
    stored: dict[int, str] = {}
    expected = model.state_dict(keep_vars=True)
    for ckpt, model_name in names.to_model.items():
        if ckpt in weights:
            stored.setdefault(id(expected[model_name]), ckpt)  # a tied alias is found through its parameter
    out = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, layer_types()):
            own = names.checkpoint_name(f"{mod_name}.weight")
            ckpt = own if own in weights else stored.get(id(module.weight))
            if ckpt is not None:
                out[mod_name] = (own if own in weights else f"{mod_name}.weight", ckpt, module)
    return out


def layer_output_cosines(model: nn.Module, tokenizer, text: str, weights: Mapping[str, Tensor],
                         n_tokens: int = 512, progress: Callable[[int, int], None] | None = None,
                         names=None, prepare: TurnContext | None = None) -> dict[str, dict]:
    """Mean per-token cosine between each layer's output with W and with Ŵ.

    Parameters
    ----------
    model, tokenizer
        The original model (``evaluate.load_model``, or an empty one with ``prepare``) and its tokenizer.
    text : str
        Calibration text; its first ``n_tokens`` tokens are used.
    weights : mapping
        Reconstructed weights Ŵ by checkpoint name (e.g. ``AssembledWeights``; the model's own names
        work too). A tied LM head is tested with the compressed embedding weight (its logits).
    progress : callable, optional
        ``progress(turns_done, turns_total)`` after each decoder layer and the head.
    names : NameMap, optional
        Default: built from ``weights`` against the model (its config's family; partial maps allowed).
    prepare : callable, optional
        The runner's ``prepare(turn)`` (:class:`sahc_core.evaluate.offload.LayerLoader`).

    Returns
    -------
    dict
        ``{key: {"cosine": float, "tokens": int, "weight": checkpoint name of Ŵ}}``, the key being the
        layer weight's checkpoint name (its model name for a tied head that is not stored).

    Raises
    ------
    ModelError
        When no given weight is the weight of a compared layer of the model (nothing would be tested).
    """
    from sahc_core.evaluate.names import build_name_map

    if names is None:
        names = build_name_map(weights.keys(), str(getattr(model.config, "model_type", "")), model, complete=False)
    targets = _targets(model, names, weights)
    if not targets:
        some = ", ".join(list(weights)[:3]) or "none"
        raise ModelError(f"the smoke test matched no layer of {type(model).__name__}: none of the {len(weights)} "
                         f"given weights (e.g. {some}) is the weight of one of its linear or embedding layers; "
                         "check the checkpoint's name map.")
    sums: dict[str, list] = {}
    in_layer = {id(m): i for i, (_, layer) in enumerate(decoder_layers(model)) for m in layer.modules()}
    head = model.get_output_embeddings()

    def accumulate(key: str, ckpt: str, y: Tensor, y_hat: Tensor) -> None:
        cos = row_cosines(y.reshape(-1, y.shape[-1]), y_hat.reshape(-1, y.shape[-1]))
        acc = sums.setdefault(key, [0.0, 0, ckpt])
        acc[0] += float(cos.sum())
        acc[1] += int(cos.numel())

    def forward_hook(key: str, ckpt: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            w_hat = weights[ckpt].to(out.device, out.dtype)
            accumulate(key, ckpt, out, apply_layer(module, args[0], w_hat))
        return hook

    def head_pre_hook(key: str, ckpt: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            w, w_hat = module.weight, weights[ckpt].to(module.weight.device, module.weight.dtype)
            rows = max(1, HEAD_CHUNK_BYTES // (4 * w.shape[0]))
            for i in range(0, x.shape[0], rows):
                accumulate(key, ckpt, apply_layer(module, x[i:i + rows], w), apply_layer(module, x[i:i + rows], w_hat))
        return hook

    @contextmanager
    def on_layer(turn: LayerTurn) -> Iterator[None]:
        handles = []
        is_head = turn.module is head
        for mod_name, (key, ckpt, module) in targets.items():
            if module is head and is_head:
                handles.append(module.register_forward_pre_hook(head_pre_hook(key, ckpt)))
            elif (in_layer.get(id(module)) == turn.index) or (is_head and id(module) not in in_layer
                                                               and module is not head):
                # layer turns: that layer's linears; the head turn replays the stem: the embeddings run there
                handles.append(module.register_forward_hook(forward_hook(key, ckpt)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    windows = _capture_windows(model, tokenizer, text, n_tokens)
    run_layerwise(model, windows, on_layer, prepare=prepare, progress=progress)
    return {key: {"cosine": s / n if n else float("nan"), "tokens": n, "weight": w}
            for key, (s, n, w) in sums.items()}
