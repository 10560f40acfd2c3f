"""DuckDB result store shared by the app, the CLI and background jobs.

DuckDB lets only one process hold a database file read-write, so this module never keeps a
connection open: every operation opens a short-lived connection, does its work and closes it.
When another process holds the file, the open is retried with exponential backoff plus jitter
for up to ``LOCK_TIMEOUT_S`` seconds before a ``CacheError`` is raised.

Decisions (documented here because callers depend on them):

* **Corrupt file** (not a DuckDB database): ``CacheError`` naming the file; the file is never
  deleted or overwritten, and no ``.lock`` file is left beside it (the DuckDB magic bytes are read
  before anything else happens).
* **Ownership**: an existing DuckDB file is opened READ-ONLY first and used only if SAHC created it:
  its ``meta`` table holds :data:`OWNER_KEY` = :data:`OWNER_VALUE` (written when SAHC creates a file),
  or, for a file of an older SAHC, a ``schema_version`` and all of SAHC's tables. An empty database
  counts as new. Any other database (someone else's ``runs`` table) is refused with ``CacheError``
  and never altered.
* **Read-only file or directory**: if the file exists with the current schema it is opened in
  read-only mode, so cached results can still be read (``Cache.read_only`` is True) and every write
  raises ``CacheError``; if it does not exist, cannot be created or needs a migration,
  ``Cache(...)`` raises ``CacheError``.
* **JSON values** are written with ``json.dumps``: numpy scalars and arrays, torch tensors, paths,
  tuples and dataclasses become plain JSON; non-finite floats are kept as the ``NaN`` /
  ``Infinity`` / ``-Infinity`` tokens (accepted by DuckDB's JSON type and by Python's ``json``),
  so a diverged perplexity reads back as ``inf``, not as ``None``.
* Timestamps are naive UTC.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import random
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pandas as pd

try:
    import fcntl
except ImportError:  # Windows: DuckDB's own lock (with retry) is the only guard
    fcntl = None  # type: ignore[assignment]

from sahc_core.errors import CacheError
from sahc_core.jsonutil import jsonable

T = TypeVar("T")

ENV_VAR = "SAHC_CACHE"
LOCK_TIMEOUT_S = 30.0

# Ordered migrations: MIGRATIONS[i] brings the schema from version i to version i + 1.
_V1 = [
    "CREATE TABLE IF NOT EXISTS meta(key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS results(kind VARCHAR, model_fp VARCHAR, key VARCHAR, version INTEGER,
        value JSON, created_at TIMESTAMP, PRIMARY KEY(kind, model_fp, key, version))""",
    """CREATE TABLE IF NOT EXISTS audit_log(id VARCHAR PRIMARY KEY, time TIMESTAMP, model_fp VARCHAR,
        run_id VARCHAR, tensor VARCHAR, gate VARCHAR, value DOUBLE, threshold DOUBLE, passed BOOLEAN,
        evidence JSON)""",
    "CREATE TABLE IF NOT EXISTS plans(name VARCHAR PRIMARY KEY, plan JSON, created_at TIMESTAMP)",
    """CREATE TABLE IF NOT EXISTS runs(run_id VARCHAR PRIMARY KEY, plan_name VARCHAR, plan JSON,
        model_path VARCHAR, model_fp VARCHAR, status VARCHAR, stage VARCHAR, progress JSON, result JSON,
        error VARCHAR, pid INTEGER, cancel_requested BOOLEAN, started_at TIMESTAMP, updated_at TIMESTAMP,
        finished_at TIMESTAMP)""",
]
# v2: what the job runner needs to recognise its own process after a pid is reused, and its log.
_V2 = [
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS pid_start VARCHAR",
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS log_path VARCHAR",
    "CREATE INDEX IF NOT EXISTS audit_log_run ON audit_log(run_id)",
]
MIGRATIONS: tuple[tuple[str, ...], ...] = (tuple(_V1), tuple(_V2))
SCHEMA_VERSION: int = len(MIGRATIONS)
#: The ``meta`` row that marks a DuckDB file as SAHC's own cache.
OWNER_KEY, OWNER_VALUE = "owner", "sahc-explorer"
_SAHC_TABLES = frozenset({"meta", "results", "audit_log", "plans", "runs"})
_DUCKDB_MAGIC = b"DUCK"  # bytes 8..11 of every DuckDB database file

_migrate_lock = threading.Lock()
_tls = threading.local()  # per thread: cache path -> file-lock depth


def default_cache_path() -> Path:
    """``$SAHC_CACHE`` when set, else ``<repo root>/cache/sahc.duckdb``."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / "cache" / "sahc.duckdb"


def utcnow() -> _dt.datetime:
    """Naive UTC timestamp, the convention of every TIMESTAMP column."""
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


def to_json(value: Any) -> str:
    """Serialise ``value`` for a JSON column (non-finite floats kept as NaN/Infinity tokens)."""
    return json.dumps(jsonable(value, nonfinite="keep", strict=True), allow_nan=True)


def from_json(text: str | None) -> Any:
    """Inverse of :func:`to_json` (``None`` stays ``None``)."""
    return None if text is None else json.loads(text)


def _is_lock_error(exc: Exception) -> bool:
    msg = str(exc)
    return isinstance(exc, duckdb.IOException) and ("Could not set lock" in msg or "Conflicting lock" in msg)


def _is_permission_error(exc: Exception) -> bool:
    msg = str(exc)
    return "Permission denied" in msg or "Read-only file system" in msg


class _PermissionDenied(CacheError):
    """Opening read-write was refused by the file system (the read-only fallback decides)."""


class Cache:
    """Handle on one DuckDB file; holds only the path, so it is cheap and safe to share.

    Parameters
    ----------
    path : str or Path, optional
        Database file; default :func:`default_cache_path`.
    lock_timeout : float
        Seconds to keep retrying while another process holds the file.
    """

    def __init__(self, path: str | Path | None = None, lock_timeout: float = LOCK_TIMEOUT_S) -> None:
        if lock_timeout <= 0:
            raise ValueError(f"lock_timeout must be positive, got {lock_timeout}.")
        self.path = Path(path).expanduser().resolve() if path is not None else default_cache_path()
        self.lock_timeout = float(lock_timeout)
        self.read_only = False
        self._hint = f"move it away or set {ENV_VAR} to another file"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the cache directory {self.path.parent} ({exc.strerror}): "
                             f"set {ENV_VAR} to a writable file.") from exc
        self._check_owned()
        with _migrate_lock:
            try:
                self._retry(self._migrate)
            except _PermissionDenied:
                self._open_read_only()

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}{', read_only=True' if self.read_only else ''})"

    # -- ownership ---------------------------------------------------------------------------
    def _check_owned(self) -> None:
        """Refuse an existing file that is not SAHC's cache, before any lock file or write (module docstring)."""
        try:
            mode = self.path.stat().st_mode
        except FileNotFoundError:
            return  # a new file: ours to create
        except OSError as exc:
            raise CacheError(f"cannot read the cache file {self.path} ({exc.strerror}): set {ENV_VAR} to another file.") from exc
        if not stat.S_ISREG(mode):
            raise CacheError(f"cache path {self.path} is not a regular file: set {ENV_VAR} to a .duckdb file.")
        try:
            with self.path.open("rb") as fh:
                head = fh.read(12)
        except OSError as exc:
            raise CacheError(f"cannot read the cache file {self.path} ({exc.strerror}): make it readable or set "
                             f"{ENV_VAR} to another file.") from exc
        if head[8:12] != _DUCKDB_MAGIC:
            raise CacheError(f"cache file {self.path} is not a DuckDB database (corrupt?): {self._hint}.")
        deadline = time.monotonic() + self.lock_timeout
        # Queue on our own flock only where one exists already (a file SAHC used before); creating it
        # here would leave a stray .lock beside a file that turns out not to be ours.
        with self._file_lock(deadline) if Path(f"{self.path}.lock").exists() else nullcontext():
            conn = self._connect_retry(deadline, read_only=True)
            try:
                self._refuse_foreign(conn)
            finally:
                conn.close()

    def _refuse_foreign(self, conn: duckdb.DuckDBPyConnection) -> None:
        """CacheError unless the database is empty or SAHC's own (see the module docstring)."""
        tables = {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if not tables:
            return
        meta: dict = {}
        if "meta" in tables:
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            except (duckdb.Error, ValueError, TypeError):  # a "meta" table of another shape: not ours
                meta = {}
        if meta.get(OWNER_KEY) == OWNER_VALUE or ("schema_version" in meta and _SAHC_TABLES <= tables):
            return
        shown = ", ".join(sorted(tables)[:4]) + (", ..." if len(tables) > 4 else "")
        raise CacheError(f"cache file {self.path} is a DuckDB database that SAHC did not create (it holds {shown}); "
                         f"it was left untouched: set {ENV_VAR} or --cache to another file.")

    # -- connections -------------------------------------------------------------------------
    def _open(self, read_only: bool | None = None) -> duckdb.DuckDBPyConnection:
        try:
            return duckdb.connect(str(self.path), read_only=self.read_only if read_only is None else read_only)
        except duckdb.Error as exc:
            msg = str(exc)
            if "not a valid DuckDB database" in msg or "not a DuckDB" in msg:
                raise CacheError(f"cache file {self.path} is not a DuckDB database (corrupt?): "
                                 f"{self._hint}.") from exc
            if _is_permission_error(exc) and not _is_lock_error(exc):
                raise _PermissionDenied(f"cache file {self.path} is not writable (permission denied): "
                                        f"make it writable or set {ENV_VAR} to a writable file.") from exc
            raise

    def _connect_retry(self, deadline: float, read_only: bool | None = None) -> duckdb.DuckDBPyConnection:
        """Open a connection, retrying while another process holds the lock (backoff + jitter)."""
        delay = 0.005
        while True:
            try:
                return self._open(read_only)
            except duckdb.IOException as exc:
                if not _is_lock_error(exc):
                    raise CacheError(f"cache file {self.path} could not be opened "
                                     f"({str(exc).splitlines()[0]}).") from exc
                if time.monotonic() >= deadline:
                    raise CacheError(self._locked_message()) from exc
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.1)

    @contextmanager
    def _file_lock(self, deadline: float) -> Iterator[None]:
        """Hold ``<file>.lock`` (flock) around one connection, between our own processes and threads.

        Hand-written because DuckDB has no blocking wait for its lock: polling it costs a failed
        ~10 ms open each time and is unfair under contention, while polling an flock costs
        microseconds. DuckDB's own lock (retried in ``_connect_retry``) still guards against other
        programs. Re-entrant per thread, so a ``connect()`` body may call ``execute()``.
        """
        key = str(self.path)
        held = getattr(_tls, "held", None)
        if held is None:
            held = _tls.held = {}
        if fcntl is None or held.get(key, 0):
            held[key] = held.get(key, 0) + 1
            try:
                yield
            finally:
                held[key] -= 1
            return
        lock_path = f"{self.path}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            try:
                fd = os.open(lock_path, os.O_RDONLY)
            except OSError:  # read-only directory without a lock file: DuckDB's lock alone guards
                fd = -1
        try:
            if fd >= 0:
                mode = fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX
                while True:
                    try:
                        fcntl.flock(fd, mode | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise CacheError(self._locked_message()) from None
                        time.sleep(0.001 + 0.003 * random.random())
            held[key] = 1
            yield
        finally:
            held[key] = 0
            if fd >= 0:
                os.close(fd)  # closing the descriptor releases the flock

    def _locked_message(self) -> str:
        return (f"cache file {self.path} stayed locked by another process for {self.lock_timeout:.0f} s: "
                f"close the other program or set {ENV_VAR}.")

    def _retry(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``fn(conn)`` on a fresh short-lived connection; retry lock and write-write conflicts."""
        deadline = time.monotonic() + self.lock_timeout
        while True:
            with self._file_lock(deadline):
                conn = self._connect_retry(deadline)
                try:
                    return fn(conn)
                except duckdb.TransactionException as exc:
                    # Write-write conflict with another connection of this process (same instance).
                    if time.monotonic() >= deadline:
                        raise CacheError(f"cache file {self.path}: a write kept conflicting for "
                                         f"{self.lock_timeout:.0f} s ({str(exc).splitlines()[0]}).") from exc
                except duckdb.InvalidInputException as exc:
                    if self.read_only and "read-only" in str(exc):
                        raise CacheError(f"cache file {self.path} is read-only, so results cannot be saved: "
                                         f"make it writable or set {ENV_VAR} to a writable file.") from exc
                    raise
                finally:
                    conn.close()
            time.sleep(0.005 + 0.02 * random.random())

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection (opened with lock retry); keep the ``with`` body brief."""
        deadline = time.monotonic() + self.lock_timeout
        with self._file_lock(deadline):
            conn = self._connect_retry(deadline)
            try:
                yield conn
            finally:
                conn.close()

    # -- schema ------------------------------------------------------------------------------
    @staticmethod
    def _schema_version(conn: duckdb.DuckDBPyConnection) -> int:
        has_meta = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'").fetchone()[0]
        if not has_meta:
            return 0
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self, conn: duckdb.DuckDBPyConnection, upto: int = SCHEMA_VERSION) -> int:
        self._refuse_foreign(conn)  # again, on this connection: the file may have appeared since the check
        current = self._schema_version(conn)
        if current > SCHEMA_VERSION:
            raise CacheError(f"cache file {self.path} has schema version {current}, newer than this SAHC "
                             f"({SCHEMA_VERSION}): upgrade SAHC or set {ENV_VAR} to another file.")
        for version in range(current, upto):
            conn.execute("BEGIN TRANSACTION")
            for stmt in MIGRATIONS[version]:
                conn.execute(stmt)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(version + 1)])
            conn.execute("COMMIT")
        if not conn.execute("SELECT count(*) FROM meta WHERE key = ?", [OWNER_KEY]).fetchone()[0]:
            conn.execute("INSERT INTO meta VALUES (?, ?)", [OWNER_KEY, OWNER_VALUE])
        return max(current, upto)

    def _open_read_only(self) -> None:
        if not self.path.exists():
            raise CacheError(f"cache file {self.path} cannot be created (permission denied): "
                             f"set {ENV_VAR} to a writable file.")
        self.read_only = True
        version = self._retry(self._schema_version)
        if version != SCHEMA_VERSION:
            raise CacheError(f"cache file {self.path} is read-only and needs a schema migration "
                             f"(version {version} -> {SCHEMA_VERSION}): make it writable or set {ENV_VAR}.")

    def schema_version(self) -> int:
        """The schema version stored in the file."""
        return self._retry(self._schema_version)

    # -- generic SQL -------------------------------------------------------------------------
    def execute(self, sql: str, params: list | tuple = ()) -> list[tuple]:
        """Run one statement with lock retry; rows for a query, ``[]`` otherwise."""
        def run(conn: duckdb.DuckDBPyConnection) -> list[tuple]:
            cur = conn.execute(sql, list(params))
            return cur.fetchall() if cur.description else []
        return self._retry(run)

    def executemany(self, sql: str, rows: list[list | tuple]) -> None:
        """Run one statement for many parameter rows in one transaction (one connection)."""
        if not rows:
            return
        def run(conn: duckdb.DuckDBPyConnection) -> None:
            conn.execute("BEGIN TRANSACTION")
            conn.executemany(sql, [list(r) for r in rows])
            conn.execute("COMMIT")
        self._retry(run)

    def query_df(self, sql: str, params: list | tuple = ()) -> pd.DataFrame:
        """Run a query with lock retry and return a DataFrame."""
        return self._retry(lambda conn: conn.execute(sql, list(params)).df())

    # -- results key/value store -----------------------------------------------------------
    def get(self, kind: str, model_fp: str, key: str, version: int) -> dict | None:
        """The stored JSON value, or ``None`` when absent."""
        rows = self.execute("SELECT value FROM results WHERE kind = ? AND model_fp = ? AND key = ? AND version = ?",
                            [kind, model_fp, key, int(version)])
        return from_json(rows[0][0]) if rows else None

    def put(self, kind: str, model_fp: str, key: str, version: int, value: dict) -> None:
        """Insert or replace one JSON value."""
        self.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)",
                     [kind, model_fp, key, int(version), to_json(value), utcnow()])

    def keys(self, kind: str, model_fp: str, version: int) -> list[str]:
        """Sorted keys stored for ``(kind, model_fp, version)``."""
        rows = self.execute("SELECT key FROM results WHERE kind = ? AND model_fp = ? AND version = ? ORDER BY key",
                            [kind, model_fp, int(version)])
        return [r[0] for r in rows]

    # -- plans -------------------------------------------------------------------------------
    def save_plan(self, name: str, plan: dict) -> None:
        """Store a plan (its JSON dict form) under ``name``, replacing an older one."""
        self.execute("INSERT OR REPLACE INTO plans VALUES (?, ?, ?)", [name, to_json(plan), utcnow()])

    def plans(self) -> dict[str, dict]:
        """All saved plans, name -> plan dict, newest first."""
        rows = self.execute("SELECT name, plan FROM plans ORDER BY created_at DESC")
        return {name: from_json(plan) for name, plan in rows}
