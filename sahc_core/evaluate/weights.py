"""Weights by checkpoint name, read or rebuilt one tensor at a time (never a whole state dict).

Both classes are read-only ``Mapping`` s from checkpoint tensor names to tensors: indexing reads the
tensor from its safetensors file (:class:`CheckpointWeights`) or rebuilds it from its compressed
state (:class:`AssembledWeights`, ``methods.load_compressed(state, meta).reconstruct(dtype)``), so the
caller holds exactly the tensors it keeps references to. ``shapes`` answers every shape from the
headers / the manifest without reading data. They feed :func:`sahc_core.evaluate.model.load_state`,
the smoke test and the layer-sequential evaluator (:mod:`sahc_core.evaluate.offload`).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from sahc_core.errors import ModelError


class CheckpointWeights(Mapping):
    """The stored tensors of a :class:`~sahc_core.io.source.ModelSource`, read on access.

    Parameters
    ----------
    source : ModelSource
    dtype : torch.dtype, optional
        Cast to this dtype on read (None: the stored dtype).
    """

    def __init__(self, source, dtype: torch.dtype | None = None) -> None:
        self.source, self.dtype = source, dtype
        self.shapes: dict[str, tuple[int, ...]] = {t.name: tuple(t.shape) for t in source.tensors()}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        return self.source.read(name, dtype=self.dtype)

    def read_as(self, name: str, dtype: torch.dtype) -> Tensor:
        """Tensor ``name`` in ``dtype``; a tensor above ``io.rows.BOUNDED_MIN_BYTES`` is converted a block of
        rows at a time into the result (never its stored copy and the converted one whole at once: 6 GB for
        a 248k-row bf16 embedding read as float32)."""
        from sahc_core.io.rows import is_bounded, read_stored

        info = self.source.info(name)
        if not is_bounded(info) or len(info.shape) < 2:
            return self.source.read(name, dtype=dtype)
        stored = self.source.read(name)  # a view of the file (no copy): kept as it is in its own dtype, where
        if stored.dtype == dtype:        # only the pages used become resident (an embedding's token rows)
            return stored
        del stored
        return read_stored(self.source, name, dtype=dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class AssembledWeights(Mapping):
    """Every weight of an assembled checkpoint (``plans.assemble``), rebuilt on access.

    A tied alias (a tied LM head stored in the source) answers with its target's weight. Each access
    rebuilds: keep the tensor while it is needed, drop it after.

    Parameters
    ----------
    out_dir : str or Path
        The assembled directory (``manifest.json`` + ``compressed-*.safetensors``).
    dtype : torch.dtype
        Dtype of the rebuilt tensors.
    """

    def __init__(self, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        from sahc_core.plans.assemble import read_manifest

        self.root, self.dtype = Path(out_dir), dtype
        self.manifest = read_manifest(self.root)
        self.entries: dict[str, dict] = self.manifest["tensors"]
        self.shapes = {n: tuple(int(d) for d in e["shape"]) for n, e in self.entries.items()}

    @property
    def architecture(self) -> str:
        """The source's ``model_type`` recorded in the manifest."""
        return str(self.manifest.get("source", {}).get("architecture", "unknown"))

    def __getitem__(self, name: str) -> Tensor:
        from sahc_core.methods import registry as methods
        from sahc_core.plans.plan import TIED

        entry = self.entries[name]
        if entry["method"] == TIED:
            entry = self.entries[entry["tied_to"]]
        try:
            with safe_open(str(self.root / entry["file"]), framework="pt", device="cpu") as fh:
                state = {k: fh.get_tensor(key) for k, key in entry["state_keys"].items()}
        except OSError as exc:
            raise ModelError(f"cannot read {name} from {self.root / entry['file']} ({exc}); "
                             "run the assembly again.") from exc
        W = methods.load_compressed(state, entry["meta"]).reconstruct(self.dtype)
        assert tuple(W.shape) == self.shapes[name], f"{name} rebuilt as {tuple(W.shape)}"
        return W

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)
