"""Calibration statistics: their configuration and the lazy reader of a stored statistics folder.

What is stored, per calibration split (``fit``: the first ``tokens`` tokens of the calibration
text; ``heldout``: the next ``heldout_tokens``, never overlapping):

* per distinct linear input (q/k/v share one, gate/up share one; the LM head has its own): the
  input second moment ``H = XᵀX`` (``n x n``, ``X`` the ``(tokens, n)`` activations entering the
  layer) and its token count; optionally per-channel extras (:data:`EXTRAS`);
* the embedding's "input second moment", which is diagonal for one-hot inputs: the per-token counts
  over the vocabulary.

On disk (one folder): ``index.json`` + one safetensors shard per decoder layer (plus the LM head's
and the embedding's). ``H`` is accumulated in float64 (per-window products formed in float32, see
:mod:`sahc_core.calib.capture`) and stored as its upper triangle, row by row (:func:`pack_symmetric`,
``n(n+1)/2`` values), in ``store_dtype`` (default float32). Why: the 9B reference model's 12,288-wide
down_proj input is 1.2 GB per split as a full float64 matrix, 302 MB packed in float32, and SmolLM2's
statistics take 404 MB instead of 1.6 GB; the one rounding to float32 is 6e-8 relative per entry, far
below the sampling noise of a few thousand tokens. It is read back as a full float64 matrix.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from sahc_core.errors import CacheError
from sahc_core.evaluate.model import DTYPES

#: Bumped when what is captured or how it is stored changes (part of the cache row's version).
FORMAT_VERSION = 1
#: How ``XᵀX`` is laid out in a shard (recorded in the index).
LAYOUT = "triu-rows"
INDEX_FILE = "index.json"
SPLITS = ("fit", "heldout")
STORE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
#: Optional per-input-channel statistics a method may ask for: ``(n,)`` vectors over the split's tokens.
EXTRAS: tuple[str, ...] = ("abs_mean", "abs_max")


@dataclass(frozen=True)
class CalibConfig:
    """How calibration statistics are captured.

    Attributes
    ----------
    tokens : int
        Fitting tokens: the first ``tokens`` tokens of the calibration text (default 8192: four
        2048-token windows; on SmolLM2-135M the capture with the held-out split costs 108 s of CPU
        time on two cores, about a minute of wall time when they are free, and 405 MB on disk; see
        ``bench/calib.py``). Inputs wider than ``tokens`` get a rank-deficient ``XᵀX``; give more.
    heldout_tokens : int
        Held-out tokens taken right after the fitting tokens (default 2048; 0: no held-out split).
    window : int, optional
        Tokens per window; None: ``min(2048, model max positions)`` (the perplexity default).
    dtype : str
        Precision the model runs in during capture (``float32|bfloat16|float16``).
    store_dtype : str
        Precision of ``XᵀX`` on disk (``float32`` or ``float64``, upper triangle); read back as float64.
    extras : tuple of str
        Per-channel statistics to capture besides ``XᵀX`` (names from :data:`EXTRAS`).
    """

    tokens: int = 8192
    heldout_tokens: int = 2048
    window: int | None = None
    dtype: str = "float32"
    store_dtype: str = "float32"
    extras: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens must be at least 1, got {self.tokens}.")
        if self.heldout_tokens < 0:
            raise ValueError(f"heldout_tokens must be 0 or more, got {self.heldout_tokens}.")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1 token, got {self.window}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype must be float32 or float64, got {self.store_dtype!r}.")
        unknown = sorted(set(self.extras) - set(EXTRAS))
        if unknown:
            raise ValueError(f"unknown calibration extra {unknown[0]!r}; choose from {', '.join(EXTRAS)}.")
        object.__setattr__(self, "extras", tuple(sorted(set(self.extras))))

    def key(self, text_sha256: str) -> str:
        """Cache key: the calibration text's sha256 and every field (``window=None`` is ``auto``)."""
        d = asdict(self) | {"window": self.window or "auto", "extras": ",".join(self.extras) or "-"}
        return f"text={text_sha256};" + ";".join(f"{k}={d[k]}" for k in sorted(d))


@dataclass(frozen=True)
class LinearStats:
    """Calibration statistics of one linear layer's input on one split.

    Attributes
    ----------
    xtx : Tensor
        ``(n, n)`` float64 ``XᵀX`` (CPU), ``n`` = in_features.
    n_tokens : int
        Rows of ``X`` (tokens seen by this layer).
    split : str
        ``"fit"`` or ``"heldout"``.
    input : str
        Name of the shared input (the first linear reading it, e.g. ``...self_attn.q_proj``); the
        linears with one ``input`` share one ``xtx``.
    extras : dict
        Requested per-channel vectors (``(n,)`` float64): ``abs_mean``, ``abs_max``.
    key : str
        Identity of these numbers for result caches: the statistics' key, the split and the input.
    """

    xtx: Tensor
    n_tokens: int
    split: str
    input: str
    extras: dict[str, Tensor] = field(default_factory=dict)
    key: str = ""


def pack_symmetric(H: Tensor) -> Tensor:
    """The upper triangle of a symmetric ``(n, n)`` matrix, row by row: ``(n(n+1)/2,)``."""
    assert H.dim() == 2 and H.shape[0] == H.shape[1]
    return torch.cat([H[i, i:] for i in range(H.shape[0])])


def unpack_symmetric(packed: Tensor, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Inverse of :func:`pack_symmetric`: the full ``(n, n)`` matrix (both triangles) in ``dtype``."""
    assert packed.shape == (n * (n + 1) // 2,), f"a packed {n} x {n} matrix has {n * (n + 1) // 2} values"
    H = torch.empty(n, n, dtype=dtype)
    offset = 0
    for i in range(n):  # one row and one column per step: no n x n temporary besides H
        row = packed[offset : offset + n - i]
        H[i, i:] = row
        H[i:, i] = row
        offset += n - i
    return H


class CalibStats:
    """A stored statistics folder, read lazily one tensor at a time (one split's view).

    Parameters
    ----------
    path : Path
        The folder (``index.json`` + shards), see :func:`read_index` for the checks made on open.
    split : str
        The view: ``"fit"`` (default) or ``"heldout"``.
    """

    def __init__(self, path: Path, split: str = "fit", index: dict | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be 'fit' or 'heldout', got {split!r}.")
        self.path = Path(path)
        self.split = split
        self._index = index if index is not None else read_index(self.path)

    def __repr__(self) -> str:
        return f"CalibStats({str(self.path)!r}, split={self.split!r}, tokens={self.n_tokens})"

    @property
    def meta(self) -> dict[str, Any]:
        """Capture facts: tokens, heldout_tokens, windows, window, seconds, text_sha256, model_fp, config."""
        return dict(self._index["meta"])

    @property
    def key(self) -> str:
        """The cache key these statistics were captured under (text hash + config; the model is the row's)."""
        return str(self._index["meta"]["key"])

    @property
    def n_tokens(self) -> int:
        """Tokens of this view's split."""
        return int(self._index["splits"][self.split]["tokens"])

    @property
    def heldout(self) -> CalibStats | None:
        """The held-out split's view (None when captured with ``heldout_tokens=0``)."""
        if "heldout" not in self._index["splits"]:
            return None
        return self if self.split == "heldout" else CalibStats(self.path, "heldout", self._index)

    @property
    def fit(self) -> CalibStats:
        """The fitting split's view."""
        return self if self.split == "fit" else CalibStats(self.path, "fit", self._index)

    def heldout_for_weight(self, weight_name: str) -> LinearStats | None:
        """:meth:`for_weight` on the held-out split (None without one)."""
        held = self.heldout
        return None if held is None else held.for_weight(weight_name)

    def weights(self) -> list[str]:
        """Weight names (state-dict names, tied aliases included) that have linear-input statistics."""
        return sorted(self._index["weights"])

    def input_of(self, weight_name: str) -> str | None:
        """The shared-input name of ``weight_name`` (None when it has no statistics)."""
        return self._index["weights"].get(weight_name)

    def for_weight(self, weight_name: str) -> LinearStats | None:
        """``XᵀX`` of the input of the linear layer(s) using ``weight_name``; None when there is none.

        A tied LM head (``lm_head.weight`` aliasing the embedding) answers for both names with the LM
        head's input; the embedding lookup's own statistics are :attr:`token_counts`. Every call reads
        a fresh copy (a method may add damping to ``xtx`` in place).
        """
        group = self.input_of(weight_name)
        if group is None:
            return None
        info = self._index["inputs"][group]
        tensors = self._read(info["shard"], [f"{self.split}/{group}"] +
                             [f"{self.split}/{group}/{e}" for e in self._index["meta"]["config"]["extras"]])
        prefix = f"{self.split}/{group}/"
        return LinearStats(
            xtx=unpack_symmetric(tensors.pop(f"{self.split}/{group}"), int(info["in_features"])), n_tokens=int(info["tokens"][self.split]),
            split=self.split, input=group, extras={k.removeprefix(prefix): v.double() for k, v in tensors.items()},
            key=f"{self.key};split={self.split};input={group}",
        )

    @property
    def token_counts(self) -> Tensor:
        """``(vocab,)`` int64: how often each token id occurs in this split (the embedding's statistics)."""
        return self._read(self._index["embedding"]["shard"], [f"{self.split}/token_counts"]).popitem()[1]

    @property
    def embedding_weights(self) -> list[str]:
        """Weight names of the input embedding (tied aliases included)."""
        return list(self._index["embedding"]["weights"])

    def _read(self, shard: str, names: list[str]) -> dict[str, Tensor]:
        try:
            with safe_open(str(self.path / shard), framework="pt") as fh:
                return {n: fh.get_tensor(n) for n in names}
        except (SafetensorError, OSError) as exc:
            raise CacheError(f"calibration statistics shard {self.path / shard} is unreadable ({exc}); delete "
                             f"{self.path} and capture them again.") from exc


def read_index(path: Path) -> dict:
    """Parse ``index.json`` of a statistics folder and check that every listed file has its recorded size.

    Raises
    ------
    CacheError
        When the folder, its index or a shard is missing, or a shard's size differs (truncated).
    """
    index_path = Path(path) / INDEX_FILE
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheError(f"calibration statistics index {index_path} is missing or unreadable; capture them "
                         "again.") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT_VERSION or index.get("layout") != LAYOUT:
        raise CacheError(f"calibration statistics index {index_path} has another format; capture them again.")
    for name, size in index["files"].items():
        f = Path(path) / name
        if not f.is_file() or f.stat().st_size != size:
            raise CacheError(f"calibration statistics shard {f} is missing or truncated; capture them again.")
    return index
