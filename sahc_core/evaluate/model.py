"""Loading a causal LM for evaluation and loading compressed weights into it.

Never ``trust_remote_code``; the checkpoint is read as safetensors only (``use_safetensors=True``): a
directory without safetensors weights is refused rather than unpickled from ``pytorch_model.bin``, so
perplexity always scores the same weights that ``ModelSource`` analyses.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from sahc_core.device import resolve_device
from sahc_core.errors import ModelError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=False,
                                                     use_safetensors=True)
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
