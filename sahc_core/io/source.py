"""Lazy access to a local Hugging Face model directory: config + (sharded) safetensors.

``ModelSource.open`` reads only ``config.json``, the optional ``model.safetensors.index.json`` and
the safetensors *headers* (a few kB per shard), so opening a 19 GB checkpoint takes milliseconds.
Tensor data is read one tensor at a time with ``safetensors.safe_open(...).get_tensor``. Pickle
checkpoints (``*.bin``, ``*.pt``, ``*.pth``) are refused and never unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sahc_core.device import resolve_device
from sahc_core.errors import ModelError
from sahc_core.io.dtypes import is_analysed, not_analysed_reason
from sahc_core.paths import PathError, member

INDEX_NAME = "model.safetensors.index.json"
#: Largest safetensors JSON header read (the safetensors library's own limit): checked against the
#: 8-byte length field and the file size BEFORE the header is read, so no file can make us allocate more.
MAX_HEADER_BYTES = 100_000_000
#: Largest config.json / index file read (a real index of a 90k-tensor model is about 10 MB).
MAX_JSON_BYTES = 64 * 2**20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Bytes of tensor data sampled at the start and the end of each shard's data region for the
# fingerprint (cheap; catches edits that keep the header and the file size unchanged).
_FP_SAMPLE = 64 * 1024
_CONVERT_HINT = (
    "convert it with transformers: AutoModelForCausalLM.from_pretrained(dir)"
    ".save_pretrained(out_dir, safe_serialization=True)"
)


@dataclass(frozen=True)
class TensorInfo:
    """Header facts of one stored tensor (no data).

    Attributes
    ----------
    name : str
        Tensor name as stored in the checkpoint.
    shape : tuple of int
        Logical shape from the safetensors header.
    dtype : str
        safetensors dtype string: ``"F32"``, ``"BF16"``, ``"F16"``, ``"I64"``, ...
    file : str
        Shard file name (relative to the model directory).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        return math.prod(self.shape)

    @property
    def analysed(self) -> bool:
        """True when the dtype is a float SAHC analyses (see :mod:`sahc_core.io.dtypes`)."""
        return is_analysed(self.dtype)


def header_length(path: Path) -> tuple[int, int]:
    """``(file size, JSON header length)`` of a safetensors file, read from its first 8 bytes only.

    The length is checked against :data:`MAX_HEADER_BYTES` and the file size before anything else
    is read; the messages never show bytes of the file (it may not be a safetensors file at all).
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise ModelError(f"{path.name} is truncated or not a safetensors file ({size} bytes); re-download or re-convert it.")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise ModelError(f"{path.name} is not a valid safetensors file: its header length field exceeds the "
                         f"{MAX_HEADER_BYTES // 10**6} MB limit; re-download or re-convert it.")
    if n > size - 8:
        raise ModelError(f"{path.name} is truncated or corrupt: its header length field exceeds the file size "
                         f"({size} bytes); re-download or re-convert it.")
    return size, n


def _read_header(path: Path) -> tuple[int, bytes]:
    """Return ``(file size, raw header bytes incl. the 8-byte length)`` of a safetensors file.

    Only the header is read, after :func:`header_length` checked its length. safetensors exposes no
    public call for the raw header bytes, which the fingerprint hashes; validation of the header
    itself is left to ``safe_open``.
    """
    size, n = header_length(path)
    with path.open("rb") as fh:
        return size, fh.read(8 + n)


def _shard_tensors(path: Path) -> list[TensorInfo]:
    """List the tensors of one shard via ``safe_open`` (validates header, offsets and file length)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            infos = []
            for key in fh.keys():
                sl = fh.get_slice(key)
                infos.append(TensorInfo(key, tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()), path.name))
    except SafetensorError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"{path.name} is truncated or has a corrupt safetensors header ({reason}); re-download or re-convert it."
        ) from exc
    return infos


def _load_json(path: Path, what: str) -> dict:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ModelError(f"{what} {path} is larger than {MAX_JSON_BYTES >> 20} MiB; it cannot be a real "
                             "Hugging Face file: fix or regenerate it.")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"cannot read {what} {path} ({exc.strerror or exc}); check the file permissions.") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise ModelError(f"{what} {path} is not valid JSON ({reason}); fix or regenerate it.") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{what} {path} must hold a JSON object, not {type(data).__name__}; fix or regenerate it.")
    return data


def _weight_map(root: Path) -> tuple[str, dict[str, str]] | None:
    """``(index file name, weight_map)`` of the sharded-checkpoint index, or None without one."""
    index_path = root / INDEX_NAME
    if not index_path.is_file():
        others = sorted(root.glob("*.safetensors.index.json"))
        if len(others) != 1:
            return None
        index_path = others[0]
    weight_map = _load_json(index_path, "index file").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"index file {index_path.name} has no 'weight_map'; regenerate it with save_pretrained.")
    weight_map = {str(k): str(v) for k, v in weight_map.items()}
    for file in sorted(set(weight_map.values())):  # before any shard is opened: the index is user input
        try:
            member(root, file)
        except PathError:
            raise ModelError(f"index file {index_path.name} names shard {file[:80]!r}, which lies outside the model "
                             f"directory {root}; it was not opened: regenerate the index with save_pretrained.") from None
        if not file.endswith(".safetensors"):
            raise ModelError(f"index file {index_path.name} names shard {file[:80]!r}, which is not a "
                             ".safetensors file; regenerate the index with save_pretrained.")
    return index_path.name, weight_map


def _shard_files(root: Path, index: tuple[str, dict[str, str]] | None) -> list[str]:
    """Shard file names: those of the index when there is one, else every ``*.safetensors``."""
    if index is not None:
        index_name, weight_map = index
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise ModelError(
                f"shard {missing[0]} named in {index_name} is missing from {root}; "
                "copy the complete checkpoint (all shards)."
            )
        return files
    files = sorted(p.name for p in root.glob("*.safetensors") if p.is_file())
    if files:
        return files
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise ModelError(
            f"{root} holds only pickle checkpoints ({pickles[0]}), which are refused because unpickling can run "
            f"code; {_CONVERT_HINT}."
        )
    raise ModelError(f"no *.safetensors files in {root}; point to a Hugging Face model directory with safetensors weights.")


class ModelSource:
    """A local Hugging Face model directory opened lazily (headers only).

    Attributes
    ----------
    path : Path
        Resolved absolute model directory.
    config : dict
        Parsed ``config.json``.
    architecture : str
        ``config["model_type"]`` or ``"unknown"``.
    """

    def __init__(self, path: Path, config: dict, tensors: list[TensorInfo], fingerprint: str) -> None:
        self.path = path
        self.config = config
        self.architecture = str(config.get("model_type") or "unknown")
        self._tensors = sorted(tensors, key=lambda t: t.name)
        self._by_name = {t.name: t for t in self._tensors}
        self._fingerprint = fingerprint

    @classmethod
    def open(cls, path: str | Path) -> ModelSource:
        """Open a model directory, reading config.json and the safetensors headers only.

        Parameters
        ----------
        path : str or Path
            Directory with ``config.json`` and one or many ``*.safetensors``.

        Raises
        ------
        ModelError
            Missing/not-a-directory path, missing or invalid config.json, no safetensors,
            pickle-only checkpoint, truncated/corrupt shard, missing shard, duplicate tensor.
        """
        root = Path(path).expanduser()
        if not root.exists():
            raise ModelError(f"model directory {root} does not exist; pass a local Hugging Face model directory.")
        if not root.is_dir():
            raise ModelError(f"{root} is a file, not a directory; pass the directory that holds config.json and *.safetensors.")
        root = root.resolve()
        config_path = root / "config.json"
        if not config_path.is_file():
            raise ModelError(f"no config.json in {root}; pass a Hugging Face model directory (config.json + *.safetensors).")
        config = _load_json(config_path, "config file")

        digest = hashlib.sha256()
        tensors: dict[str, TensorInfo] = {}
        index = _weight_map(root)
        for name in _shard_files(root, index):
            shard = root / name
            try:
                size, header = _read_header(shard)
                infos = _shard_tensors(shard)
                sample = _data_sample(shard, len(header), size)
            except OSError as exc:
                raise ModelError(f"cannot read {name} ({exc.strerror or exc}); check the file permissions.") from exc
            for info in infos:
                if info.name in tensors:
                    raise ModelError(
                        f"tensor {info.name} is stored twice ({tensors[info.name].file} and {name}); "
                        "remove the stale shard or regenerate the checkpoint."
                    )
                tensors[info.name] = info
            digest.update(f"{name}\0{size}\0".encode())
            digest.update(header)
            digest.update(sample)
        if index is not None:
            _check_index(index, tensors)
        return cls(root, config, list(tensors.values()), digest.hexdigest())

    def tensors(self) -> list[TensorInfo]:
        """All stored tensors sorted by name (header facts only, no data read)."""
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        """Header facts of tensor ``name``; ``ModelError`` when there is no such tensor."""
        try:
            return self._by_name[name]
        except KeyError:
            raise ModelError(
                f"no tensor named {name!r} in {self.path}; list the names with `python -m sahc_core inspect`."
            ) from None

    def read(self, name: str, device: str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read ONE tensor from its shard and move/cast it (float dtypes only, see ``TensorInfo.analysed``).

        Parameters
        ----------
        name : str
            Tensor name.
        device : str
            ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype : torch.dtype, optional
            Cast to this dtype; ``None`` keeps the stored dtype.
        """
        info = self.info(name)
        if not info.analysed:
            raise ModelError(f"{not_analysed_reason(name, info.dtype)}.")
        target = resolve_device(device)
        try:
            with safe_open(str(self.path / info.file), framework="pt") as fh:
                tensor = fh.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"cannot read tensor {name} from {info.file} ({exc}); reopen the model or re-download it.") from exc
        return tensor.to(device=target, dtype=dtype) if dtype is not None else tensor.to(device=target)

    @property
    def fingerprint(self) -> str:
        """sha256 hex over sorted (shard name, size, header bytes, 64 KiB head/tail data samples)."""
        return self._fingerprint

    @property
    def tied_embeddings(self) -> bool:
        """True when config.json (top level or ``text_config``) says ``tie_word_embeddings``."""
        text = self.config.get("text_config")
        text_tied = bool(text.get("tie_word_embeddings", False)) if isinstance(text, dict) else False
        return bool(self.config.get("tie_word_embeddings", False)) or text_tied

    @property
    def num_params(self) -> int:
        """Total stored elements (a tied LM head that is not stored is not counted)."""
        return sum(t.numel for t in self._tensors)

    def __repr__(self) -> str:
        return f"ModelSource({str(self.path)!r}, architecture={self.architecture!r}, tensors={len(self._tensors)})"


def _check_index(index: tuple[str, dict[str, str]], tensors: dict[str, TensorInfo]) -> None:
    """Every tensor the index names must be stored in the shard the index names."""
    index_name, weight_map = index
    for name, file in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file != file:
            raise ModelError(
                f"{index_name} maps tensor {name} to {file} but that shard does not hold it; "
                "regenerate the checkpoint with save_pretrained."
            )


def _data_sample(path: Path, header_len: int, size: int) -> bytes:
    """First and last ``_FP_SAMPLE`` bytes of the data region of a shard (for the fingerprint)."""
    data_len = size - header_len
    with path.open("rb") as fh:
        fh.seek(header_len)
        if data_len <= 2 * _FP_SAMPLE:
            return fh.read(data_len)
        head = fh.read(_FP_SAMPLE)
        fh.seek(size - _FP_SAMPLE)
        return head + fh.read(_FP_SAMPLE)
