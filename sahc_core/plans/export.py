"""Export an assembled run checkpoint as a dense Hugging Face model, a compressed-tensors model or GGUF.

Not to be confused with ``sahc_core.export`` (the REPORT export). Input: the run's assembled
directory (``manifest.json`` + ``compressed-*.safetensors``, :mod:`sahc_core.plans.assemble`) and the
original model directory it was assembled from (config, tokenizer; checked by fingerprint). Output:
an ordinary model directory that loads with ``transformers`` alone.

Formats (``fmt``):

- ``"dense"``: any plan. Every tensor reconstructed (``c.reconstruct(dtype)``: float32 arithmetic,
  then one rounding to ``dtype``), tied aliases stored exactly as the source checkpoint stored them,
  ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
  (a shard is closed before it would pass ``shard_bytes``, default :data:`SHARD_BYTES` = 5 GB, the
  Hugging Face Hub's long-standing ``max_shard_size``). ``dtype="float32"`` loads bit for bit as
  :func:`sahc_core.plans.assemble.load_assembled` returns the weights.
- ``"compressed-tensors"``: int-k tensors keep the run's codes and fp16 scales (pack-quantized,
  sym only); see :mod:`sahc_core.plans._ct` for the decisions (asym refused, embeddings and SVD/TT
  dense) and the exact-load conditions.
- ``"gguf"``: one ``model.gguf`` for the llama architecture where every int tensor maps exactly onto
  a GGML block type; see :mod:`sahc_core.plans._gguf`.

Robustness: a non-empty ``out_dir`` is refused unless ``force``, and ``force`` replaces only an earlier
export (every export carries SAHC's ``paths.MARKER``; any other directory is never deleted); everything is written into a hidden
``.<name>.tmp-export-<pid>`` directory beside ``out_dir`` and moved into place with ``os.replace``
only once complete, so a crash or a full disk never leaves a directory that looks like a model; an
``OSError`` while writing (e.g. ENOSPC) becomes one :class:`~sahc_core.errors.SahcError` sentence.

References
----------
.. [1] Hugging Face, "Sharded checkpoints" (``model.safetensors.index.json``), transformers docs.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from sahc_core.plans.assemble import MANIFEST, iter_assembled, read_manifest
from sahc_core.plans.plan import TIED
from sahc_core.errors import JobError, ModelError, SahcError
from sahc_core.paths import check_removable, safe_id, staged_directory

ExportFormat = Literal["compressed-tensors", "dense", "gguf"]
#: Largest dense/compressed-tensors shard: the Hugging Face Hub's long-standing ``max_shard_size``.
SHARD_BYTES = 5 * 10**9
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: Files of the model directory that are weights (never copied) or describe weights that are not exported.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".h5", ".msgpack")
_NOT_COPIED = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "sahc_conversion.json"}


class ExportRefused(SahcError):
    """The checkpoint cannot be written exactly in the requested format (the message says why and what to do)."""


@dataclass(frozen=True)
class ExportJob:
    """One export: the assembled checkpoint, its source model and the output settings."""

    run_dir: Path
    manifest: dict
    model_dir: Path
    config: dict                  # the source config.json
    architecture: str
    dtype: str                    # dense tensors (reconstructions) are written in this dtype
    shard_bytes: int
    progress: Callable[[int, int, str], None] | None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def tensors(self) -> dict[str, dict]:
        return self.manifest["tensors"]

    def aliases(self) -> dict[str, str]:
        """``{tied alias: the tensor it is tied to}`` (a tied LM head the source stored)."""
        return {n: e["tied_to"] for n, e in self.tensors.items() if e["method"] == TIED}

    def items(self) -> Iterator[tuple[str, dict, Any]]:
        """``(name, entry, compressed)`` of every tensor the source stored; tied aliases come last,
        with their target's entry and compressed tensor. Calls ``progress`` after each one."""
        aliases = self.aliases()
        targets = set(aliases.values())
        kept: dict[str, tuple[dict, Any]] = {}
        total, done = len(self.tensors), 0
        for name, e, c in iter_assembled(self.run_dir, self.manifest):
            if name in targets:
                kept[name] = (e, c)
            yield name, e, c
            done += 1
            self._tick(done, total, name)
        for alias, target in aliases.items():
            yield (alias, *kept[target])
            done += 1
            self._tick(done, total, alias)

    def _tick(self, done: int, total: int, name: str) -> None:
        if self.progress is not None:
            self.progress(done, total, name)


@dataclass(frozen=True)
class _Format:
    check: Callable[[ExportJob], None]        # refuse before anything is written (no tensor data read)
    write: Callable[[ExportJob, Path], dict]  # write into the staging directory; notes and counts


def export_checkpoint(run_dir_or_manifest_dir: str | Path, model_dir: str | Path, out_dir: str | Path,
                      fmt: ExportFormat, *, dtype: str = "bfloat16", force: bool = False,
                      progress: Callable[[int, int, str], None] | None = None,
                      shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the assembled checkpoint in ``run_dir_or_manifest_dir`` to ``out_dir`` as ``fmt``.

    Parameters
    ----------
    run_dir_or_manifest_dir : str or Path
        The assembled directory (holds ``manifest.json``), or that ``manifest.json`` itself.
    model_dir : str or Path
        The original model it was assembled from (its fingerprint must match the manifest's).
    out_dir : str or Path
        Created; an existing non-empty directory is replaced only with ``force``.
    fmt : {"compressed-tensors", "dense", "gguf"}
    dtype : {"bfloat16", "float16", "float32"}
        Dtype of every tensor written dense (all of them for ``"dense"``; SVD/TT reconstructions and
        the other non-packed int tensors for the other formats).
    force : bool
    progress : callable, optional
        ``progress(done, total, tensor_name)`` after each tensor.
    shard_bytes : int
        Largest safetensors shard (dense and compressed-tensors).

    Returns
    -------
    dict
        ``out``, ``format``, ``dtype``, ``bytes`` (every file of ``out``), ``bytes_weights`` (weight
        files only), ``bytes_run`` (the run's ``compressed-*.safetensors``), ``tensors`` (tensors
        written), ``files``, ``notes`` (decisions, one sentence each), ``seconds``, plus the
        format's own keys (compressed-tensors: ``packed``, ``dense_fallback``, ``overhead``).

    Raises
    ------
    ExportRefused
        The plan cannot be written exactly in ``fmt`` (nothing is written).
    SahcError
        ``out_dir`` is not empty, or writing failed (disk full); no output directory is left.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(map(repr, FORMATS))}, got {fmt!r}.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}.")
    t0 = time.perf_counter()
    run = Path(run_dir_or_manifest_dir).expanduser().resolve()
    run = run.parent if run.name == MANIFEST and run.is_file() else run
    job = _job(run, Path(model_dir).expanduser().resolve(), dtype, shard_bytes, progress)
    out = _check_out(Path(out_dir).expanduser().resolve(), force, (job.run_dir, job.model_dir))
    spec = _LOADERS[fmt]()
    spec.check(job)
    with staged_directory(out, out.parent / f".{out.name}.tmp-export-{os.getpid()}", _write_error, "export") as tmp:
        info = spec.write(job, tmp)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    weights = [f for f in files if f.endswith((".safetensors", ".gguf"))]
    return {"out": str(out), "format": fmt, "dtype": dtype,
            "bytes": sum((out / f).stat().st_size for f in files),
            "bytes_weights": sum((out / f).stat().st_size for f in weights),
            "bytes_run": sum((job.run_dir / f).stat().st_size for f in job.manifest["files"]),
            "files": files, "seconds": time.perf_counter() - t0, **info}


def _job(run_dir: Path, model_dir: Path, dtype: str, shard_bytes: int, progress) -> ExportJob:
    from sahc_core.io.source import ModelSource

    manifest = read_manifest(run_dir)
    source = ModelSource.open(model_dir)
    want = manifest["source"]["fingerprint"]
    if source.fingerprint != want:
        raise ModelError(f"{model_dir} is not the model this checkpoint was assembled from (fingerprint differs); "
                         f"pass the run's model directory ({manifest['source']['path']}).")
    return ExportJob(run_dir, manifest, source.path, dict(source.config), source.architecture, dtype, shard_bytes,
                     progress)


def _check_out(out: Path, force: bool, protected: tuple[Path, ...]) -> Path:
    if out.exists() and not out.is_dir():
        raise SahcError(f"{out} is a file, not a directory; choose a directory for the export.")
    for p in protected:
        if p == out or p.is_relative_to(out):
            raise SahcError(f"the export directory {out} would replace {p}, which the export reads; choose another one.")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise SahcError(f"output directory {out} exists and is not empty; choose another one or pass force=True "
                            "to replace it.")
        check_removable(out, "output directory")  # force replaces only an earlier export (SAHC's marker)
    return out


def _write_error(exc: Exception, out: Path) -> SahcError:
    full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc)
    if full:
        return SahcError(f"the disk is full: the export to {out} was not written (no space left on device); free "
                         "disk space or choose another output directory, then export again.")
    reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return SahcError(f"could not write the export to {out} ({reason}); check the directory and export again.")


class ShardWriter:
    """Streams named tensors into safetensors shards of at most ``limit`` bytes (one buffered shard).

    :meth:`finish` names them like ``save_pretrained``: ``model.safetensors`` for one shard, else
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json`` [1]_.
    """

    def __init__(self, root: Path, limit: int) -> None:
        self.root, self.limit = root, limit
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes, self.total = 0, 0
        self.parts: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buf and self.buf_bytes + nbytes > self.limit:
            self._flush()
        # clone: a view or a tensor shared with another name is refused by save_file
        self.buf[name] = tensor.detach().to("cpu").contiguous().clone()
        self.buf_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.root / f".part-{len(self.parts) + 1:05d}.safetensors"
        save_file(self.buf, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.buf)))
        self.buf, self.buf_bytes = {}, 0

    def finish(self) -> int:
        """Write the last shard and the index; return the number of tensors written."""
        if self.buf or not self.parts:
            self._flush()
        n = len(self.parts)
        if n == 1:
            self.parts[0][0].rename(self.root / "model.safetensors")
            return len(self.parts[0][1])
        weight_map = {}
        for k, (path, names) in enumerate(self.parts, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            path.rename(self.root / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        return len(weight_map)


def copy_model_files(job: ExportJob, dest: Path, config: dict) -> None:
    """Write ``config`` as ``config.json`` and copy every other non-weight top-level file of the model
    directory (tokenizer, generation config, chat template) into ``dest``."""
    for f in sorted(job.model_dir.iterdir()):
        if f.is_file() and f.name != "config.json" and f.name not in _NOT_COPIED and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, dest / f.name)
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def config_with_dtype(config: dict, dtype: str) -> dict:
    """The source config with its default dtype set to ``dtype`` (``dtype``; ``torch_dtype`` where the
    source still uses that older key)."""
    out = {**config, "dtype": dtype}
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype
    return out


def _check_dense(job: ExportJob) -> None:
    return None  # every plan reconstructs


def _write_dense(job: ExportJob, tmp: Path) -> dict:
    shards = ShardWriter(tmp, job.shard_bytes)
    methods = set()
    for name, e, c in job.items():
        methods.add(e["method"])
        shards.add(name, c.reconstruct(job.torch_dtype))
    n = shards.finish()
    copy_model_files(job, tmp, config_with_dtype(job.config, job.dtype))
    notes = [f"every tensor is reconstructed from the run's checkpoint and stored in {job.dtype}."]
    if job.dtype != "float32" and methods - {"keep"}:
        notes.append(f"the reconstructions are computed in float32 and rounded once to {job.dtype}; export with "
                     "dtype='float32' to load bit for bit the weights the run evaluated.")
    if job.aliases():
        notes.append(f"tied tensors stored by the source ({', '.join(job.aliases())}) are stored again as copies.")
    return {"tensors": n, "notes": notes}


def _dense_format() -> _Format:
    return _Format(_check_dense, _write_dense)


def _ct_format() -> _Format:
    from sahc_core.plans import _ct  # imports compressed_tensors: only when asked for

    return _Format(_ct.check, _ct.write)


def _gguf_format() -> _Format:
    from sahc_core.plans import _gguf

    return _Format(_gguf.check, _gguf.write)


_LOADERS: dict[str, Callable[[], _Format]] = {"compressed-tensors": _ct_format, "dense": _dense_format,
                                              "gguf": _gguf_format}
FORMATS: tuple[str, ...] = tuple(_LOADERS)


def export_run(cache, run_id: str, out_dir: str | Path, fmt: ExportFormat, *, model_dir: str | Path | None = None,
               dtype: str = "auto", force: bool = False, progress: Callable[[int, int, str], None] | None = None,
               shard_bytes: int = SHARD_BYTES) -> dict:
    """Export the checkpoint of a finished run (looked up with ``jobs.run_status``) with :func:`export_checkpoint`.

    ``dtype="auto"`` writes the dtype the run's perplexity was measured in (float32 by default), so
    the export's perplexity equals the run's: a bfloat16 dense copy of a float32-evaluated int4 run
    differs by about 0.1-0.2 % in perplexity (the rounding of every weight to bfloat16).

    Refuses (``JobError``): an unknown run, a run still queued/running, a failed or cancelled run,
    and a run whose checkpoint files were deleted (``jobs.delete_run_files``; the message says how to
    re-create them). ``model_dir`` defaults to the run's model. The result adds ``run_id``,
    ``run_bytes_actual``, ``run_ppl`` and ``run_protocol`` (the run's own numbers).
    """
    from sahc_core.runs.jobs import ACTIVE, jobs_dir, run_files, run_status

    row = run_status(cache, safe_id(run_id, "run id"))
    status = row["status"]
    if status in ACTIVE:
        raise JobError(f"run {run_id} is still {status}; wait for it to finish (or cancel it) before exporting.")
    if status != "done":
        why = f" ({row['error']})" if row.get("error") else ""
        raise JobError(f"run {run_id} {status}{why} and has no finished checkpoint to export; fix the cause and run "
                       "its plan again.")
    result = row.get("result") or {}
    path = run_files(cache, run_id, result)
    model = model_dir or result.get("model_path") or row.get("model_path")
    if path is None or not (path / MANIFEST).is_file():
        plan_file = jobs_dir(cache) / f"{run_id}.plan.json"
        plan = str(plan_file) if plan_file.is_file() else "PLAN.json (the run's plan, shown on the Runs page)"
        raise JobError(f"the checkpoint files of run {run_id} were deleted; re-create them by running its stored plan "
                       f"again (python -m sahc_core run --plan {plan} --model {model}) and export the new run.")
    if not model:
        raise JobError(f"run {run_id} records no model directory; pass model_dir (the model it was run on).")
    if dtype == "auto":
        dtype = (result.get("protocol") or {}).get("dtype") or "float32"
    res = export_checkpoint(path, model, out_dir, fmt, dtype=dtype, force=force, progress=progress,
                            shard_bytes=shard_bytes)
    return {**res, "run_id": run_id, "run_bytes_actual": result.get("bytes_actual"), "run_ppl": result.get("ppl"),
            "run_protocol": result.get("protocol")}
