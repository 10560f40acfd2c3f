"""Background runs: start a worker process, report progress into the cache, cancel, recover.

A run is one row of the ``runs`` table. :func:`start_run` inserts it (``queued``) and spawns
``python -m sahc_core run --run-id ID --plan FILE ...`` in its own session (so it survives page
reloads and the app's restarts), with stdout/stderr in ``<cache dir>/jobs/<run_id>.log``. The worker
writes through a :class:`JobReporter`: status ``running``, stage, throttled progress (a heartbeat in
``updated_at``), the result, or the error. :func:`cancel_run` sets ``cancel_requested`` and sends
SIGTERM to the worker's process group; the worker marks itself ``cancelled``. A worker that died
without a word (SIGKILL, out of memory) is marked ``failed`` by :func:`reap_dead`, which every
:func:`list_runs` calls; its pid is only trusted together with the process start time recorded at
launch, so a reused pid is never mistaken for the worker.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from sahc_core.cache import Cache, from_json, to_json, utcnow
from sahc_core.errors import JobError
from sahc_core.paths import PathError, contained, is_owned, remove_owned, safe_id

ACTIVE = ("queued", "running")
TERMINAL = ("done", "failed", "cancelled")
PROGRESS_INTERVAL_S = 0.5   # at most ~2 progress writes per second
CANCEL_POLL_S = 0.5         # at most ~2 cancel look-ups per second
DIED = "process died (exit unknown)"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_children: dict[int, subprocess.Popen] = {}  # workers this process started (reaped on list_runs)

LIST_COLUMNS = ["run_id", "plan_name", "status", "stage", "ratio_projected", "ratio_actual", "ppl", "baseline_ppl",
                "delta_ppl", "ppl_threshold", "gates_passed", "gates_failed", "started_at", "duration_s", "error",
                "model_fp", "model_path", "checkpoint_mb", "ratio", "delta_ppl_pct",
                "protocol", "protocol_key", "corpus", "corpus_fp", "tokens", "window", "stride", "dtype"]
_NUMERIC = ("ratio_projected", "ratio_actual", "ppl", "baseline_ppl", "delta_ppl", "ppl_threshold")


class JobCancelled(JobError):
    """The run was cancelled (cancel button, ``cancel_run`` or SIGTERM)."""


def new_run_id() -> str:
    """A sortable, unique run id: ``YYYYmmdd-HHMMSS-xxxxxx`` (UTC); it matches ``paths.ID_PATTERN``."""
    return f"{utcnow():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def run_dir(cache: Cache, run_id: str) -> Path:
    """``<cache dir>/runs/<run_id>``, the default checkpoint directory of a run.

    The run id is checked against ``paths.ID_PATTERN`` and the path is checked to resolve inside
    ``<cache dir>/runs`` (a symlink planted there cannot redirect it), so ``--run-id ..`` or
    ``../../victim`` never names anything else.
    """
    return contained(cache.path.parent / "runs", safe_id(run_id, "run id"), "run directory")


def jobs_dir(cache: Cache) -> Path:
    """``<cache dir>/jobs``: plan files and logs of background runs."""
    return cache.path.parent / "jobs"


# -- process identity ------------------------------------------------------------------------------
def process_start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), None if gone.

    A zombie (exited, not yet reaped) counts as gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is fields[0]
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _alive(pid: int | None, start: str | None) -> bool:
    """Is the worker ``pid`` (started at ``start``) still running?"""
    if pid is None or (isinstance(pid, float) and math.isnan(pid)):
        return False
    pid = int(pid)
    child = _children.get(pid)
    if child is not None and child.poll() is not None:  # our own child: reap it, exit is known
        _children.pop(pid, None)
        return False
    if Path("/proc/self/stat").exists():
        now = process_start_time(pid)
        return now is not None and (start is None or now == start)
    try:  # no /proc (macOS): signal 0 only tells that some process has this pid
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def progress_parts(p: dict[str, Any]) -> list[str]:
    """``["tensors 12/272", "tokens 4,096/63,989", "stage ETA 31 s", "run ETA ≈ 3 min 10 s"]`` from a progress dict.

    One wording for the CLI's stderr lines and the Runs page's progress bars; the run ETA comes from
    :func:`sahc_core.runs.eta.overall` when the run recorded its expected work.
    """
    from sahc_core.figures.format import fmt_duration
    from sahc_core.runs.eta import overall

    parts = []
    if p.get("tensors_total"):
        parts.append(f"tensors {p.get('tensors_done', 0)}/{p['tensors_total']}")
    if p.get("tokens_total"):
        parts.append(f"tokens {p.get('tokens_done', 0):,}/{p['tokens_total']:,}")
    if p.get("eta_s") is not None:
        parts.append(f"stage ETA {fmt_duration(p['eta_s'])}")
    left = overall(p)[1]
    if left is not None:
        parts.append(f"run ETA ≈ {fmt_duration(left)}")
    return parts


# -- reporter (used inside the worker) -------------------------------------------------------------
class JobReporter:
    """What a running job writes into its ``runs`` row.

    Parameters
    ----------
    cache : Cache
    run_id : str
    echo : text stream, optional
        Also print each progress write as one line here (the CLI passes ``sys.stderr``).
    """

    def __init__(self, cache: Cache, run_id: str, echo: TextIO | None = None) -> None:
        safe_id(run_id, "run id")
        self.cache, self.run_id, self.echo = cache, run_id, echo
        self._progress: dict[str, Any] = {}
        self._sticky: dict[str, Any] = {"stage_seconds": {}}  # kept across stages (see expect, stage)
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._stage_t0 = time.monotonic()
        self._cancelled = False
        self._old_handler: Any = None

    def start(self, plan: dict | None = None, model_path: str | None = None, model_fp: str | None = None) -> None:
        """Mark the run ``running`` with this pid (creating the row if a CLI run has none)."""
        pid = os.getpid()
        now = utcnow()
        plan_name = (plan or {}).get("name")
        self.cache.execute(
            "INSERT OR IGNORE INTO runs (run_id, plan_name, plan, status, cancel_requested, started_at, updated_at) "
            "VALUES (?, ?, ?, 'queued', false, ?, ?)", [self.run_id, plan_name, to_json(plan), now, now])
        self.cache.execute(
            "UPDATE runs SET status = 'running', pid = ?, pid_start = ?, updated_at = ?, "
            "plan_name = coalesce(plan_name, ?), plan = coalesce(plan, ?), model_path = coalesce(model_path, ?), "
            "model_fp = coalesce(model_fp, ?) WHERE run_id = ?",
            [pid, process_start_time(pid), now, plan_name, to_json(plan) if plan else None, model_path, model_fp,
             self.run_id])
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.check_cancel(force=True)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._cancelled = True
        raise JobCancelled(f"run {self.run_id} was cancelled.")

    def _restore_signal(self) -> None:
        if self._old_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_handler)
            self._old_handler = None

    def stage(self, name: str) -> None:
        """Enter a new stage (written at once; progress counters restart, ``stage_seconds`` records the last)."""
        now = time.monotonic()
        if self._progress.get("stage"):
            self._sticky["stage_seconds"][self._progress["stage"]] = round(now - self._stage_t0, 3)
        self._progress = {"stage": name, **self._sticky}
        self._stage_t0 = now
        self._write(force=True)

    def expect(self, **fields: Any) -> None:
        """Fields kept in the progress of every later stage (e.g. ``expected`` work and rates for the ETA)."""
        self._sticky.update(fields)
        self._progress.update(fields)
        self._write(force=True)

    def progress(self, force: bool = False, **fields: Any) -> None:
        """Merge progress fields (``tensors_done``, ``tensors_total``, ``tokens_done``, ...; throttled).

        ``eta_s`` and ``fraction`` of the stage are derived from the ``*_done``/``*_total`` pair given.
        """
        self._progress.update(fields)
        for unit in ("tensors", "tokens"):
            done, total = fields.get(f"{unit}_done"), fields.get(f"{unit}_total")
            if done is not None and total:
                self._progress["fraction"] = min(1.0, done / total)
                if "eta_s" not in fields:
                    elapsed = time.monotonic() - self._stage_t0
                    self._progress["eta_s"] = elapsed * (total - done) / done if done else None
        self._write(force=force or self._progress.get("fraction") == 1.0)  # a finished counter always lands
        self.check_cancel()

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < PROGRESS_INTERVAL_S:
            return
        self._last_write = now
        self._progress["stage_elapsed_s"] = round(now - self._stage_t0, 3)
        if self.echo is not None:
            line = ", ".join([f"stage {self._progress.get('stage')!r}", *progress_parts(self._progress)])
            print(f"[{self.run_id}] {line}", file=self.echo, flush=True)
        self.cache.execute("UPDATE runs SET stage = ?, progress = ?, updated_at = ? WHERE run_id = ?",
                           [self._progress.get("stage"), to_json(self._progress), utcnow(), self.run_id])

    def cancel_requested(self) -> bool:
        """True once a cancel was asked for (read from the cache at most every ``CANCEL_POLL_S``)."""
        if self._cancelled:
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= CANCEL_POLL_S:
            self._last_cancel_check = now
            rows = self.cache.execute("SELECT cancel_requested FROM runs WHERE run_id = ?", [self.run_id])
            self._cancelled = bool(rows and rows[0][0])
        return self._cancelled

    def check_cancel(self, force: bool = False) -> None:
        """Raise :class:`JobCancelled` when a cancel was asked for."""
        if force:
            self._last_cancel_check = 0.0
        if self.cancel_requested():
            raise JobCancelled(f"run {self.run_id} was cancelled.")

    def _end(self, status: str, result: dict | None, error: str | None) -> None:
        self._restore_signal()
        now = utcnow()
        self.cache.execute(
            "UPDATE runs SET status = ?, result = coalesce(?, result), error = ?, progress = ?, updated_at = ?, "
            "finished_at = ? WHERE run_id = ?",
            [status, to_json(result) if result is not None else None, error, to_json(self._progress), now, now,
             self.run_id])

    def finish(self, result: dict) -> None:
        """Store the result and mark the run ``done``."""
        self._progress["fraction"] = 1.0
        self._end("done", result, None)

    def fail(self, message: str) -> None:
        """Mark the run ``failed`` with a one-line message."""
        self._end("failed", None, " ".join(str(message).split()) or "failed")

    def cancelled(self) -> None:
        """Mark the run ``cancelled``."""
        self._end("cancelled", None, "cancelled by the user")


# -- the app / CLI side -------------------------------------------------------------------------------
def _plan_dict(plan: Any) -> dict:
    if isinstance(plan, dict):
        from sahc_core.plans.plan import CompressionPlan

        return CompressionPlan.from_dict(plan).to_dict()  # validates before anything is spawned
    if hasattr(plan, "to_dict"):
        return plan.to_dict()
    raise ValueError(f"plan must be a CompressionPlan or its dict form, got {type(plan).__name__}.")


def start_run(cache: Cache, plan: Any, model_dir: str | Path, corpus: str | Path | None = None,
              window: int | None = None, max_tokens: int | None = None, device: str = "auto",
              ppl_threshold: float | None = None, dtype: str = "float32", offload: str = "auto") -> str:
    """Queue a run and start its worker process; returns the run id at once.

    Parameters
    ----------
    cache : Cache
        Where the run row lives (the worker opens the same file).
    plan : CompressionPlan or dict
    model_dir : str or Path
    corpus, window, max_tokens, device, ppl_threshold, dtype, offload
        Passed to ``python -m sahc_core run`` (see :func:`sahc_core.runs.pipeline.execute_run`).
    """
    from sahc_core.evaluate.perplexity import PplConfig, check_window
    from sahc_core.io.source import ModelSource

    plan_d = _plan_dict(plan)
    if ppl_threshold is not None:  # a bad threshold fails here, not in the worker
        from sahc_core.gates import ppl_increase_gate

        ppl_increase_gate(1.0, 1.0, ppl_threshold)
    model_dir = Path(model_dir).expanduser().resolve()
    source = ModelSource.open(model_dir)
    check_window(PplConfig(window=window, max_tokens=max_tokens, device=device), source.config)
    if corpus is not None:  # fail now, with the reason, rather than in a worker that was reported as started
        from sahc_core.io.corpus import load_corpus

        load_corpus(corpus)
    run_id = new_run_id()
    jdir = jobs_dir(cache)
    try:
        jdir.mkdir(parents=True, exist_ok=True)
        plan_file = jdir / f"{run_id}.plan.json"
        plan_file.write_text(to_json(plan_d), encoding="utf-8")
    except OSError as exc:
        raise JobError(f"cannot write the job files in {jdir} ({exc.strerror}); make it writable.") from exc
    log_path = jdir / f"{run_id}.log"
    now = utcnow()
    cache.execute(
        "INSERT INTO runs (run_id, plan_name, plan, model_path, model_fp, status, stage, cancel_requested, "
        "started_at, updated_at, log_path) VALUES (?, ?, ?, ?, ?, 'queued', 'queued', false, ?, ?, ?)",
        [run_id, plan_d.get("name"), to_json(plan_d), str(model_dir), source.fingerprint, now, now, str(log_path)])
    cmd = [sys.executable, "-m", "sahc_core", "run", "--run-id", run_id, "--plan", str(plan_file),
           "--model", str(model_dir), "--cache", str(cache.path), "--device", device, "--dtype", dtype,
           "--offload", offload, "--json"]
    for flag, value in (("--corpus", corpus), ("--window", window), ("--max-tokens", max_tokens),
                        ("--ppl-threshold", ppl_threshold)):
        if value is not None:
            cmd += [flag, str(value)]
    env = {**os.environ, "SAHC_CACHE": str(cache.path),
           "PYTHONPATH": os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=str(_REPO_ROOT), env=env, start_new_session=True)
    except OSError as exc:
        cache.execute("UPDATE runs SET status = 'failed', error = ?, finished_at = ? WHERE run_id = ?",
                      [f"could not start the worker: {exc}", utcnow(), run_id])
        raise JobError(f"could not start the run worker ({exc.strerror}).") from exc
    _children[proc.pid] = proc
    cache.execute("UPDATE runs SET pid = ?, pid_start = ? WHERE run_id = ? AND pid IS NULL",
                  [proc.pid, process_start_time(proc.pid), run_id])
    return run_id


def _row(cache: Cache, run_id: str) -> dict:
    df = cache.query_df("SELECT * FROM runs WHERE run_id = ?", [run_id])
    if df.empty:
        raise JobError(f"no run with id {run_id!r} in {cache.path}; pick one from the runs list.")
    return df.iloc[0].to_dict()


def run_status(cache: Cache, run_id: str) -> dict:
    """Everything about one run: the row with ``plan``/``progress``/``result`` decoded, and ``alive``."""
    reap_dead(cache)
    row = _row(cache, run_id)
    for key in ("plan", "progress", "result"):
        row[key] = from_json(row[key]) if isinstance(row.get(key), str) else None
    row = {k: (None if _is_na(v) else v) for k, v in row.items()}
    row["alive"] = row["status"] in ACTIVE and _alive(row.get("pid"), row.get("pid_start"))
    row["duration_s"] = _duration(row.get("started_at"), row.get("finished_at"))
    return row


def _is_na(v: Any) -> bool:
    try:
        return v is None or bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _duration(started: Any, finished: Any) -> float | None:
    if _is_na(started):
        return None
    end = utcnow() if _is_na(finished) else pd.Timestamp(finished).to_pydatetime()
    return max(0.0, (end - pd.Timestamp(started).to_pydatetime()).total_seconds())


def cancel_run(cache: Cache, run_id: str) -> None:
    """Ask a run to stop: set ``cancel_requested`` and SIGTERM its process group (no-op once finished)."""
    row = _row(cache, run_id)
    if row["status"] not in ACTIVE:
        return
    cache.execute("UPDATE runs SET cancel_requested = true, updated_at = ? WHERE run_id = ?", [utcnow(), run_id])
    pid = None if _is_na(row.get("pid")) else int(row["pid"])
    start = None if _is_na(row.get("pid_start")) else row["pid_start"]
    if pid is not None and _alive(pid, start):
        try:
            os.killpg(pid, signal.SIGTERM)  # the worker leads its own session/process group
        except (ProcessLookupError, PermissionError):
            pass


def reap_dead(cache: Cache) -> list[str]:
    """Mark ``failed`` (``cancelled`` if a cancel was asked) every queued/running run whose worker is gone.

    Returns the ids of the runs it marked.
    """
    for pid, child in list(_children.items()):  # reap our own finished workers (no zombies left)
        if child.poll() is not None:
            _children.pop(pid, None)
    rows = cache.execute("SELECT run_id, pid, pid_start FROM runs WHERE status IN ('queued', 'running')")
    dead = []
    for run_id, pid, start in rows:
        if pid is None:
            continue  # being started right now (the pid is written just after the spawn)
        if not _alive(pid, start):
            # A cancel that killed the worker before it could say so still reads as cancelled.
            cache.execute("UPDATE runs SET status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'failed' END, "
                          "error = CASE WHEN cancel_requested THEN 'cancelled by the user' ELSE ? END, finished_at = ? "
                          "WHERE run_id = ? AND status IN ('queued', 'running')", [DIED, utcnow(), run_id])
            dead.append(run_id)
    return dead


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_files(cache: Cache, run_id: str, result: dict | None = None) -> Path | None:
    """The run's checkpoint directory on disk, or None when it has none (never built, or deleted).

    That is the result's ``out_dir`` when it holds an assembly manifest, else ``<cache dir>/runs/<id>``
    (:func:`run_dir`); either only when it carries SAHC's ownership marker (``paths.MARKER``, written by
    the assembly), so a directory SAHC did not create is never reported, sized or deleted.
    """
    from sahc_core.plans.assemble import MANIFEST

    try:
        default: Path | None = run_dir(cache, run_id)
    except PathError:  # a row written with an id that is not a safe path component: no default directory
        default = None
    if result is None:
        res = _row(cache, run_id).get("result")
        result = from_json(res) if isinstance(res, str) else {}
    out = (result or {}).get("out_dir")
    if out and (Path(out) / MANIFEST).is_file() and is_owned(out):
        return Path(out)
    return default if default is not None and is_owned(default) else None


def delete_run_files(cache: Cache, run_id: str) -> int:
    """Delete the assembled checkpoint of a finished run to free disk space; returns the bytes freed.

    The run's row, result, progress and gate decisions stay in the cache (the Runs table and the
    report keep showing it); the result records ``files_deleted_at``. A queued or running run is
    refused, and only a directory that :func:`run_files` recognises (SAHC's marker) is ever removed.
    """
    safe_id(run_id, "run id")
    row = run_status(cache, run_id)
    if row["status"] in ACTIVE:
        raise JobError(f"run {run_id} is still {row['status']}; cancel it or wait for it before deleting its files.")
    path = run_files(cache, run_id, row["result"])
    if path is None:
        return 0
    freed = _dir_bytes(path)
    try:
        remove_owned(path, f"the checkpoint directory of run {run_id}")
    except OSError as exc:
        raise JobError(f"cannot delete {path} ({exc.strerror or exc}); check its permissions.") from exc
    if row["result"] is not None:
        result = {**row["result"], "files_deleted_at": utcnow().isoformat()}
        cache.execute("UPDATE runs SET result = ? WHERE run_id = ?", [to_json(result), run_id])
    return freed


def _checkpoint_mb(cache: Cache, run_id: str, result: dict) -> float:
    path = run_files(cache, run_id, result)
    return 0.0 if path is None else _dir_bytes(path) / 1e6


def list_runs(cache: Cache, disk: bool = True) -> pd.DataFrame:
    """One row per run, newest first (columns :data:`LIST_COLUMNS`); dead workers are reaped first.

    ``disk=False`` leaves ``checkpoint_mb`` empty instead of walking every run's checkpoint directory
    (for callers that poll, like the Runs page's live progress). Each row carries its perplexity
    protocol (:func:`sahc_core.runs.protocol.protocol_columns`) and ``delta_ppl_pct`` against its own
    baseline.
    """
    from sahc_core.runs.protocol import protocol_columns

    reap_dead(cache)
    df = cache.query_df("SELECT run_id, plan_name, status, stage, result, error, started_at, finished_at, "
                        "model_fp, model_path FROM runs ORDER BY started_at DESC NULLS LAST, run_id DESC")
    rows = []
    for rec in df.to_dict(orient="records"):
        res = from_json(rec["result"]) if isinstance(rec.get("result"), str) else {}
        res = res or {}
        rows.append({**{k: rec.get(k) for k in ("run_id", "plan_name", "status", "stage", "error", "model_fp",
                                                 "model_path", "started_at")},
                     **{k: res.get(k) for k in (*_NUMERIC, "gates_passed", "gates_failed")},
                     "duration_s": _duration(rec.get("started_at"), rec.get("finished_at")),
                     "checkpoint_mb": _checkpoint_mb(cache, rec["run_id"], res) if disk else None,
                     **protocol_columns(res)})
    out = pd.DataFrame(rows, columns=LIST_COLUMNS)
    for col in (*_NUMERIC, "duration_s", "checkpoint_mb"):
        out[col] = pd.to_numeric(out[col], errors="coerce").astype("float64")
    out["ratio"] = out["ratio_actual"].fillna(out["ratio_projected"])  # what a scatter plots
    out["delta_ppl_pct"] = 100 * out["delta_ppl"] / out["baseline_ppl"]  # vs the run's OWN baseline
    for col in ("tokens", "window", "stride"):
        out[col] = pd.to_numeric(out[col], errors="coerce").astype("Int64")
    for col in ("gates_passed", "gates_failed"):
        out[col] = pd.to_numeric(out[col], errors="coerce").astype("Int64")
    return out
