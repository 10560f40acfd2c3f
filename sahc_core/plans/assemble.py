"""Apply a plan to every tensor, streaming, and write the compressed checkpoint (+ load it back).

Layout of an assembled directory::

    compressed-00001.safetensors   state tensors of several weights, "<tensor>::<key>" (e.g. "::codes")
    compressed-00002.safetensors   a new shard starts once the current one holds >= shard_bytes
    manifest.json                  plan, per-tensor method/config/shape/dtype/meta/state keys/file/bytes,
                                   versions (sahc_core, torch, transformers, safetensors), source fingerprint

Streaming: one source tensor is read, compressed and its state appended to the current shard
buffer, which is flushed with ``safetensors.torch.save_file`` once it reaches ``shard_bytes``; so
peak memory is one tensor + its compressed state + one shard buffer, never the whole model. A tensor
above ``io.rows.BOUNDED_MIN_BYTES`` (the 248k embedding) is handed to its method in its stored dtype
(int-k quantizes it in row blocks, SVD takes the Gram path, TT streams its first step), not as float32.
Atomic: everything is written into ``<out_dir>.tmp-<pid>`` and renamed to ``out_dir`` only once
``manifest.json`` is complete; any failure removes the temporary directory.

Ownership: the temporary directory gets SAHC's marker (``paths.MARKER``) before anything is written,
so every finished assembly carries it. An existing ``out_dir`` is replaced (``overwrite=True``) only
when it carries the marker or is empty; any other directory or file there is refused and left alone.
Files named by a manifest are read only from inside the assembled directory (``paths.member``).
"""
from __future__ import annotations

import json
import os
import time
from importlib import metadata
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sahc_core.methods import registry as methods
from sahc_core.device import resolve_device
from sahc_core.errors import JobError, ModelError, SahcError
from sahc_core.io.rows import is_bounded, read_stored
from sahc_core.io.source import header_length
from sahc_core.paths import check_removable, member, staged_directory
from sahc_core.metrics import check_finite
from sahc_core.plans.plan import TIED, CompressionPlan, resolve
from sahc_core.methods.quant import state_nbytes

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SEP = "::"
#: Default shard size: a shard is flushed once its buffered state reaches this many bytes.
SHARD_BYTES = 1 << 30
_SHARD_NAME = "compressed-{:05d}.safetensors"


class AssemblyCancelled(JobError):
    """Assembly stopped because ``check_cancel()`` returned True."""


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("sahc_core", "torch", "transformers", "safetensors"):
        if pkg == "sahc_core":
            import sahc_core

            out[pkg] = sahc_core.__version__
            continue
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def header_bytes(path: str | Path) -> int:
    """Bytes of a safetensors file that are not tensor data: the 8-byte length + the JSON header.

    safetensors offers no public call for the header length; it is the little-endian u64 that
    starts the file (format spec), read and bounded by ``io.source.header_length``.
    """
    return 8 + header_length(Path(path))[1]


class _ShardWriter:
    """Buffers state tensors and writes a safetensors shard once ``limit`` bytes are buffered."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root, self.limit = root, limit
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes, self.files = 0, []

    @property
    def current(self) -> str:
        return _SHARD_NAME.format(len(self.files) + 1)

    def add(self, tensors: dict[str, torch.Tensor]) -> str:
        """Buffer ``tensors``; return the shard file they will land in (flushes when full)."""
        name = self.current
        for k, t in tensors.items():
            # clone: state tensors may be views sharing storage, which save_file refuses
            self.buf[k] = t.detach().to("cpu").contiguous().clone()
            self.buf_bytes += t.numel() * t.element_size()
        if self.buf_bytes >= self.limit:
            self.flush()
        return name

    def flush(self) -> None:
        if not self.buf:
            return
        save_file(self.buf, str(self.root / self.current), metadata={"format": "sahc", "version": str(FORMAT_VERSION)})
        self.files.append(self.current)
        self.buf, self.buf_bytes = {}, 0


def _disk_error(exc: Exception, out_dir: Path) -> SahcError:
    reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0] or type(exc).__name__
    return SahcError(f"could not write the compressed checkpoint to {out_dir} ({reason}); "
                     "free disk space or choose another output directory, then run again.")


def assemble(source, plan: CompressionPlan, out_dir: str | Path, progress: Callable | None = None,
             check_cancel: Callable[[], bool] | None = None, shard_bytes: int = SHARD_BYTES,
             overwrite: bool = False, device: str = "auto", calib: Any = None) -> dict:
    """Compress every tensor of ``source`` by ``plan`` and write the checkpoint to ``out_dir``.

    Parameters
    ----------
    source : ModelSource
    plan : CompressionPlan
    out_dir : str or Path
        Final directory; must not exist unless ``overwrite``.
    progress : callable, optional
        ``progress(done, total, tensor_name)`` after each tensor.
    check_cancel : callable, optional
        Polled before each tensor; True -> :class:`AssemblyCancelled` (nothing left on disk).
    shard_bytes : int
        Flush a shard once this many state bytes are buffered.
    overwrite : bool
        Replace an existing ``out_dir``.
    device : str
        Where each tensor is compressed (``"auto"``: the GPU when there is one); states are
        written from CPU.
    calib : calibration statistics, optional
        ``for_weight(name)`` gives each tensor's statistics to its method (needed by calibration-aware
        methods such as gptq and wsvd; a plan that uses one without statistics is refused up front).

    Returns
    -------
    dict
        bytes_actual (sum of ``*.safetensors`` file sizes), bytes_payload (sum of state nbytes),
        bytes_projected, bytes_original, overhead_bytes (actual - payload: headers), ratio_actual,
        ratio_projected, ratio_gap (relative), n_tensors, n_files, files, out_dir, seconds,
        projection_mismatches, tensors (list of dicts).
    """
    from sahc_core.io.components import tensor_table

    dev = resolve_device(device)
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}.")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise SahcError(f"output directory {out} already exists; choose another one or pass overwrite=True.")
    check_removable(out, "output directory")  # before any work: never replace what SAHC did not create
    df = resolve(plan, tensor_table(source), tied_embeddings=bool(source.tied_embeddings))
    needing = [r.name for r in df.itertuples() if r.method != TIED and methods.get(r.method).needs_calibration]
    if needing and calib is None:
        raise methods.CalibrationRequired(
            f"plan {plan.name!r} uses calibration-aware methods on {len(needing)} tensor(s) (e.g. {needing[0]}); "
            "assemble it with calibration statistics (a run captures them itself).")
    t0 = time.perf_counter()
    with staged_directory(out, out.parent / f"{out.name}.tmp-{os.getpid()}", _disk_error, "assembly") as tmp:
        entries = _write_tensors(source, df, tmp, progress, check_cancel, shard_bytes, dev, calib)
        files = sorted(p.name for p in tmp.glob("*.safetensors"))
        manifest = {
            "format": "sahc-compressed", "format_version": FORMAT_VERSION, "plan": plan.to_dict(),
            "source": {"path": str(source.path), "fingerprint": source.fingerprint,
                       "architecture": source.architecture, "tied_embeddings": bool(source.tied_embeddings)},
            "versions": _versions(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files, "tensors": entries,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return _summary(out, df, entries, files, time.perf_counter() - t0)


def _write_tensors(source, df, root: Path, progress, check_cancel, shard_bytes: int, device: str,
                   calib: Any = None) -> dict[str, dict]:
    writer = _ShardWriter(root, shard_bytes)
    entries: dict[str, dict] = {}
    total = len(df)
    for i, row in enumerate(df.itertuples(index=False)):
        if check_cancel is not None and check_cancel():
            raise AssemblyCancelled(f"assembly was cancelled after {i} of {total} tensors; nothing was written.")
        info = source.info(row.name)
        entry: dict[str, Any] = {"method": row.method, "config": row.config, "shape": list(row.shape),
                                 "dtype": info.dtype, "component": row.component, "rule": row.rule,
                                 "bytes_projected": int(row.bytes)}
        if row.method == TIED:
            entry.update(tied_to=row.tied_to, state_keys={}, file=None, bytes=0)
        else:
            cfg = methods.config_from_dict(row.config)
            # a tensor above io.rows.BOUNDED_MIN_BYTES stays in its stored dtype, read without mapped residency
            # (the methods convert it block by block); the others as float32
            W = (read_stored(source, row.name).to(device) if is_bounded(info)
                 else source.read(row.name, device=device, dtype=torch.float32))
            check_finite(W, f"tensor {row.name!r}", "it cannot be compressed or kept")  # named, before any work
            stats = calib.for_weight(row.name) if calib is not None and methods.spec_of(cfg).needs_calibration else None
            c = methods.compress(W, cfg, stats)
            del W
            state = c.state()
            keyed = {f"{row.name}{SEP}{k}": t for k, t in state.items()}
            entry.update(meta=c.meta(), state_keys={k: f"{row.name}{SEP}{k}" for k in state},
                         bytes=state_nbytes(state))
            entry["file"] = writer.add(keyed)
            del c, state, keyed
        entries[row.name] = entry
        if progress is not None:
            progress(i + 1, total, row.name)
    writer.flush()
    return entries


def _summary(out: Path, df, entries: dict[str, dict], files: list[str], seconds: float) -> dict:
    actual = sum((out / f).stat().st_size for f in files)
    payload = sum(e["bytes"] for e in entries.values())
    projected = int(df["bytes"].sum())
    original = int(df["orig_bytes"].sum())
    r_act = original / actual if actual else float("nan")
    r_proj = original / projected if projected else float("nan")
    mism = [n for n, e in entries.items() if e["bytes"] != e["bytes_projected"]]
    return {
        "out_dir": str(out), "bytes_actual": actual, "bytes_payload": payload, "bytes_projected": projected,
        "bytes_original": original, "overhead_bytes": actual - payload, "ratio_actual": r_act,
        "ratio_projected": r_proj, "ratio_gap": abs(r_act - r_proj) / r_proj if projected else float("nan"),
        "n_tensors": len(entries), "n_files": len(files), "files": files, "seconds": seconds,
        "projection_mismatches": mism,
        "tensors": [{"name": n, "method": e["method"], "component": e["component"], "shape": e["shape"],
                     "bytes_projected": e["bytes_projected"], "bytes": e["bytes"], "file": e["file"]}
                    for n, e in entries.items()],
    }


def read_manifest(out_dir: str | Path) -> dict:
    """The manifest of an assembled directory; ModelError if it is absent (not a finished assembly)."""
    p = Path(out_dir) / MANIFEST
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"{out_dir} is not a finished assembly (no {MANIFEST}); run the assembly again.") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{p} is unreadable ({exc}); run the assembly again.") from exc


def iter_assembled(out_dir: str | Path, manifest: dict | None = None) -> Iterator[tuple[str, dict, Any]]:
    """``(name, manifest entry, compressed tensor)`` of every stored tensor of an assembled checkpoint,
    read back from its files (``methods.load_compressed``), file by file; tied aliases are skipped.
    ``manifest``: the directory's :func:`read_manifest`, when the caller has it already."""
    root = Path(out_dir)
    manifest = manifest if manifest is not None else read_manifest(root)
    by_file: dict[str, list[str]] = {}
    for name, e in manifest["tensors"].items():
        if e["method"] != TIED:
            by_file.setdefault(e["file"], []).append(name)
    for file, names in by_file.items():
        with safe_open(str(member(root, file, f"a file named in {MANIFEST}")), framework="pt", device="cpu") as fh:
            for name in names:
                e = manifest["tensors"][name]
                yield name, e, methods.load_compressed({k: fh.get_tensor(key) for k, key in e["state_keys"].items()},
                                                       e["meta"])


def tie_aliases(manifest: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add every tied alias of ``manifest`` (a tied LM head) to ``state`` as the same tensor it is tied to."""
    for name, e in manifest["tensors"].items():
        if e["method"] == TIED:
            state[name] = state[e["tied_to"]]
    return state


def load_assembled(out_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Rebuild every weight of an assembled checkpoint with its original name and shape.

    Each tensor is reconstructed through ``methods.load_compressed(state, meta).reconstruct(dtype)``;
    a tied LM head stored in the source is returned as the same tensor as the embedding.
    """
    manifest = read_manifest(out_dir)
    state = {name: c.reconstruct(dtype).to(device) for name, _, c in iter_assembled(out_dir, manifest)}
    return tie_aliases(manifest, state)


def shape_gate(source, state: dict[str, torch.Tensor]) -> tuple[int, int, list[dict]]:
    """Shape-match gate: ``(matched, total, mismatches)`` of ``state`` against every source tensor.

    A mismatch is ``{"name", "expected", "got"}`` with ``got`` None for a missing tensor and
    ``expected`` None for a tensor the source does not have.
    """
    mism: list[dict] = []
    matched = 0
    names = set()
    for info in source.tensors():
        names.add(info.name)
        got = tuple(state[info.name].shape) if info.name in state else None
        if got == tuple(info.shape):
            matched += 1
        else:
            mism.append({"name": info.name, "expected": list(info.shape), "got": None if got is None else list(got)})
    mism += [{"name": n, "expected": None, "got": list(state[n].shape)} for n in sorted(set(state) - names)]
    return matched, len(names), mism
