"""Tensor name -> model component (FFN, full/linear attention, embedding, vision, MTP, norms/other).

The rules are verified against the names ``transformers`` 5.x writes for llama (SmolLM2),
mistral, qwen2, qwen3, qwen3_5 / qwen3_5_text / qwen3_5_moe (``model.language_model.layers.N``,
``model.visual``, ``mtp.*``), gemma3 (``language_model`` / ``vision_tower`` /
``multi_modal_projector``) and gpt2 (``transformer.h.N``). Other architectures go through the same
ordered name rules, which cover the common naming of decoder-only checkpoints; callers say so to
the user via :func:`is_known_architecture`.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from sahc_core.io.source import ModelSource


class Component(str, Enum):
    """Coarse groups of tensors that a compression plan treats alike."""

    FFN = "ffn"
    ATTENTION_FULL = "attention_full"
    ATTENTION_LINEAR = "attention_linear"
    EMBEDDING = "embedding"
    VISION = "vision"
    MTP = "mtp"
    NORM_OTHER = "norm_other"


@dataclass(frozen=True)
class TensorRole:
    """Where a tensor belongs.

    Attributes
    ----------
    component : Component
        Coarse group.
    kind : str
        Short leaf kind (``"q_proj"``, ``"in_proj_qkv"``, ``"embed_tokens"``, ``"lm_head"``, ...).
    layer : int or None
        Block index (``layers.N`` / ``h.N`` / ``blocks.N``) where there is one.
    """

    component: Component
    kind: str
    layer: int | None


KNOWN_ARCHITECTURES = frozenset(
    {
        "llama", "mistral", "qwen2", "qwen3",
        "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text",
        "gemma3", "gemma3_text", "gpt2",
    }
)

# Ordered (first match wins). Prefix groups first (vision, MTP), then the token embedding and LM
# head, then the block sub-modules. Anything else (layer norms, final norm, unknown) is norm_other.
_RULES: tuple[tuple[re.Pattern[str], Component], ...] = tuple(
    (re.compile(p), c)
    for p, c in (
        (r"^(?:model\.)?mtp\.", Component.MTP),
        (r"^(?:model\.)?(?:visual|vision_tower|vision_model|vision_encoder|multi_modal_projector|mm_projector)\.",
         Component.VISION),
        (r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|tok_embeddings|embed_positions|embed_in)\.weight$",
         Component.EMBEDDING),
        (r"(?:^|\.)(?:lm_head|embed_out)\.weight$|^output\.weight$", Component.EMBEDDING),
        (r"\.(?:linear_attn|linear_attention)\.", Component.ATTENTION_LINEAR),
        (r"\.(?:self_attn|attn|attention)\.", Component.ATTENTION_FULL),
        (r"\.(?:mlp|feed_forward|ffn|block_sparse_moe)\.", Component.FFN),
        # Name heuristics for checkpoints whose projections are not under a named sub-module.
        (r"\.(?:q_proj|k_proj|v_proj|o_proj|wq|wk|wv|wo|qkv_proj|query_key_value|c_attn)\.(?:weight|bias)$",
         Component.ATTENTION_FULL),
        (r"\.(?:gate_proj|up_proj|down_proj|w1|w2|w3|fc1|fc2|c_fc|dense_h_to_4h|dense_4h_to_h)\.(?:weight|bias)$",
         Component.FFN),
    )
)
_NORMLIKE = re.compile(r"(?:norm|ln_\w+|layernorm)(?:\.(?:weight|bias))?$", re.IGNORECASE)
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_CANONICAL_KIND = {
    "wte": "embed_tokens", "word_embeddings": "embed_tokens", "tok_embeddings": "embed_tokens",
    "embed_in": "embed_tokens", "wpe": "embed_positions", "embed_out": "lm_head", "output": "lm_head",
}


def _kind(name: str) -> str:
    """Leaf kind: the module name before ``.weight``/``.bias``, else the last name part."""
    parts = name.split(".")
    leaf = parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[-1]
    return _CANONICAL_KIND.get(leaf, leaf)


def _classify(name: str) -> tuple[TensorRole, bool]:
    """Return ``(role, guessed)``; ``guessed`` when no rule matched and the name is not norm-like."""
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    for pattern, component in _RULES:
        if pattern.search(name):
            return TensorRole(component, _kind(name), layer), False
    return TensorRole(Component.NORM_OTHER, _kind(name), layer), not bool(_NORMLIKE.search(name))


def classify(name: str, architecture: str) -> TensorRole:
    """Classify one tensor name.

    Parameters
    ----------
    name : str
        Tensor name as stored in the checkpoint.
    architecture : str
        ``config.json`` ``model_type``; unknown architectures use the same name rules (guesses).

    Returns
    -------
    TensorRole
        Component, leaf kind and block index. Layer norms of a decoder layer go to
        ``norm_other`` with the layer index; ``q_norm``/``k_norm`` belong to attention.
    """
    del architecture  # the name rules are shared; see is_known_architecture for the caveat
    return _classify(name)[0]


def is_known_architecture(architecture: str) -> bool:
    """True for the architectures whose tensor naming was verified (see module docstring)."""
    return architecture in KNOWN_ARCHITECTURES


_COLUMNS = ["name", "shape", "dtype", "params", "component", "kind", "layer", "file", "tied", "duplicate", "guessed"]


def _table(rows: Iterable[tuple[str, tuple[int, ...], str, str]], architecture: str, tied: bool) -> pd.DataFrame:
    """Build the tensor table from ``(name, shape, dtype, file)`` rows.

    ``tied`` (config ``tie_word_embeddings``) marks the token embedding and LM head rows; a stored
    LM head of the same shape as the tied embedding is a ``duplicate`` that shares count once.
    Every row of an unknown architecture is ``guessed``.
    """
    known = is_known_architecture(architecture)
    records = []
    for name, shape, dtype, file in rows:
        role, guessed = _classify(name)
        params = 1
        for d in shape:
            params *= int(d)
        records.append(
            dict(name=name, shape=tuple(int(d) for d in shape), dtype=dtype, params=params,
                 component=role.component.value, kind=role.kind, layer=role.layer, file=file,
                 tied=False, duplicate=False, guessed=guessed or not known)
        )
    df = pd.DataFrame.from_records(records, columns=_COLUMNS)
    df["layer"] = df["layer"].astype("Int64")
    df["params"] = df["params"].astype("int64")
    for col in ("tied", "duplicate", "guessed"):
        df[col] = df[col].astype(bool)
    if tied:
        emb = (df["component"] == Component.EMBEDDING.value) & (df["kind"] == "embed_tokens")
        head = (df["component"] == Component.EMBEDDING.value) & (df["kind"] == "lm_head")
        df.loc[emb | head, "tied"] = True
        emb_shapes = set(df.loc[emb, "shape"])
        df.loc[head & df["shape"].isin(emb_shapes), "duplicate"] = True
    return df.sort_values("name", kind="stable").reset_index(drop=True)


def tensor_table(source: ModelSource) -> pd.DataFrame:
    """One row per stored tensor of ``source`` (headers only, no data read).

    Returns
    -------
    pandas.DataFrame
        Columns ``name, shape (tuple), dtype, params, component (str), kind, layer (Int64),
        file, tied, duplicate, guessed``. ``tied``: part of a tied embedding / LM head pair;
        ``duplicate``: a stored LM head that repeats the tied embedding (shares count it once);
        ``guessed``: the architecture is unknown, or no naming rule matched (put in ``norm_other``).
    """
    rows = ((t.name, t.shape, t.dtype, t.file) for t in source.tensors())
    return _table(rows, source.architecture, source.tied_embeddings)


def component_shares(table: pd.DataFrame) -> pd.DataFrame:
    """Parameters per component and their share of the total.

    Parameters
    ----------
    table : pandas.DataFrame
        Output of :func:`tensor_table`; rows with ``duplicate`` True are left out.

    Returns
    -------
    pandas.DataFrame
        Columns ``component, params, share (0..1), n_tensors``, sorted by params descending.
    """
    counted = table[~table["duplicate"]] if "duplicate" in table.columns else table
    grouped = (
        counted.groupby("component", sort=False)
        .agg(params=("params", "sum"), n_tensors=("name", "count"))
        .reset_index()
    )
    total = int(grouped["params"].sum())
    grouped["params"] = grouped["params"].astype("int64")
    grouped["share"] = grouped["params"] / total if total else 0.0
    grouped = grouped.sort_values(["params", "component"], ascending=[False, True], kind="stable")
    return grouped[["component", "params", "share", "n_tensors"]].reset_index(drop=True)


def shares_from_shapes(shapes: dict[str, tuple[int, ...]], architecture: str, tied: bool = False) -> pd.DataFrame:
    """Component shares from ``{tensor name: shape}`` alone (no checkpoint needed).

    Parameters
    ----------
    shapes : dict
        Tensor names and shapes, e.g. from a ``torch.device("meta")`` model's state dict.
    architecture : str
        ``model_type``; rows of an unknown architecture are marked ``guessed`` (not shown here).
    tied : bool
        Whether the config ties the LM head to the token embedding.

    Returns
    -------
    pandas.DataFrame
        As :func:`component_shares`.
    """
    return component_shares(_table(((n, tuple(s), "", "") for n, s in shapes.items()), architecture, tied))


def embedding_tensor(table: pd.DataFrame) -> str | None:
    """The token embedding's name (or the LM head's when there is no embedding matrix), from the component map."""
    for kind in ("embed_tokens", "lm_head"):
        rows = table[table["kind"] == kind]
        if len(rows):
            return str(rows["name"].iloc[0])
    return None
