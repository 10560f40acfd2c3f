"""Forward smoke test of a whole compressed model: every layer's output cosine on real activations.

The reference study's lesson 3: per-tensor weight errors passed while the model's perplexity was
infinite; a forward pass with "cosine of outputs ≥ 0.95" caught every later failure. Here one
forward pass of the ORIGINAL model over calibration text runs with a hook on every linear and
embedding layer; each hook recomputes that layer's output with the compressed weight Ŵ on the very
same input and compares. Nothing but one layer's output is held at a time, so memory stays at one
forward pass, and every layer is judged on the activations it really sees (not on activations that
earlier compressed layers have already distorted — that is what the perplexity measures).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sahc_core.evaluate.activations import _capture_windows
from sahc_core.evaluate.model import _model_device
from sahc_core.metrics import row_cosines


def layer_output_cosines(model: nn.Module, tokenizer, text: str, weights: Mapping[str, Tensor],
                         n_tokens: int = 512, progress: Callable[[int, int], None] | None = None
                         ) -> dict[str, dict]:
    """Mean per-token cosine between each layer's output with W and with Ŵ.

    Parameters
    ----------
    model, tokenizer
        The original model (``evaluate.load_model``) and its tokenizer.
    text : str
        Calibration text; its first ``n_tokens`` tokens are used.
    weights : mapping
        Reconstructed weights Ŵ by state-dict name (e.g. ``assemble.load_assembled``). Tied weights
        are found through the shared parameter: a tied ``lm_head`` is tested with the compressed
        ``embed_tokens`` weight (its logits).

    Returns
    -------
    dict
        ``{module weight name: {"cosine": float, "tokens": int, "weight": state-dict name}}`` for every
        ``nn.Linear`` / ``nn.Embedding`` whose weight is in ``weights``.
    """
    names = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), pname)  # the first name of a tied parameter is the stored one
    sums: dict[str, list[float]] = {}
    handles = []

    def make_hook(mod_name: str, w_name: str, module: nn.Module):
        def hook(_m: nn.Module, args: tuple, out: Tensor) -> None:
            x = args[0]
            w_hat = weights[w_name].to(out.device, out.dtype)
            if isinstance(module, nn.Embedding):
                y_hat = F.embedding(x, w_hat, module.padding_idx)
            else:
                y_hat = F.linear(x, w_hat, module.bias)
            cos = row_cosines(out.reshape(-1, out.shape[-1]), y_hat.reshape(-1, out.shape[-1]))
            acc = sums.setdefault(mod_name, [0.0, 0, w_name])
            acc[0] += float(cos.sum())
            acc[1] += int(cos.numel())
        return hook

    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            w_name = names.get(id(module.weight))
            if w_name in weights:
                handles.append(module.register_forward_hook(make_hook(mod_name, w_name, module)))
    windows = _capture_windows(model, tokenizer, text, n_tokens)
    try:
        with torch.inference_mode():
            for i, x in enumerate(windows):
                model(input_ids=x.to(_model_device(model)), use_cache=False)
                if progress is not None:
                    progress(i + 1, len(windows))
    finally:
        for h in handles:
            h.remove()
    return {f"{m}.weight": {"cosine": s / n if n else float("nan"), "tokens": n, "weight": w}
            for m, (s, n, w) in sums.items()}
