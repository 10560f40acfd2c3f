"""Checkpoint tensor names -> the evaluated model's parameter names, one explicit map per family.

The model that perplexity, the smoke test and the What-if output cosine run is the class
``transformers.AutoModelForCausalLM`` builds from the checkpoint's config (never remote code). Its
parameter names need not be the names stored in the checkpoint:

========================  ==============================  ==========================================
family (``model_type``)   evaluated class                 checkpoint name -> model name
========================  ==============================  ==========================================
qwen3_5 (``qwen3_5``,     ``Qwen3_5ForCausalLM`` (text    ``model.language_model.X`` -> ``model.X``;
``_text``, ``_moe``,      model only)                     ``model.visual.*``: not evaluated (vision);
``_moe_text``)                                            ``mtp.*``: not evaluated (MTP head)
gemma3 (``gemma3``,       ``Gemma3ForConditionalGeneration``  ``language_model.model.X`` ->
``gemma3_text``)          (``Gemma3ForCausalLM`` for text)    ``model.language_model.X``;
                                                          ``language_model.lm_head.X`` -> ``lm_head.X``;
                                                          ``vision_tower.*``, ``multi_modal_projector.*``
                                                          (with or without ``model.``): not evaluated
gpt2                      ``GPT2LMHeadModel``             ``h.N.* / wte / wpe / ln_f`` (old hub files
                                                          without the prefix) -> ``transformer.X``;
                                                          ``h.N.attn.bias|masked_bias`` (causal-mask
                                                          buffers): not evaluated
llama, mistral, qwen2,    their ``*ForCausalLM``          unchanged
qwen3, other
========================  ==============================  ==========================================

A name no rule renames stays as it is. :func:`build_name_map` checks the whole checkpoint against the
model before anything long runs: every checkpoint tensor must map to a parameter (or persistent
buffer) of the model or be "not evaluated", and every parameter of the model's text path must be
given (a tied LM head counts as given with the embedding). Vision and MTP tensors are compressed and
counted in the bytes like every other tensor; perplexity runs the text model only, so the run says
that they were not evaluated.

Qwen3.5-MoE checkpoints that store one tensor per expert (``mlp.experts.5.up_proj.weight``) while
the model fuses them (``mlp.experts.gate_up_proj``) are refused here with the names (a many-to-one
merge is not a rename).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from sahc_core.errors import ModelError

#: Parts of a checkpoint that are compressed but not evaluated.
VISION, MTP, BUFFER = "vision", "mtp", "buffer"
_PART_LABEL = {VISION: "vision-tower", MTP: "MTP-head", BUFFER: "causal-mask buffer"}


@dataclass(frozen=True)
class Family:
    """Name rules of one architecture family.

    Attributes
    ----------
    name : str
    rename : tuple of (regex, replacement)
        Applied to a checkpoint name with ``re.sub`` (count 1); the first rule that matches wins, a
        name no rule matches is unchanged.
    skip : tuple of (regex, part)
        Checkpoint names the evaluated model does not run (``part``: ``vision``, ``mtp``, ``buffer``).
    model_skip : tuple of (regex, part)
        Parameters of the evaluated class that its text forward never uses (a VLM class's vision tower).
    """

    name: str
    rename: tuple[tuple[str, str], ...] = ()
    skip: tuple[tuple[str, str], ...] = ()
    model_skip: tuple[tuple[str, str], ...] = ()


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen3_5", rename=((r"^model\.language_model\.", "model."),),
           skip=((r"^model\.visual\.", VISION), (r"^(?:model\.)?mtp\.", MTP))),
    Family("gemma3", rename=((r"^language_model\.model\.", "model.language_model."),
                             (r"^language_model\.lm_head\.", "lm_head.")),
           skip=((r"^(?:model\.)?(?:vision_tower|multi_modal_projector)\.", VISION),),
           model_skip=((r"^model\.(?:vision_tower|multi_modal_projector)\.", VISION),)),
    Family("gpt2", rename=((r"^(?=(?:h\.\d+|wte|wpe|ln_f)\.)", "transformer."),),
           skip=((r"(?:^|\.)h\.\d+\.attn\.(?:bias|masked_bias)$", BUFFER),)),
    Family("decoder"),
)}
_FAMILY_OF = {"qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5", "qwen3_5_moe": "qwen3_5",
              "qwen3_5_moe_text": "qwen3_5", "gemma3": "gemma3", "gemma3_text": "gemma3", "gpt2": "gpt2"}


def family_of(architecture: str) -> Family:
    """The name rules of ``architecture`` (a config ``model_type``); plain decoders keep their names."""
    return FAMILIES[_FAMILY_OF.get(architecture, "decoder")]


@dataclass(frozen=True)
class NameMap:
    """Which model parameter each checkpoint tensor is, or why it is not evaluated.

    Attributes
    ----------
    family : str
    model_class : str
        The evaluated class (``Qwen3_5ForCausalLM``, ...).
    to_model : dict
        ``{checkpoint name: model state-dict name}`` of every evaluated tensor.
    not_evaluated : dict
        ``{checkpoint name: part}`` (``vision``, ``mtp``, ``buffer``).
    """

    family: str
    model_class: str
    to_model: dict[str, str]
    not_evaluated: dict[str, str] = field(default_factory=dict)
    _inverse: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_inverse", {m: c for c, m in self.to_model.items()})

    def model_name(self, checkpoint_name: str) -> str | None:
        """The model's name of a checkpoint tensor (None when it is not evaluated or unknown)."""
        return self.to_model.get(checkpoint_name)

    def checkpoint_name(self, model_name: str) -> str | None:
        """The checkpoint's name of a model parameter (None when the checkpoint does not store it)."""
        return self._inverse.get(model_name)

    def parts(self) -> dict[str, list[str]]:
        """``{part: sorted checkpoint names}`` of the tensors that are not evaluated."""
        out: dict[str, list[str]] = {}
        for name, part in sorted(self.not_evaluated.items()):
            out.setdefault(part, []).append(name)
        return out

    def describe(self) -> dict:
        """JSON summary for a run result: class, counts, and the tensors not evaluated with a sentence."""
        parts = self.parts()
        note = None
        if parts:
            what = " and ".join(f"{len(v)} {_PART_LABEL.get(k, k)}" for k, v in parts.items())
            note = (f"{what} tensors were compressed and counted in the bytes but not evaluated: perplexity and "
                    f"the smoke test run the text path of {self.model_class} only.")
        return {"family": self.family, "model_class": self.model_class, "evaluated_tensors": len(self.to_model),
                "not_evaluated": {k: len(v) for k, v in parts.items()}, "not_evaluated_tensors": parts, "note": note}


def _first(rules: tuple[tuple[str, str], ...], name: str) -> tuple[str, str] | None:
    for pattern, value in rules:
        if re.search(pattern, name):
            return pattern, value
    return None


def _examples(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def build_name_map(checkpoint_names: Iterable[str], architecture: str, model: nn.Module,
                   complete: bool = True) -> NameMap:
    """Map every checkpoint tensor to ``model`` and check that nothing is left over on either side.

    Parameters
    ----------
    checkpoint_names : iterable of str
        The stored tensor names (a source's or an assembled checkpoint's).
    architecture : str
        The checkpoint's ``model_type`` (selects the family, :func:`family_of`).
    model : nn.Module
        The evaluated model: loaded, or empty (:func:`empty_model`, meta parameters).
    complete : bool
        Also require every parameter of the model's text path to be given (False: a subset of the
        checkpoint, e.g. the weights one smoke test compares).

    Raises
    ------
    ModelError
        When tensors map to no model parameter, or the model has parameters no tensor gives; the
        message lists the first few names.
    """
    fam = family_of(architecture)
    expected = model.state_dict(keep_vars=True)  # parameters and persistent buffers, tied aliases included
    to_model: dict[str, str] = {}
    skipped: dict[str, str] = {}
    unmapped: list[str] = []
    for name in sorted(checkpoint_names):
        skip = _first(fam.skip, name)
        if skip is not None:
            skipped[name] = skip[1]
            continue
        rule = _first(fam.rename, name)
        target = re.sub(rule[0], rule[1], name, count=1) if rule is not None else name
        if target in expected:
            to_model[name] = target
        else:
            unmapped.append(name)
    cls = type(model).__name__
    if unmapped:
        raise ModelError(f"{cls} lacks a parameter for {len(unmapped)} checkpoint tensors (name rules of family "
                         f"{fam.name!r}), e.g. {_examples(unmapped)}; this checkpoint's naming is not supported for "
                         "evaluation.")
    given = {id(expected[m]) for m in to_model.values()}
    missing = [n for n, t in expected.items() if id(t) not in given and _first(fam.model_skip, n) is None]
    if missing and complete:
        raise ModelError(f"the checkpoint lacks {len(missing)} tensors that {cls} needs, e.g. {_examples(missing)}; "
                         "give the complete checkpoint.")
    return NameMap(family=fam.name, model_class=cls, to_model=to_model, not_evaluated=skipped)


def empty_model(model_dir: str | Path, dtype: str = "float32") -> nn.Module:
    """The evaluated model of a checkpoint with every parameter on the meta device (no weight memory).

    Buffers are real (rotary tables, embedding scales are computed by the constructors), tied
    parameters are tied, the model is in eval mode. ``accelerate.init_empty_weights``; never remote code.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from sahc_core.evaluate.model import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    try:
        config = AutoConfig.from_pretrained(Path(model_dir).expanduser(), trust_remote_code=False)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise ModelError(f"cannot build a causal language model from the config in {model_dir} ({first}).") from exc
    model.tie_weights()
    return model.eval()


def name_map_for(source, model: nn.Module | None = None) -> NameMap:
    """:func:`build_name_map` of a :class:`~sahc_core.io.source.ModelSource` against ``model`` (default:
    its empty evaluated model, built in about a second even for 9B parameters)."""
    model = model if model is not None else empty_model(source.path)
    return build_name_map((t.name for t in source.tensors()), source.architecture, model)
