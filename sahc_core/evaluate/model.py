"""Loading a causal LM for evaluation and loading compressed weights into it.

Never ``trust_remote_code``; the checkpoint is read as safetensors only (``use_safetensors=True``): a
directory without safetensors weights is refused rather than unpickled from ``pytorch_model.bin``, so
perplexity always scores the same weights that ``ModelSource`` analyses.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from sahc_core.device import resolve_device
from sahc_core.errors import ModelError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(model_dir: Path, device: str = "auto", dtype: str = "float32", state_dict: Mapping | None = None):
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
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    device = resolve_device(device)
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a model folder (no config.json); give a Hugging Face model directory.")
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=False,
                                                     use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot load {path} as a causal language model ({_first_line(exc)}).") from exc
    if state_dict is not None:
        load_state(model, state_dict)
    return model.to(device).eval(), tokenizer


def load_tokenizer(model_dir: Path):
    """The tokenizer of a model directory (never ``trust_remote_code``); ModelError without one."""
    from transformers import AutoTokenizer

    path = Path(model_dir).expanduser()
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot load a tokenizer from {path} ({_first_line(exc)}); perplexity needs the tokenizer files.") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


def load_state(model: nn.Module, state_dict: Mapping[str, Tensor], names=None) -> None:
    """Load weights by checkpoint name into ``model`` (any device, cast to its dtype), one tensor at a time.

    Parameters
    ----------
    model : nn.Module
        The evaluated model (:func:`load_model`).
    state_dict : mapping
        ``{name: tensor}`` under checkpoint names (or the model's own names); a lazy mapping
        (``evaluate.weights.AssembledWeights``) is read one tensor at a time, never held whole. Tied
        aliases may be omitted but not differ.
    names : NameMap, optional
        Default: :func:`sahc_core.evaluate.names.build_name_map` of the keys against the model (its
        config's family). Tensors it marks not evaluated (vision, MTP) are skipped.

    Raises
    ------
    ModelError
        Unmapped or missing names and wrong shapes, before any weight changes; differing tied aliases.
    """
    from sahc_core.evaluate.names import build_name_map

    if names is None:
        names = build_name_map(state_dict.keys(), str(getattr(model.config, "model_type", "")), model)
    expected = model.state_dict(keep_vars=True)
    shapes = getattr(state_dict, "shapes", None)
    todo = [(c, m) for c, m in names.to_model.items() if c in state_dict]
    for ckpt, name in todo:
        shape = tuple(shapes[ckpt]) if shapes is not None else tuple(state_dict[ckpt].shape)
        if shape != tuple(expected[name].shape):
            raise ModelError(f"tensor {ckpt} has shape {shape} but the model expects {tuple(expected[name].shape)}.")
    loaded: dict[int, str] = {}  # tied aliases share one tensor: the first given name loads it
    with torch.no_grad():
        for ckpt, name in todo:
            target, tensor = expected[name], state_dict[ckpt]
            first = loaded.setdefault(id(target), ckpt)
            if first != ckpt:
                if not torch.equal(tensor.to(target.device, target.dtype), target):
                    raise ModelError(f"{first} and {ckpt} are tied in the model but differ in the state dict.")
                continue
            target.copy_(tensor)
            del tensor


def _max_positions(model: nn.Module) -> int | None:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None) or getattr(config, "max_position_embeddings", None)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device when one of them names no index."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
